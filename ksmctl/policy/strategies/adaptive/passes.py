"""Counting passes while merging. After need_passes full passes every page present has
been seen twice and merged if it could be; from then on the first tick whose interval
found fewer than idle_yield new merges per 1000 pages scanned goes idle. If that interval
still merged (the end of the last pass falls in it), the next runs at verify_rate of the
pace and decides: idle, or one more pass at full pace when it is worth it (worth.py).
Kernels before Linux 6.7 do not count pages scanned: there the yield is judged over each
whole pass, at the tick that sees its boundary, and the last pass itself is the check.
With park, the last pass ends parked (park.py) and there is no check: sweeps look again.
At the first boundary after growth counted a pass more for memory behind ksmd's cursor,
that pass is dropped when the reading shows ksmd has looked at the grown memory: at most
COVERED of the list unseen (collectors/coverage.py)."""
from __future__ import annotations

from dataclasses import replace
from typing import Tuple

from ksmctl.policy.model import Adaptive
from ksmctl.policy.rules import AdaptiveMode, ScanRule
from ksmctl.policy.strategies.adaptive.state import AdaptiveState, Step, Tick
from ksmctl.policy.strategies.adaptive.sweep import pass_cpu
from ksmctl.policy.strategies.adaptive.worth import pass_worth

# The share of ksmd's list that may be unseen when the pass that ended counts as a whole
# one: pages a guest faults in between ksmd's look and the read (49 and 97 of 250,000 on
# the real-guest bench), growth too small to be read.
COVERED = 0.005


def count(ad: Adaptive, tick: Tick, state: AdaptiveState) -> Step:
    now, last = tick.now, tick.last
    assert last is not None, "resume.restart() handles the first tick"
    boundary = now.full_scans > last.full_scans
    passes = state.passes + max(0, now.full_scans - last.full_scans)
    st = replace(state, passes=passes, last_pass_yield=None, pass_start=now if boundary else state.pass_start)
    seen: Tuple[str, ...] = ()
    if boundary and st.behind_growth:
        st, seen = _seen(tick, replace(st, behind_growth=False))
    if ad.park and passes >= st.need_passes and st.park_at is not None and tick.parked \
            and now.full_scans == st.park_at:
        why = ("%d full passes since merging started, and ksmd stopped where the last one ended "
               "(pages_to_scan 0): parked at the boundary" % passes)
        return _idle(replace(st, verifying=False, parked=True), tick), ScanRule.park, seen + (why,)
    counted = now.pages_scanned is not None and last.pages_scanned is not None
    if counted:
        since = last
    elif boundary and state.pass_start is not None:
        since = state.pass_start   # no page counter: judge the pass that just ended, as a whole
    else:
        return st, ScanRule.merging, seen
    scanned = tick.scanned(since, now)
    if scanned <= 0:
        return st, ScanRule.merging, seen
    y = 1000.0 * (now.saved_pages - since.saved_pages) / scanned
    st = replace(st, last_pass_yield=y)
    span = round(now.monotonic - since.monotonic, 1)
    done = passes >= st.need_passes
    missed: Tuple[str, ...] = seen
    if done and st.park_at is not None:
        missed += ("ksmd was not parked where the last pass ended (full_scans %d, pages_to_scan %s)"
                   % (now.full_scans, "0" if tick.parked else "as it was"),)
    if done and y < ad.idle_yield:
        why = ("%d full passes since merging started, and the last %gs found %.2f new merges per 1000 pages "
               "scanned (< %g): idle" % (passes, span, y, ad.idle_yield))
        return _idle(replace(st, verifying=False), tick), ScanRule.idle, missed + (why,)
    if done and counted and not st.verifying:
        why = ("%d full passes done, the last %gs still found %.2f new merges per 1000 pages: checking at %g "
               "of the pace" % (passes, span, y, ad.verify_rate))
        return replace(st, verifying=True), ScanRule.merging, missed + (why,)
    if st.verifying or done:   # the checking interval, or (no page counter) the last whole pass
        where, judged = (("while checking", "the last interval") if counted
                         else ("over the last pass (%gs)" % span, "the last pass"))
        w = pass_worth(tick, st, since)
        if w is not None and not w.enough(ad.min_pass_yield):
            why = ("still %.2f new merges per 1000 pages %s, but another full pass is not worth it: "
                   "%s (min_pass_yield): idle, whose slow scan still merges the trickle"
                   % (y, where, w.describe(ad.min_pass_yield, judged)))
            return _idle(replace(st, verifying=False), tick), ScanRule.idle, seen + (why,)
        why = "still %.2f new merges per 1000 pages %s: one more pass at full pace" % (y, where)
        if w is not None:
            why += " (%s)" % w.describe(ad.min_pass_yield, judged)
        return replace(st, verifying=False, need_passes=passes + 1), ScanRule.merging, seen + (why,)
    return st, ScanRule.merging, seen


def _seen(tick: Tick, st: AdaptiveState) -> Tuple[AdaptiveState, Tuple[str, ...]]:
    """The first boundary after growth behind the cursor: drop that pass more if the pass
    that ended looked at the grown memory."""
    c = tick.coverage
    if c is None:
        return st, ("the pass that ended may have missed the memory that grew (no reading of which pages ksmd "
                    "has seen): %d passes stay" % st.need_passes,)
    if c.unreadable:
        return st, ("the pass that ended may have missed the memory that grew (the smaps of %d grown processes is "
                    "unreadable: another user's need CAP_SYS_PTRACE): %d passes stay" % (c.unreadable, st.need_passes),)
    allowed = int(COVERED * tick.list_pages())
    what = ("%d grown processes: %d of their %d mergeable pages unseen by ksmd (%d rmap items), at most %d allowed"
            % (c.processes, c.unseen_pages, c.mergeable_pages, c.rmap_items, allowed))
    if c.unseen_pages > allowed:
        return st, ("the pass that ended missed memory that grew (%s): %d passes stay" % (what, st.need_passes),)
    need = st.need_passes - 1
    return replace(st, need_passes=need), ("the pass that ended looked at the memory that grew (%s): it counts, "
                                           "%d passes, not %d" % (what, need, need + 1),)


def _idle(st: AdaptiveState, tick: Tick) -> AdaptiveState:
    low = tick.mergeable if tick.mergeable is not None else st.idle_mergeable
    return replace(st, mode=AdaptiveMode.idle, idle_mergeable=low, idle_at=tick.now, pass_cpu=pass_cpu(st, tick))
