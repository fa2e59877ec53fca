"""ksmtuned's stepping: pages_to_scan grows by boost while a boost_when condition holds,
shrinks by decay otherwise, within min..max."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from ksmctl.policy.model import ScanSection
from ksmctl.policy.rules import ScanRule
from ksmctl.policy.signals import SignalValues, any_holds
from ksmctl.policy.strategies import Pace


@dataclass(frozen=True)
class StepState:
    npages: Optional[int] = None  # the stepped pages_to_scan; None: start from `initial`


def step(scan: ScanSection, sig: SignalValues, total: Optional[int], sleep: int,
         state: StepState) -> Tuple[Pace, StepState]:
    pts = scan.pages_to_scan
    npages = state.npages if state.npages is not None else pts.initial
    boost, why = any_holds(scan.boost_when, sig, total) if scan.boost_when else (False, [])
    if boost:
        npages, rule, reason = npages + pts.boost, ScanRule.boost, "boost +%d: %s" % (pts.boost, why[0])
    else:
        npages, rule = npages - pts.decay, ScanRule.decay
        reason = "decay -%d" % pts.decay + (": " + "; ".join(why) if why else "")
    npages = min(max(npages, pts.min), pts.max)
    return Pace(rule, npages, sleep, (reason,)), StepState(npages=npages)
