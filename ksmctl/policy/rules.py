"""The bounded vocabularies of a decision: which rule fired (an exported metric label,
written to traces and the state file) and the policy's own choices. Members are named
as their values, which are what files and labels spell, so str() and %s give the label."""
from __future__ import annotations

from typing import Tuple

from ksmctl.errors import StrEnum


# Every enum here prints as its value, on every Python from 3.9: see errors.StrEnum.
Label = StrEnum


class RunRule(Label):
    """Why KSM runs or not this tick (label of ksmctl_decisions_total{kind="run"})."""

    off = "off"
    always = "always"
    start = "start"
    stop = "stop"
    keep_running = "keep_running"
    stay_stopped = "stay_stopped"


class ScanRule(Label):
    """What set the scan rate this tick (label of ksmctl_decisions_total{kind="scan"})."""

    boost = "boost"
    decay = "decay"
    merging = "merging"
    idle = "idle"
    resume = "resume"
    sweep = "sweep"
    park = "park"
    cpu_cap = "cpu_cap"
    advisor = "advisor"
    background = "background"
    none = "none"


# The metric's label values, in declaration order.
RUN_RULES: Tuple[str, ...] = tuple(r.value for r in RunRule)
SCAN_RULES: Tuple[str, ...] = tuple(r.value for r in ScanRule)


class Comparison(Label):
    """How a condition compares its signal with its threshold (the condition's key)."""

    below = "below"
    at_most = "at_most"
    above = "above"
    at_least = "at_least"


class RunMode(Label):
    """conditional: start_when/stop_when with hysteresis; always; off."""

    conditional = "conditional"
    always = "always"
    off = "off"


class OnStop(Label):
    """When pressure ends: stop ksmd (run=0, merged pages stay merged) or keep a slow scan."""

    stop = "stop"
    background = "background"


class Strategy(Label):
    """How fast ksmd scans: stepped like ksmtuned, paced on the merge yield, or the kernel's advisor."""

    step = "step"
    adaptive = "adaptive"
    advisor = "advisor"


class OnExternalChange(Label):
    """When someone else writes a knob ksmctl set: put it back, or leave it for an interval."""

    reassert = "reassert"
    back_off = "back_off"


class AdaptiveMode(Label):
    """The adaptive strategy's phase: pacing passes while merges are found, or idle."""

    merging = "merging"
    idle = "idle"
