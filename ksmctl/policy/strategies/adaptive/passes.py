"""Counting passes while merging. After need_passes full passes every page present has
been seen twice and merged if it could be; from then on the first tick whose interval
found fewer than idle_yield new merges per 1000 pages scanned goes idle. If that interval
still merged (the end of the last pass falls in it), the next runs at verify_rate of the
pace and decides: idle, or one more pass at full pace when it is worth it (worth.py)."""
from __future__ import annotations

from dataclasses import replace

from ksmctl.policy.model import Adaptive
from ksmctl.policy.rules import AdaptiveMode, ScanRule
from ksmctl.policy.strategies.adaptive.state import AdaptiveState, Step, Tick
from ksmctl.policy.strategies.adaptive.worth import pass_worth


def count(ad: Adaptive, tick: Tick, state: AdaptiveState) -> Step:
    last = tick.last
    assert last is not None, "resume.restart() handles the first tick"
    passes = state.passes + max(0, tick.now.full_scans - last.full_scans)
    st = replace(state, passes=passes, last_pass_yield=None)
    scanned = tick.now.pages_scanned - last.pages_scanned
    if scanned <= 0:
        return st, ScanRule.merging, ()
    y = 1000.0 * (tick.now.saved_pages - last.saved_pages) / scanned
    st = replace(st, last_pass_yield=y)
    span = round(tick.now.monotonic - last.monotonic, 1)
    done = passes >= st.need_passes
    if done and y < ad.idle_yield:
        why = ("%d full passes since merging started, and the last %gs found %.2f new merges per 1000 pages "
               "scanned (< %g): idle" % (passes, span, y, ad.idle_yield))
        return _idle(replace(st, verifying=False), tick), ScanRule.idle, (why,)
    if done and not st.verifying:
        why = ("%d full passes done, the last %gs still found %.2f new merges per 1000 pages: checking at %g "
               "of the pace" % (passes, span, y, ad.verify_rate))
        return replace(st, verifying=True), ScanRule.merging, (why,)
    if st.verifying:
        w = pass_worth(tick, st)
        if w is not None and not w.enough(ad.min_pass_yield):
            why = ("still %.2f new merges per 1000 pages while checking, but another full pass is not worth it: "
                   "%s (min_pass_yield): idle, whose slow scan still merges the trickle"
                   % (y, w.describe(ad.min_pass_yield)))
            return _idle(replace(st, verifying=False), tick), ScanRule.idle, (why,)
        why = "still %.2f new merges per 1000 pages while checking: one more pass at full pace" % y
        if w is not None:
            why += " (%s)" % w.describe(ad.min_pass_yield)
        return replace(st, verifying=False, need_passes=passes + 1), ScanRule.merging, (why,)
    return st, ScanRule.merging, ()


def _idle(st: AdaptiveState, tick: Tick) -> AdaptiveState:
    low = tick.mergeable if tick.mergeable is not None else st.idle_mergeable
    return replace(st, mode=AdaptiveMode.idle, idle_mergeable=low)
