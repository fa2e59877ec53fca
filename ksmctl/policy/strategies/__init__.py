"""Scan strategies. Each is a pure function of its policy section, the signals or counters
it needs and its own typed state, returning its result and its new state; decide()
composes them. A Pace is a scan rate of ksmctl's own; Delegated hands the rate to the
kernel's advisor."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

from ksmctl.kernel.knobs import KnobValue
from ksmctl.policy.rules import ScanRule


@dataclass(frozen=True)
class Pace:
    rule: ScanRule
    pages_to_scan: int
    sleep_millisecs: int
    reasons: Tuple[str, ...] = ()
    park_at: Optional[int] = None   # stop ksmd (pages_to_scan 0) when full_scans reaches this


@dataclass(frozen=True)
class Delegated:
    knobs: Mapping[str, KnobValue]     # advisor_mode=scan-time and its bounds
    reasons: Tuple[str, ...] = ()
