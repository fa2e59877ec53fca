"""Whether KSM runs: off, always, or conditional with hysteresis (start when ANY
start_when holds, stop when ALL stop_when hold)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from ksmctl.policy.model import RunSection
from ksmctl.policy.rules import RunMode, RunRule
from ksmctl.policy.signals import SignalValues, all_hold, any_holds


@dataclass(frozen=True)
class RunState:
    active: Optional[bool] = None  # the policy's run state; None before the first tick


@dataclass(frozen=True)
class RunChoice:
    active: bool
    rule: RunRule
    reasons: Tuple[str, ...]
    restarted: bool  # KSM starts this tick, or the policy had it stopped before


def decide_run(run: RunSection, sig: SignalValues, total: Optional[int], ksm_running: bool,
               state: RunState) -> Tuple[RunChoice, RunState]:
    """Before the first tick the kernel's run state stands in for the policy's."""
    was_active = state.active if state.active is not None else ksm_running
    if run.mode is RunMode.off:
        active, rule, why = False, RunRule.off, ["policy keeps KSM off"]
    elif run.mode is RunMode.always:
        active, rule, why = True, RunRule.always, []
    elif was_active:
        stop, why = all_hold(run.stop_when, sig, total)
        active, rule = (False, RunRule.stop) if stop else (True, RunRule.keep_running)
        why = why if run.stop_when else ["no stop condition"]
    else:
        start, why = any_holds(run.start_when, sig, total)
        active, rule = (True, RunRule.start) if start else (False, RunRule.stay_stopped)
    restarted = rule is RunRule.start or state.active is False
    return RunChoice(active, rule, tuple(why), restarted), RunState(active=active)
