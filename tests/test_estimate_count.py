"""KeyTally against a plain Counter: global counts, each target's own counts and shares,
including keys that share a first word (the exact-sort fallback)."""
from __future__ import annotations

import collections
from typing import List, Sequence, Tuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ksmctl.estimate.count import KeyTally

Key = Tuple[int, ...]


def reference(targets: Sequence[Sequence[Key]]):
    total = collections.Counter(k for t in targets for k in t)
    per = []
    for t in targets:
        c = collections.Counter(t)
        share = sum(n * (total[k] - 1) / total[k] for k, n in c.items())
        per.append((len(t), len(c), sum(1 for n in c.values() if n == 1), share))
    return sorted(total.values()), per


def tally(targets: Sequence[Sequence[Key]], width: int):
    t = KeyTally(width)
    for keys in targets:
        t.add_target(np.array(keys, dtype=np.uint64).reshape(-1, width))
    return t.finish()


def check(targets: List[List[Key]], width: int) -> None:
    counts, per = reference(targets)
    r = tally(targets, width)
    assert sorted(r.counts.tolist()) == counts
    assert r.pages == sum(counts) and r.distinct == len(counts)
    assert r.saving == sum(c - 1 for c in counts)
    assert r.duplicate_pages == sum(c for c in counts if c > 1)
    for got, (pages, distinct, singles, share) in zip(r.targets, per):
        assert (got.pages, got.distinct, got.singles) == (pages, distinct, singles)
        assert got.share == pytest.approx(share, abs=1e-9)
    assert sum(t.share for t in r.targets) == pytest.approx(r.saving, abs=1e-6)


# Small word values make equal keys (and equal first words) common.
word = st.integers(min_value=0, max_value=5) | st.integers(min_value=0, max_value=2**64 - 1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.tuples(word, word), max_size=40), min_size=1, max_size=5))
def test_matches_counter_for_hash_keys(targets):
    check(targets, 2)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.tuples(word), max_size=40), min_size=1, max_size=4))
def test_matches_counter_for_frame_numbers(targets):
    check(targets, 1)


def test_keys_sharing_a_first_word_are_kept_apart():
    """Interleaved keys with one first word and different second words: a sort on the
    first word alone would split and merge their groups wrongly."""
    a, b = (7, 1), (7, 2)
    targets = [[a, b, a, b, (1, 1)], [b, a, (7, 3)]]
    check(targets, 2)
    r = tally(targets, 2)
    assert sorted(r.counts.tolist()) == [1, 1, 3, 3]


def test_capped_excess():
    r = tally([[(1, 1)] * 600 + [(2, 2)] * 256 + [(3, 3)] * 257], 2)
    # ceil(600/256) - 1 = 2; 256 -> 0; 257 -> 1
    assert r.capped_excess(256) == 3
    assert r.capped_excess(0) == 0


def test_no_keys():
    r = tally([[], []], 2)
    assert r.pages == r.distinct == r.saving == 0
    assert [(t.pages, t.distinct, t.singles, t.share) for t in r.targets] == [(0, 0, 0, 0.0)] * 2
