"""Scan as fast as merges are being found, and stop paying when they are not: ksmd is
paced to cover all mergeable memory once per target_pass_seconds while merging (resume.py
says when counting starts over, passes.py when merging is done), and drops to the idle
scan point after, or with park stops ksmd at the boundary that ends the last pass (park.py)."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Tuple

from ksmctl.policy.model import Adaptive, PagesToScan
from ksmctl.policy.rules import ScanRule
from ksmctl.policy.strategies import Pace
from ksmctl.policy.strategies.adaptive.park import PARK_SLEEP_MS, park_target
from ksmctl.policy.strategies.adaptive.passes import count
from ksmctl.policy.strategies.adaptive.resume import restart
from ksmctl.policy.strategies.adaptive.state import AdaptiveState, Tick

__all__ = ["AdaptiveState", "Tick", "adaptive"]


def adaptive(ad: Adaptive, pts: PagesToScan, tick: Tick, sleep: int,
             state: AdaptiveState) -> Tuple[Pace, AdaptiveState]:
    st, rule, reasons = restart(ad, tick, state) or count(ad, tick, state)
    if tick.mergeable is not None:  # growth counts from the low-water mark (guests may also exit)
        low = tick.mergeable if st.idle_mergeable is None else min(st.idle_mergeable, tick.mergeable)
        st = replace(st, idle_mergeable=low)
    if rule is ScanRule.park:
        return Pace(rule, 0, ad.idle.sleep_millisecs, reasons), replace(st, park_at=None)
    if rule is ScanRule.idle:
        return Pace(rule, ad.idle.pages_to_scan, ad.idle.sleep_millisecs, reasons), replace(st, park_at=None)
    park_at = park_target(ad, tick, st)
    if park_at is not None:
        sleep = max(sleep, PARK_SLEEP_MS)
    st = replace(st, park_at=park_at)
    pages_total = tick.list_pages()
    npages = _pace(ad, pts, pages_total, sleep, st.verifying)
    reasons += ("merging: %d mergeable pages, one pass per %gs -> %d pages per %d ms; %d of %d passes%s"
                % (pages_total, ad.target_pass_seconds, npages, sleep, min(st.passes, st.need_passes),
                   st.need_passes, "" if st.last_pass_yield is None
                   else ", last interval %.1f new merges/1000 pages" % st.last_pass_yield),)
    if park_at is not None:
        reasons += ("the last pass: ksmd is to stop where it ends (park at full_scans %d)" % park_at,)
    return Pace(rule, npages, sleep, reasons, park_at), st


def _pace(ad: Adaptive, pts: PagesToScan, pages_total: int, sleep: int, verifying: bool) -> int:
    """pages_to_scan for one pass per target_pass_seconds (verify_rate of it while checking),
    within min..max. Clamped before int(): a tiny target_pass_seconds makes the rate infinite."""
    rate = pages_total / ad.target_pass_seconds * (ad.verify_rate if verifying else 1.0)  # pages per second
    want = rate * max(sleep, 1) / 1000.0
    if want >= pts.max:
        return pts.max
    return max(int(math.ceil(want)), pts.min)
