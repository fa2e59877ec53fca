"""Decision traces: JSON lines of what the daemon read and decided, bounded and rotated,
so a policy can be replayed over a real night (`ksmctl policy replay`)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, TypeVar

from ksmctl.errors import ConfigError, UsageError
from ksmctl.fsutil import decode_utf8, open_input
from ksmctl.policy.decide import Decision, EngineState, Mark
from ksmctl.policy.rules import AdaptiveMode
from ksmctl.policy.strategies.adaptive import AdaptiveState
from ksmctl.policy.strategies.cpu_budget import BudgetState
from ksmctl.policy.strategies.run import RunState
from ksmctl.policy.strategies.step import StepState
from ksmctl.readings import (MAX_WALL, PAGE_SIZE_MAX, PAGE_SIZE_MIN, Coverage, EstimateSummary, KsmStat, KsmState,
                             MemInfo, Psi, Readings, VmReading, VmSource)

TRACE_VERSION = 1


def readings_from_dict(d: Dict[str, Any]) -> Readings:
    k = d["ksm"]
    ksm = KsmState(values={str(a): int(b) for a, b in k["values"].items()}, advisor_mode=k.get("advisor_mode"),
                   advisor_modes=tuple(k.get("advisor_modes") or ()), unsupported=frozenset(k.get("unsupported") or ()),
                   unreadable=dict(k.get("unreadable") or {}), page_size=int(k.get("page_size", 4096)))
    vms = None
    if d.get("vms") is not None:
        vms = tuple(VmReading(**{**v, "ksm": KsmStat(**v["ksm"]) if v.get("ksm") else None}) for v in d["vms"])
    return Readings(
        monotonic=d["monotonic"], wall=d["wall"], ksm=ksm,
        meminfo=MemInfo(**d["meminfo"]) if d.get("meminfo") else None,
        psi=Psi(**d["psi"]) if d.get("psi") else None,
        ksmd_cpu_seconds=d.get("ksmd_cpu_seconds"), vms=vms, mergeable_rss=d.get("mergeable_rss"),
        estimate=EstimateSummary(**d["estimate"]) if d.get("estimate") else None,
        errors=tuple(tuple(e) for e in d.get("errors") or ()),  # type: ignore[misc]
        vm_source=VmSource.parse(d.get("vm_source")),
        coverage=Coverage(**d["coverage"]) if d.get("coverage") else None)


def state_to_dict(s: EngineState) -> Dict[str, Any]:
    """The flat shape traces have always had (one key per field of every strategy's state),
    so old and new traces are interchangeable."""
    ad = s.adaptive
    out = {"active": s.run.active, "npages": s.step.npages, "mode": ad.mode.value,
           "last": asdict(s.last) if s.last is not None else None, "passes": ad.passes,
           "last_pass_yield": ad.last_pass_yield, "need_passes": ad.need_passes, "verifying": ad.verifying,
           "available_history": [list(p) for p in s.available_history], "idle_mergeable": ad.idle_mergeable,
           "cpu_scale": s.budget.cpu_scale}
    if ad.phase_start is not None:   # a key of later traces only: older ones round-trip unchanged
        out["phase_start"] = asdict(ad.phase_start)
    if ad.pass_start is not None:
        out["pass_start"] = asdict(ad.pass_start)
    if ad.idle_at is not None:
        out["idle_at"] = asdict(ad.idle_at)
    if ad.pass_cpu is not None:
        out["pass_cpu"] = ad.pass_cpu
    if ad.park_at is not None:
        out["park_at"] = ad.park_at
    if ad.parked:
        out["parked"] = True
    if ad.behind_growth:
        out["behind_growth"] = True
    return out


T = TypeVar("T")


def _field(d: Dict[str, Any], key: str, conv: Callable[[Any], T], default: T) -> T:
    v = d.get(key)
    return default if v is None else conv(v)


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError("expected a whole number, found %r" % (v,))
    return v


def _num(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError("expected a finite number, found %r" % (v,))
    return float(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("expected true or false, found %r" % (v,))
    return v


def _mark(v: Any) -> Mark:
    return Mark(_num(v["monotonic"]), _int(v["full_scans"]), _field(v, "pages_scanned", _int, None),
                _int(v["saved_pages"]), _field(v, "ksmd_cpu", _num, None))


def state_from_dict(d: Dict[str, Any]) -> EngineState:
    """The flat shape back into per-strategy states; absent keys take their defaults, unknown
    keys are ignored. A bad value is ValueError/TypeError/KeyError (read_trace names the line)."""
    if not isinstance(d, dict):
        raise TypeError("state_before is not an object")
    try:
        ad = AdaptiveState(AdaptiveMode(_field(d, "mode", str, "merging")), _field(d, "passes", _int, 0),
                           _field(d, "last_pass_yield", _num, None), _field(d, "need_passes", _int, 0),
                           _field(d, "verifying", _bool, False), _field(d, "idle_mergeable", _int, None),
                           _field(d, "phase_start", _mark, None), _field(d, "pass_start", _mark, None),
                           _field(d, "idle_at", _mark, None), _field(d, "pass_cpu", _num, None),
                           _field(d, "park_at", _int, None), _field(d, "parked", _bool, False),
                           _field(d, "behind_growth", _bool, False))
        history = tuple((_num(t), _int(v)) for t, v in d.get("available_history") or ())
        return EngineState(run=RunState(_field(d, "active", _bool, None)),
                           step=StepState(_field(d, "npages", _int, None)), adaptive=ad,
                           budget=BudgetState(_field(d, "cpu_scale", _num, 1.0)),
                           last=_field(d, "last", _mark, None), available_history=history)
    except ValueError as e:
        raise ValueError("state_before: %s" % e) from None


def decision_to_dict(dec: Decision) -> Dict[str, Any]:
    out = {"targets": dict(dec.targets), "run_rule": str(dec.run_rule), "scan_rule": str(dec.scan_rule),
           "reasons": list(dec.reasons), "ksmd_cpu_percent": dec.ksmd_cpu_percent}
    if dec.park_at is not None:
        out["park_at"] = dec.park_at
    return out


class TraceWriter:
    """Appends one line per tick; rotates at max_bytes keeping `backups` old files."""

    def __init__(self, path: str, max_bytes: int = 16 * 1024 * 1024, backups: int = 3) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except (OSError, ValueError) as e:  # a parent that is a file, read-only, a NUL byte
            raise ConfigError("trace.path %s: cannot create its directory %s: %s"
                              % (path, self.path.parent, getattr(e, "strerror", None) or e)) from None

    def record(self, policy_name: str, policy_hash: str, readings: Readings, before: EngineState,
               decision: Decision) -> None:
        line = json.dumps({"v": TRACE_VERSION, "policy": policy_name, "policy_sha256": policy_hash,
                           "readings": readings.to_dict(), "state_before": state_to_dict(before),
                           "decision": decision_to_dict(decision)}, separators=(",", ":"), default=str)
        self._rotate_if_needed(len(line) + 1)
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def _rotate_if_needed(self, incoming: int) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size + incoming <= self.max_bytes:
            return
        if self.backups == 0:
            self.path.unlink()
            return
        for i in range(self.backups - 1, 0, -1):
            src = self.path.with_name("%s.%d" % (self.path.name, i))
            if src.exists():
                os.replace(src, self.path.with_name("%s.%d" % (self.path.name, i + 1)))
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))


MAX_TRACE_LINE = 64 * 1024 * 1024  # one tick's record; ~100x that of a 500-VM host


def _no_constant(name: str) -> Any:
    raise ValueError("%s is not a number a trace holds" % name)


def _check_ranges(readings: Dict[str, Any]) -> None:
    """Values of the right type that no host records and the replay cannot use: a wall
    time localtime() overflows on, a page size that divides by zero."""
    wall = readings.get("wall")
    if not isinstance(wall, (int, float)) or not 0 <= wall <= MAX_WALL:
        raise ValueError("readings.wall: expected seconds since 1970, 0..%g" % MAX_WALL)
    ksm = readings.get("ksm")
    page_size = ksm.get("page_size", 4096) if isinstance(ksm, dict) else 4096
    if not isinstance(page_size, int) or not PAGE_SIZE_MIN <= page_size <= PAGE_SIZE_MAX:
        raise ValueError("readings.ksm.page_size: expected %d..%d bytes" % (PAGE_SIZE_MIN, PAGE_SIZE_MAX))


def read_trace(path: str, limit: Optional[int] = None) -> Iterator[Dict[str, Any]]:
    """Records of a trace file; a file that is not a trace (a FIFO, a device, another
    file's text) or a bad line is a UsageError naming file and line, never its text."""
    from pydantic import TypeAdapter, ValidationError

    from ksmctl.service.state import DecisionDoc
    shapes = (("readings", TypeAdapter(Readings)), ("state_before", TypeAdapter(EngineState)),
              ("decision", TypeAdapter(DecisionDoc)))
    with open_input(path, "trace") as f:
        n = 0
        while True:
            try:
                raw = f.readline(MAX_TRACE_LINE + 1)
            except OSError as e:
                raise UsageError("%s: cannot read trace: %s" % (path, e.strerror or e)) from None
            if not raw:
                return
            n += 1
            where = "%s:%d" % (path, n)
            if len(raw) > MAX_TRACE_LINE:
                raise UsageError("%s: not a ksmctl trace record (longer than %d MiB)" % (where, MAX_TRACE_LINE >> 20))
            line = decode_utf8(raw, where, "trace")
            if not line.strip():
                continue
            try:
                rec = json.loads(line, parse_constant=_no_constant)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
                if rec.get("v") != TRACE_VERSION:
                    raise ValueError("trace version %r, expected %d" % (str(rec.get("v"))[:20], TRACE_VERSION))
                for key, shape in shapes:
                    if key not in rec:
                        raise ValueError("no %s" % key)
                    try:
                        shape.validate_python(rec[key])
                    except ValidationError as e:
                        err = e.errors()[0]
                        raise ValueError("%s: %s" % (".".join(str(p) for p in (key,) + tuple(err["loc"])),
                                                     err["msg"])) from None
                _check_ranges(rec["readings"])
                rec["readings_obj"] = readings_from_dict(rec["readings"])
                rec["state_obj"] = state_from_dict(rec["state_before"])
            except json.JSONDecodeError as e:
                raise UsageError("%s: not a ksmctl trace record (not JSON: column %d)" % (where, e.colno)) from None
            except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as e:
                raise UsageError("%s: not a ksmctl trace record (%s)" % (where, e)) from None
            yield rec
            if limit is not None and n >= limit:
                return
