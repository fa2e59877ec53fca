"""Counting equal keys (page-content hashes, frame numbers) per target and across targets.

Why a sort and not a dict: a Counter costs one dict lookup per page, and once it holds
hundreds of thousands of keys every lookup misses the cache; on the lab VM it was half of
the estimator's user time. Appending each page's 16-byte hash to a flat buffer is
sequential, and one numpy sort at the end groups equal keys for every figure at once:
global counts, each target's own counts, and each target's share of the global saving.

Keys are rows of `width` uint64 (2 for XXH3-128 digests, 1 for frame numbers). Rows are
sorted on their first word; if two different keys ever share it (for hashes, odds about
n^2 / 2^65), the rows are re-sorted on every word, so grouping stays exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

import numpy as np   # OPENBLAS_NUM_THREADS is set by the package's __init__, which runs first


@dataclass
class TargetCounts:
    pages: int          # keys the target added
    distinct: int       # distinct keys among them
    singles: int        # keys the target holds exactly once
    share: float = 0.0  # sum over its pages of (c - 1) / c, c = the key's count across targets


@dataclass
class TallyResult:
    counts: np.ndarray                          # per distinct key across targets: its count
    targets: List[TargetCounts] = field(default_factory=list)

    @property
    def pages(self) -> int:
        return int(self.counts.sum())

    @property
    def distinct(self) -> int:
        return len(self.counts)

    @property
    def saving(self) -> int:
        """Pages that could share a frame: every copy beyond the first of each key."""
        return self.pages - self.distinct

    @property
    def duplicate_pages(self) -> int:
        """Pages whose key occurs at least twice."""
        return self.pages - int(np.count_nonzero(self.counts == 1))

    def capped_excess(self, max_sharing: int) -> int:
        """Frames beyond one per key that max_page_sharing forces: sum of ceil(c/m) - 1."""
        if max_sharing <= 0:
            return 0
        big = self.counts[self.counts > max_sharing].astype(np.int64)
        return int((-(-big // max_sharing) - 1).sum())


class KeyTally:
    """Keys of each target, kept as arrays until `finish` counts them in one pass."""

    def __init__(self, width: int) -> None:
        self.width = width
        self._keys: List[np.ndarray] = []

    def add_target(self, keys: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.uint64).reshape(-1, self.width)
        self._keys.append(keys)

    def finish(self) -> TallyResult:
        sizes = [len(k) for k in self._keys]
        n, ntargets = sum(sizes), len(sizes)
        if n == 0:
            self._keys = []
            return TallyResult(np.zeros(0, dtype=np.int64),
                               [TargetCounts(0, 0, 0) for _ in sizes])
        keys = np.concatenate(self._keys) if ntargets > 1 else self._keys[0]
        self._keys = []
        order, new_key = _group_rows(keys)
        del keys
        starts = np.flatnonzero(new_key)
        counts = np.diff(np.append(starts, n))
        result = TallyResult(counts)

        # The sort is stable and targets were concatenated in order, so inside a key's
        # group the target index never decreases: a (key, target) run starts where the
        # key or the target changes.
        tid = np.repeat(np.arange(ntargets, dtype=np.int32), sizes)[order]
        del order
        new_pair = new_key
        new_pair[1:] |= tid[1:] != tid[:-1]
        pair_starts = np.flatnonzero(new_pair)
        pair_sizes = np.diff(np.append(pair_starts, n))
        pair_tid = tid[pair_starts]
        distinct = np.bincount(pair_tid, minlength=ntargets)
        singles = np.bincount(pair_tid[pair_sizes == 1], minlength=ntargets)
        weight = np.repeat((counts - 1) / counts, counts)
        shares = np.bincount(tid, weights=weight, minlength=ntargets)
        result.targets = [TargetCounts(sizes[i], int(distinct[i]), int(singles[i]), float(shares[i]))
                          for i in range(ntargets)]
        return result


def _group_rows(keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """A stable order that puts equal rows next to each other, and a mask (in that order)
    of the rows that start a new key."""
    order = np.argsort(keys[:, 0], kind="stable")
    sk = np.take(keys, order, axis=0)   # measured 6x faster than keys[order] for 2-D rows
    n = len(sk)
    new_key = np.empty(n, dtype=bool)
    new_key[0] = True
    first_differs = np.not_equal(sk[1:, 0], sk[:-1, 0], out=new_key[1:])
    if keys.shape[1] > 1:
        rest_differs = np.zeros(n - 1, dtype=bool)
        for col in range(1, keys.shape[1]):
            rest_differs |= sk[1:, col] != sk[:-1, col]
        if np.any(rest_differs & ~first_differs):
            # Different keys share a first word (odds ~n^2/2^65 for hashes): sort on all words.
            order = np.lexsort(keys.T[::-1])
            sk = np.take(keys, order, axis=0)
            rest_differs = np.any(sk[1:] != sk[:-1], axis=1)
            new_key[1:] = False
        new_key[1:] |= rest_differs
    return order, new_key
