"""Replays a policy over a recorded trace: decisions only, on the recorded readings."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from ksmctl.kernel.knobs import KnobValue
from ksmctl.policy.decide import EngineState, decide
from ksmctl.policy.model import Policy
from ksmctl.service.trace import read_trace


@dataclass
class ReplayRow:
    n: int
    wall: float
    recorded: Dict[str, Any]
    replayed_targets: Dict[str, KnobValue]
    replayed_rule: str
    reason: str

    @property
    def same(self) -> bool:
        return self.recorded.get("targets") == self.replayed_targets

    def format(self) -> str:
        rec = self.recorded
        return "#%d %s  recorded %s/%s %s  |  replayed %s %s%s" % (
            self.n, _hhmmss(self.wall), rec.get("run_rule"), rec.get("scan_rule"), _t(rec.get("targets") or {}),
            self.replayed_rule, _t(self.replayed_targets), "" if self.same else "  <- differs",
        ) + ("\n     because " + self.reason if self.reason else "")


def _t(t: Mapping[str, object]) -> str:
    keys = ("run", "pages_to_scan", "sleep_millisecs", "advisor_mode")
    return " ".join("%s=%s" % (k, t[k]) for k in keys if k in t)


def _hhmmss(wall: float) -> str:
    import time
    return time.strftime("%H:%M:%S", time.localtime(wall))


@dataclass
class ReplayResult:
    rows: List[ReplayRow] = field(default_factory=list)

    @property
    def differing(self) -> int:
        return sum(1 for r in self.rows if not r.same)

    def summary(self) -> str:
        rules = Counter(r.replayed_rule for r in self.rows)
        on = sum(1 for r in self.rows if r.replayed_targets.get("run") == 1)
        return ("%d ticks: %d decisions differ from the recorded ones; replayed policy keeps KSM running in %d "
                "ticks; rules: %s" % (len(self.rows), self.differing, on,
                                      ", ".join("%s %d" % kv for kv in sorted(rules.items()))))


def replay(policy: Policy, trace_path: str, start_state: Optional[EngineState] = None) -> ReplayResult:
    """Start from the first record's recorded engine state (a trace may begin mid-run)."""
    out = ReplayResult()
    state = start_state
    for n, rec in enumerate(read_trace(trace_path), 1):
        if state is None:
            state = rec["state_obj"]
        decision, state = decide(policy, rec["readings_obj"], state)
        out.rows.append(ReplayRow(n, rec["readings"]["wall"], rec["decision"], decision.targets.to_dict(),
                                  "%s/%s" % (decision.run_rule, decision.scan_rule), decision.reason))
    return out
