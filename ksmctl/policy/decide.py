"""decide(): the policy applied to one tick's readings. Pure: the same policy, readings
and state give the same decision, so decisions can be unit-tested and replayed from a
trace. Every decision carries the rule that fired and the values behind it.

It composes the strategies: whether KSM runs (strategies/run.py), then the scan rate
(step, adaptive or the kernel's advisor), then the CPU budget's cap."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple, Union

from ksmctl.kernel.knobs import KnobValue, Targets
from ksmctl.policy.model import Policy, ScanSection
from ksmctl.policy.rules import RUN_RULES, SCAN_RULES, RunRule, ScanRule, Strategy
from ksmctl.policy.signals import (FALL_WINDOW, Mark, SignalValues, available_history, cpu_percent, evaluate,
                                   mark, signals)
from ksmctl.policy.state import EngineState
from ksmctl.policy.strategies import Delegated, Pace
from ksmctl.policy.strategies.adaptive import Tick, adaptive
from ksmctl.policy.strategies.advisor import advisor
from ksmctl.policy.strategies.cpu_budget import cap
from ksmctl.policy.strategies.run import RunChoice, decide_run
from ksmctl.policy.strategies.step import step
from ksmctl.policy.strategies.stopped import background
from ksmctl.readings import Readings

__all__ = ["Decision", "EngineState", "Mark", "RUN_RULES", "SCAN_RULES", "FALL_WINDOW", "decide", "evaluate",
           "signals", "sleep_millisecs", "available_history"]

_RMAP = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")


@dataclass(frozen=True)
class Decision:
    targets: Targets                     # knob -> value to hold (run last when applied)
    run_rule: RunRule
    scan_rule: ScanRule
    reasons: Tuple[str, ...] = field(default_factory=tuple)
    ksmd_cpu_percent: Optional[float] = None
    park_at: Optional[int] = None        # stop ksmd at this full_scans, between ticks (kernel/park.py)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def sleep_millisecs(policy: Policy, mem_total: Optional[int]) -> int:
    """base, scaled by reference_memory / MemTotal when set, within floor..ceiling."""
    sm = policy.scan.sleep_millisecs
    sleep = sm.base
    if sm.reference_memory and mem_total:
        sleep = sm.base * sm.reference_memory // mem_total
    return int(min(max(sleep, sm.floor), sm.ceiling))


def decide(policy: Policy, r: Readings, state: EngineState) -> Tuple[Decision, EngineState]:
    history = available_history(r, state.available_history)
    sig = signals(r, history)
    total = r.meminfo.total if r.meminfo else None
    now = mark(r)
    cpu = cpu_percent(state.last, now)
    run, run_state = decide_run(policy.run, sig, total, r.ksm.running, state.run)
    st = replace(state, run=run_state, last=now, available_history=history)
    advisor_ok = r.ksm.advisor_mode is not None

    settings = policy.kernel.knobs()   # held whether KSM runs or not

    def decision(choice: Union[Pace, Delegated, None]) -> Decision:
        if isinstance(choice, Delegated):
            return Decision(Targets({**settings, **choice.knobs}), run.rule, ScanRule.advisor,
                            run.reasons + choice.reasons, cpu)
        if choice is None:
            return Decision(Targets({**settings, "run": 0}), run.rule, ScanRule.none, run.reasons, cpu)
        return Decision(Targets({**settings, **_paced(choice, advisor_ok)}), run.rule, choice.rule,
                        run.reasons + choice.reasons, cpu, choice.park_at)

    if not run.active:
        return decision(background(policy.run)), replace(st, adaptive=st.adaptive.stopped())
    choice, st = _scan(policy.scan, r, sig, total, sleep_millisecs(policy, total), run, state, st)
    if isinstance(choice, Pace):
        choice, budget = cap(policy.scan, choice, cpu, st.budget)
        st = replace(st, budget=budget)
    return decision(choice), st


def _scan(scan: ScanSection, r: Readings, sig: SignalValues, total: Optional[int], sleep: int, run: RunChoice,
          before: EngineState, st: EngineState) -> Tuple[Union[Pace, Delegated], EngineState]:
    """The scan strategy's choice, and the state with the strategy's new part."""
    if scan.strategy is Strategy.adaptive:
        rmap = sum(r.ksm.get(n, 0) or 0 for n in _RMAP)
        assert st.last is not None, "decide() records this tick's counters first"
        tick = Tick(st.last, before.last, r.mergeable_rss, rmap, r.ksm.page_size, run.restarted,
                    before.run.active is not None, r.ksm.get("pages_to_scan") == 0, r.coverage)
        pace, ad = adaptive(scan.adaptive, scan.pages_to_scan, tick, sleep, st.adaptive)
        return pace, replace(st, adaptive=ad)
    if scan.strategy is Strategy.advisor:
        choice, stepped = advisor(scan, sig, total, sleep, r.ksm.advisor_mode is not None, st.step)
        return choice, replace(st, step=stepped)
    pace, stepped = step(scan, sig, total, sleep, st.step)
    return pace, replace(st, step=stepped)


def _paced(p: Pace, advisor_supported: bool) -> Targets:
    """A rate of ksmctl's own: the kernel's advisor must not own it."""
    knobs: Dict[str, KnobValue] = {"advisor_mode": "none"} if advisor_supported else {}
    knobs.update(pages_to_scan=int(p.pages_to_scan), sleep_millisecs=int(p.sleep_millisecs), run=1)
    return Targets(knobs)
