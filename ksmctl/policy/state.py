"""What decide() remembers between ticks: one typed state per strategy, composed.
Bounded, serializable (service/trace.py keeps the flat trace shape), replayable."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ksmctl.policy.signals import History, Mark
from ksmctl.policy.strategies.adaptive import AdaptiveState
from ksmctl.policy.strategies.cpu_budget import BudgetState
from ksmctl.policy.strategies.run import RunState
from ksmctl.policy.strategies.step import StepState


@dataclass(frozen=True)
class EngineState:
    run: RunState = RunState()
    step: StepState = StepState()
    adaptive: AdaptiveState = AdaptiveState()
    budget: BudgetState = BudgetState()
    last: Optional[Mark] = None          # the previous tick's counters, for rates
    available_history: History = ()      # (monotonic, MemAvailable) of the last FALL_WINDOW s

    def after_policy_change(self) -> "EngineState":
        """A new policy keeps whether KSM runs and the stepped rate; the rest starts over."""
        return EngineState(run=self.run, step=self.step)
