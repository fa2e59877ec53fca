"""The CPU budget caps whatever rate the strategy chose: over budget, the rate shrinks
in proportion (never below 2% or pages_to_scan.min); within it, it recovers by a quarter
per tick. The idle scan point is not capped: it is already the floor; nor is a parked
ksmd, which scans nothing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from ksmctl.policy.model import ScanSection
from ksmctl.policy.rules import ScanRule
from ksmctl.policy.strategies import Pace

MIN_SCALE = 0.02


@dataclass(frozen=True)
class BudgetState:
    cpu_scale: float = 1.0  # the throttle on the scan rate, MIN_SCALE..1


def cap(scan: ScanSection, pace: Pace, cpu: Optional[float], state: BudgetState) -> Tuple[Pace, BudgetState]:
    budget = scan.cpu_budget
    if budget is None or pace.rule in (ScanRule.idle, ScanRule.park):
        return pace, state
    scale = min(max(state.cpu_scale, MIN_SCALE), 1.0)
    rule, reasons = pace.rule, pace.reasons
    if cpu is not None and cpu > budget:
        scale = max(MIN_SCALE, scale * budget / cpu)
        reasons += ("ksmd used %.0f%% of a core, budget %g%%: scan rate x%.2f" % (cpu, budget, scale),)
        rule = ScanRule.cpu_cap
    elif scale < 1.0:
        scale = min(1.0, scale * 1.25)
    npages = max(scan.pages_to_scan.min, int(pace.pages_to_scan * scale))
    return Pace(rule, npages, pace.sleep_millisecs, reasons, pace.park_at), BudgetState(cpu_scale=scale)
