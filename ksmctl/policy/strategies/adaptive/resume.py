"""When the adaptive strategy counts passes from 0 again: KSM (re)starts, mergeable
memory grows by resume_growth, or an idle sweep is due (sweep.py). Each time one pass
more when ksmd already holds pages (its cursor is part-way through a pass): on a
restart, pages behind the cursor changed unseen; on growth, the kernel adds a new
process just behind the cursor (mm/ksm.c __ksm_enter, "insert just behind the scanning
cursor"), so the first boundary after it started comes before ksmd has seen its memory
at all (tests/test_kernel_list_order.py shows it on the real kernel); a sweep is one
whole pass, which starts at that boundary. Not so when ksmd is parked at a boundary
(park.py): the new process joins the end of the list and the next pass is a whole one.
The pass more for growth is dropped at the first boundary after it when ksmd has in
fact looked at the grown memory (passes.py, collectors/coverage.py)."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from ksmctl.policy.model import Adaptive
from ksmctl.policy.rules import AdaptiveMode, ScanRule
from ksmctl.policy.strategies.adaptive.state import AdaptiveState, Step, Tick
from ksmctl.policy.strategies.adaptive.sweep import sweep_due
from ksmctl.units import format_bytes


def restart(ad: Adaptive, tick: Tick, state: AdaptiveState) -> Optional[Step]:
    """The phase after a (re)start or growth; None when neither happened."""
    fresh = replace(state, passes=0, verifying=False, last_pass_yield=None, idle_mergeable=tick.mergeable,
                    phase_start=tick.now, pass_start=tick.now, parked=False, behind_growth=False)
    # The cursor is somewhere in a pass, unless ksmd is parked at a boundary still.
    behind = 1 if tick.rmap_pages > 0 and not state.at_boundary(tick) else 0
    if tick.restarted or tick.last is None:
        need = ad.min_passes + behind
        rule = ScanRule.resume if tick.resumed else ScanRule.merging
        return replace(fresh, mode=AdaptiveMode.merging, need_passes=need), rule, ()
    grown = tick.grown(state)
    grew = grown is not None and grown > ad.resume_growth
    if state.mode is AdaptiveMode.idle:
        if not grew:
            sweep = sweep_due(ad, tick, state)
            if sweep is not None:
                return replace(fresh, mode=AdaptiveMode.merging, need_passes=1 + behind), ScanRule.sweep, (sweep,)
            if ad.park and state.at_boundary(tick):
                return replace(state, verifying=False, last_pass_yield=None), ScanRule.park, \
                    ("no new merges to find; parked at a pass boundary",)
            left = ("pages_to_scan is no longer 0: ksmd left the boundary it was parked at; ",) \
                if state.parked and not tick.parked else ()
            return replace(state, verifying=False, last_pass_yield=None, parked=False), ScanRule.idle, \
                left + ("no new merges to find; idle scan",)
        why = "mergeable memory grew by %s since idle (> %s)" % (format_bytes(grown or 0),
                                                                  format_bytes(ad.resume_growth))
        return replace(fresh, mode=AdaptiveMode.merging, need_passes=ad.min_passes + behind,
                       behind_growth=behind == 1), ScanRule.resume, (why,)
    if grew:
        # New memory while merging: it too needs min_passes before anything is known.
        to_go = state.need_passes - state.passes
        need = max(ad.min_passes + behind, to_go)
        # The pass more is growth's (droppable) unless the passes still to go needed it anyway.
        for_growth = behind == 1 and (ad.min_passes + 1 > to_go or state.behind_growth)
        why = "mergeable memory grew by %s while merging: counting passes again" % format_bytes(grown or 0)
        return replace(fresh, need_passes=need, behind_growth=for_growth), ScanRule.merging, (why,)
    return None
