"""The policy's view of one tick: signal values, conditions evaluated on them, and the
counters behind rates. Pure functions of the readings (and the recent history)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ksmctl.policy.model import BYTE_SIGNALS, Condition, Signal
from ksmctl.policy.rules import Comparison
from ksmctl.readings import Readings, vm_signals
from ksmctl.units import format_bytes

FALL_WINDOW = 60.0  # seconds of MemAvailable history behind memory_available_fall
FALL_HISTORY_MAX = 128

SignalValues = Mapping[Signal, Optional[float]]
History = Tuple[Tuple[float, int], ...]


@dataclass(frozen=True)
class Mark:
    """Counters at a point in time, for rates and per-pass yields."""

    monotonic: float
    full_scans: int
    pages_scanned: Optional[int]   # None: the kernel has no counter (before Linux 6.7)
    saved_pages: int
    ksmd_cpu: Optional[float]


def mark(r: Readings) -> Mark:
    k = r.ksm
    return Mark(r.monotonic, k.get("full_scans", 0) or 0, k.get("pages_scanned"),
                k.saved_pages, r.ksmd_cpu_seconds)


def cpu_percent(prev: Optional[Mark], now: Mark) -> Optional[float]:
    """ksmd's CPU use since the previous tick, in % of one core."""
    if prev is None or prev.ksmd_cpu is None or now.ksmd_cpu is None:
        return None
    dt = now.monotonic - prev.monotonic
    if dt <= 0:
        return None
    return max(0.0, (now.ksmd_cpu - prev.ksmd_cpu) / dt * 100.0)


def available_history(r: Readings, history: Sequence[Sequence[float]]) -> History:
    """The (monotonic, MemAvailable) readings of the last FALL_WINDOW seconds, this one included."""
    kept = [(float(t), int(v)) for t, v in history if r.monotonic - FALL_WINDOW <= float(t) <= r.monotonic]
    if r.meminfo is not None:
        kept.append((r.monotonic, int(r.meminfo.available)))
    return tuple(kept[-FALL_HISTORY_MAX:])


def signals(r: Readings, history: Sequence[Sequence[float]] = ()) -> Dict[Signal, Optional[float]]:
    """The policy's view of the readings; None where a source gave nothing this tick.
    `history` is the recent (monotonic, MemAvailable) readings, for memory_available_fall."""
    mi, psi, vms = r.meminfo, r.psi, r.vms
    s: Dict[Signal, Optional[float]] = {k: None for k in Signal}
    if mi:
        s[Signal.memory_available] = mi.available
        s[Signal.memory_free] = mi.free + mi.buffers + mi.cached
        recent = [v for t, v in history if r.monotonic - FALL_WINDOW <= t <= r.monotonic]
        s[Signal.memory_available_fall] = max(0, max(recent + [mi.available]) - mi.available)
    if psi:
        s[Signal.psi_some_avg10] = psi.some_avg10
        s[Signal.psi_some_avg60] = psi.some_avg60
        s[Signal.psi_full_avg10] = psi.full_avg10
        s[Signal.psi_full_avg60] = psi.full_avg60
    if vms is not None:
        v = vm_signals(vms, mi)
        s[Signal.guest_committed] = v["committed_current_bytes"]
        s[Signal.guest_maximum] = v["committed_maximum_bytes"]
        s[Signal.guest_rss] = rss = sum((vm.rss or 0) for vm in vms)
        s[Signal.running_vms] = v["running_vms"]
        s[Signal.guest_free] = v["guest_free_bytes"]
        if mi:
            s[Signal.guest_committed_headroom] = mi.total - v["committed_current_bytes"]
            s[Signal.guest_rss_headroom] = mi.total - rss
    s[Signal.mergeable_memory] = r.mergeable_rss
    s[Signal.merge_potential] = r.merge_potential
    return s


def _show(sig: Signal, v: float) -> str:
    return format_bytes(v) if sig in BYTE_SIGNALS else "%g" % v


_OPS: Dict[Comparison, Tuple[Callable[[float, float], bool], str]] = {
    Comparison.below: (lambda a, b: a < b, "<"), Comparison.at_most: (lambda a, b: a <= b, "<="),
    Comparison.above: (lambda a, b: a > b, ">"), Comparison.at_least: (lambda a, b: a >= b, ">=")}


def evaluate(c: Condition, sig: SignalValues, mem_total: Optional[int]) -> Tuple[bool, str]:
    """(holds, explanation). An unknown signal never holds."""
    value = sig.get(c.signal)
    bound = c.threshold.resolve(mem_total)
    fn, sym = _OPS[c.op]
    if value is None or bound is None:
        return False, "%s unknown" % c.signal.value
    held = fn(value, bound)
    return held, "%s %s %s %s" % (c.signal.value, _show(c.signal, value), sym if held else "not " + sym,
                                   _show(c.signal, bound))


def any_holds(conds: Sequence[Condition], sig: SignalValues, total: Optional[int]) -> Tuple[bool, List[str]]:
    """Whether any holds; the first that does, or every explanation when none does."""
    results = [evaluate(c, sig, total) for c in conds]
    fired = [why for ok, why in results if ok]
    return (True, fired[:1]) if fired else (False, [why for _, why in results])


def all_hold(conds: Sequence[Condition], sig: SignalValues, total: Optional[int]) -> Tuple[bool, List[str]]:
    """Whether all hold (and there is at least one); the first that fails, or every explanation."""
    results = [evaluate(c, sig, total) for c in conds]
    failed = [why for ok, why in results if not ok]
    return (not failed and bool(conds)), (failed[:1] if failed else [why for _, why in results])
