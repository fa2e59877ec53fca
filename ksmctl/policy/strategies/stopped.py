"""What ksmd does while the policy has KSM stopped: nothing (run=0: merged pages stay
merged), or a slow background scan of the policy's own."""
from __future__ import annotations

from typing import Optional

from ksmctl.policy.model import RunSection
from ksmctl.policy.rules import OnStop, RunMode, ScanRule
from ksmctl.policy.strategies import Pace


def background(run: RunSection) -> Optional[Pace]:
    """The background scan point, or None for run=0."""
    if run.mode is RunMode.conditional and run.on_stop is OnStop.background and run.background is not None:
        p = run.background
        return Pace(ScanRule.background, p.pages_to_scan, p.sleep_millisecs)
    return None
