"""The kernel's scan-rate advisor (advisor_mode=scan-time, Linux 6.9+); on kernels
without advisor_mode, ksmtuned's stepping instead."""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

from ksmctl.kernel.knobs import KnobValue
from ksmctl.policy.model import ScanSection
from ksmctl.policy.signals import SignalValues
from ksmctl.policy.strategies import Delegated, Pace
from ksmctl.policy.strategies.step import StepState, step

FALLBACK = "this kernel has no advisor_mode: stepping the scan rate instead"


def advisor(scan: ScanSection, sig: SignalValues, total: Optional[int], sleep: int, supported: bool,
            state: StepState) -> Tuple[Union[Delegated, Pace], StepState]:
    if not supported:
        pace, state = step(scan, sig, total, sleep, state)
        return Pace(pace.rule, pace.pages_to_scan, pace.sleep_millisecs, (FALLBACK,) + pace.reasons), state
    a = scan.advisor
    knobs: Dict[str, KnobValue] = {"advisor_mode": "scan-time", "advisor_target_scan_time": a.target_scan_time,
             "advisor_max_cpu": a.max_cpu, "advisor_min_pages_to_scan": a.min_pages_to_scan,
             "advisor_max_pages_to_scan": a.max_pages_to_scan, "sleep_millisecs": sleep, "run": 1}
    why = "scan rate delegated to the kernel's advisor (target scan time %ds)" % a.target_scan_time
    return Delegated(knobs, (why,)), state
