"""decide(): the policy applied to one tick's readings. Pure: the same policy, readings
and state give the same decision, so decisions can be unit-tested and replayed from a
trace. Every decision carries the rule that fired and the values behind it."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

from ksmctl.readings import Readings, vm_signals
from ksmctl.units import format_bytes
from ksmctl.policy.model import BYTE_SIGNALS, Condition, Policy, ScanPoint, Signal

# Bounded rule labels (they become a metric label).
RUN_RULES = ("off", "always", "start", "stop", "keep_running", "stay_stopped")
SCAN_RULES = ("boost", "decay", "merging", "idle", "resume", "cpu_cap", "advisor",
              "background", "none")


@dataclass(frozen=True)
class Mark:
    """Counters at a point in time, for rates and per-pass yields."""

    monotonic: float
    full_scans: int
    pages_scanned: int
    saved_pages: int
    ksmd_cpu: Optional[float]


@dataclass(frozen=True)
class EngineState:
    """What decide() remembers between ticks: bounded, serializable, replayable."""

    active: Optional[bool] = None        # the policy's run state; None before the first tick
    npages: Optional[int] = None         # step strategy's pages_to_scan
    mode: str = "merging"                # adaptive: "merging" or "idle"
    last: Optional[Mark] = None          # previous tick
    passes: int = 0                      # full-scan boundaries seen since (re)start of merging
    last_pass_yield: Optional[float] = None  # new merges per 1000 pages scanned over the last tick
    need_passes: int = 0                 # adaptive: boundaries to see before idling is allowed
    verifying: bool = False              # adaptive: passes done, checking one interval at verify_rate
    available_history: Tuple[Tuple[float, int], ...] = ()  # (monotonic, MemAvailable), last FALL_WINDOW s
    idle_mergeable: Optional[int] = None  # adaptive: mergeable memory when passes were last counted from 0
    cpu_scale: float = 1.0               # CPU budget's throttle on the scan rate


@dataclass(frozen=True)
class Decision:
    targets: Dict[str, object]           # knob -> value to hold (run last when applied)
    run_rule: str
    scan_rule: str
    reasons: Tuple[str, ...] = field(default_factory=tuple)
    ksmd_cpu_percent: Optional[float] = None

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


FALL_WINDOW = 60.0  # seconds of MemAvailable history behind memory_available_fall
FALL_HISTORY_MAX = 128


def available_history(r: Readings, history: Sequence[Sequence[float]]) -> Tuple[Tuple[float, int], ...]:
    """The (monotonic, MemAvailable) readings of the last FALL_WINDOW seconds, this one included."""
    kept = [(float(t), int(v)) for t, v in history if r.monotonic - FALL_WINDOW <= float(t) <= r.monotonic]
    if r.meminfo is not None:
        kept.append((r.monotonic, int(r.meminfo.available)))
    return tuple(kept[-FALL_HISTORY_MAX:])


def signals(r: Readings, history: Sequence[Sequence[float]] = ()) -> Dict[Signal, Optional[float]]:
    """The policy's view of the readings; None where a source gave nothing this tick.
    `history` is the recent (monotonic, MemAvailable) readings, for memory_available_fall."""
    mi, psi, vms = r.meminfo, r.psi, r.vms
    total = mi.total if mi else None
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
        if total is not None:
            s[Signal.guest_committed_headroom] = total - v["committed_current_bytes"]
            s[Signal.guest_rss_headroom] = total - rss
    s[Signal.mergeable_memory] = r.mergeable_rss
    s[Signal.merge_potential] = r.merge_potential
    return s


def _show(sig: Signal, v: float) -> str:
    return format_bytes(v) if sig in BYTE_SIGNALS else "%g" % v


_OPS = {"below": (lambda a, b: a < b, "<"), "at_most": (lambda a, b: a <= b, "<="),
        "above": (lambda a, b: a > b, ">"), "at_least": (lambda a, b: a >= b, ">=")}


def evaluate(c: Condition, sig: Dict[Signal, Optional[float]], mem_total: Optional[int]) -> Tuple[bool, str]:
    """(holds, explanation). An unknown signal never holds."""
    value = sig.get(c.signal)
    bound = c.threshold.resolve(mem_total)
    fn, sym = _OPS[c.op]
    if value is None or bound is None:
        return False, "%s unknown" % c.signal.value
    held = fn(value, bound)
    return held, "%s %s %s %s" % (c.signal.value, _show(c.signal, value), sym if held else "not " + sym,
                                   _show(c.signal, bound))


def _any(conds: List[Condition], sig, total) -> Tuple[bool, List[str]]:
    results = [evaluate(c, sig, total) for c in conds]
    fired = [why for ok, why in results if ok]
    return (True, fired[:1]) if fired else (False, [why for _, why in results])


def _all(conds: List[Condition], sig, total) -> Tuple[bool, List[str]]:
    results = [evaluate(c, sig, total) for c in conds]
    failed = [why for ok, why in results if not ok]
    return (not failed and bool(conds)), (failed[:1] if failed else [why for _, why in results])


def sleep_millisecs(policy: Policy, mem_total: Optional[int]) -> int:
    sm = policy.scan.sleep_millisecs
    sleep = sm.base
    if sm.reference_memory and mem_total:
        sleep = sm.base * sm.reference_memory // mem_total
    return int(min(max(sleep, sm.floor), sm.ceiling))


def _mark(r: Readings) -> Mark:
    k = r.ksm
    return Mark(r.monotonic, k.get("full_scans", 0) or 0, k.get("pages_scanned", 0) or 0,
                k.saved_pages, r.ksmd_cpu_seconds)


def _cpu_percent(prev: Optional[Mark], now: Mark) -> Optional[float]:
    if prev is None or prev.ksmd_cpu is None or now.ksmd_cpu is None:
        return None
    dt = now.monotonic - prev.monotonic
    if dt <= 0:
        return None
    return max(0.0, (now.ksmd_cpu - prev.ksmd_cpu) / dt * 100.0)


def decide(policy: Policy, r: Readings, state: EngineState) -> Tuple[Decision, EngineState]:
    history = available_history(r, state.available_history)
    sig = signals(r, history)
    total = r.meminfo.total if r.meminfo else None
    now = _mark(r)
    cpu = _cpu_percent(state.last, now)
    reasons: List[str] = []
    run = policy.run

    # 1. Should KSM run?
    was_active = state.active if state.active is not None else r.ksm.running
    if run.mode == "off":
        active, run_rule = False, "off"
        reasons.append("policy keeps KSM off")
    elif run.mode == "always":
        active, run_rule = True, "always"
    elif was_active:
        stop, why = _all(run.stop_when, sig, total)
        active, run_rule = (False, "stop") if stop else (True, "keep_running")
        reasons.extend(why if run.stop_when else ["no stop condition"])
    else:
        start, why = _any(run.start_when, sig, total)
        active, run_rule = (True, "start") if start else (False, "stay_stopped")
        reasons.extend(why)

    st = replace(state, active=active, last=now, available_history=history)
    advisor_supported = r.ksm.advisor_mode is not None
    targets: Dict[str, object] = {}

    if not active:
        if run.mode == "conditional" and run.on_stop == "background" and run.background is not None:
            # A scan rate of our own: the kernel's advisor must not own it.
            targets = {"advisor_mode": "none"} if advisor_supported else {}
            targets.update(_point(run.background), run=1)
            scan_rule = "background"
        else:
            targets, scan_rule = {"run": 0}, "none"
        st = replace(st, mode="merging", passes=0)
        return Decision(targets, run_rule, scan_rule, tuple(reasons), cpu), st

    # 2. How fast should ksmd scan?
    scan = policy.scan
    sleep = sleep_millisecs(policy, total)
    if scan.strategy == "advisor" and advisor_supported:
        a = scan.advisor
        targets = {"advisor_mode": "scan-time", "advisor_target_scan_time": a.target_scan_time,
                   "advisor_max_cpu": a.max_cpu, "advisor_min_pages_to_scan": a.min_pages_to_scan,
                   "advisor_max_pages_to_scan": a.max_pages_to_scan, "sleep_millisecs": sleep, "run": 1}
        reasons.append("scan rate delegated to the kernel's advisor (target scan time %ds)" % a.target_scan_time)
        return Decision(targets, run_rule, "advisor", tuple(reasons), cpu), st

    if scan.strategy == "advisor":
        reasons.append("this kernel has no advisor_mode: stepping the scan rate instead")
    if scan.strategy == "adaptive":
        npages, scan_rule, st = _adaptive(policy, r, st, state, now, sig, sleep, cpu, run_rule, reasons)
        if scan_rule == "idle":
            point = scan.adaptive.idle
            targets = _point(point)
            npages, sleep = point.pages_to_scan, point.sleep_millisecs
    else:
        pts = scan.pages_to_scan
        npages = st.npages if st.npages is not None else pts.initial
        boost, why = _any(scan.boost_when, sig, total) if scan.boost_when else (False, [])
        if boost:
            npages += pts.boost
            scan_rule = "boost"
            reasons.append("boost +%d: %s" % (pts.boost, why[0]))
        else:
            npages -= pts.decay
            scan_rule = "decay"
            reasons.append("decay -%d" % pts.decay + (": " + "; ".join(why) if why else ""))
        npages = min(max(npages, pts.min), pts.max)
        st = replace(st, npages=npages)

    # 3. The CPU budget caps whatever the strategy chose.
    if scan.cpu_budget is not None and scan_rule != "idle":
        scale = st.cpu_scale
        if cpu is not None and cpu > scan.cpu_budget:
            scale = max(0.02, scale * scan.cpu_budget / cpu)
            reasons.append("ksmd used %.0f%% of a core, budget %g%%: scan rate x%.2f" % (cpu, scan.cpu_budget, scale))
            scan_rule = "cpu_cap"
        elif scale < 1.0:
            scale = min(1.0, scale * 1.25)
        st = replace(st, cpu_scale=scale)
        npages = max(scan.pages_to_scan.min, int(npages * scale))

    targets.update({"pages_to_scan": int(npages), "sleep_millisecs": int(sleep), "run": 1})
    if advisor_supported:
        targets = {"advisor_mode": "none", **targets}
    return Decision(targets, run_rule, scan_rule, tuple(reasons), cpu), st


def _point(p: ScanPoint) -> Dict[str, object]:
    return {"pages_to_scan": p.pages_to_scan, "sleep_millisecs": p.sleep_millisecs}


def _adaptive(policy: Policy, r: Readings, st: EngineState, prev: EngineState, now: Mark,
              sig, sleep: int, cpu: Optional[float], run_rule: str, reasons: List[str]):
    """Pace ksmd to one pass per target_pass_seconds while merges are being found. Once
    min_passes full passes have completed since merging (re)started, every page present
    then has been seen twice and merged if it could be; from then on the first tick whose
    interval found fewer than idle_yield new merges per 1000 pages scanned goes idle. If
    that interval still merged (the end of the last pass falls in it), the next interval
    runs at verify_rate of the pace and decides: idle, or one more pass at full pace.
    When KSM (re)starts while ksmd already holds pages, its cursor is part-way through a
    pass and pages behind it changed unseen: one pass more. New guests are added at the
    end of ksmd's list, ahead of its cursor, so growth needs no extra pass. Resume when
    mergeable memory grows by resume_growth or pressure starts again."""
    ad = policy.scan.adaptive
    pts = policy.scan.pages_to_scan
    page = r.ksm.page_size
    mergeable = sig.get(Signal.mergeable_memory)
    k = r.ksm
    rmap_pages = sum(k.get(n, 0) or 0 for n in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile"))
    pages_total = max(int((mergeable or 0) // page), rmap_pages, 1)
    need_on_start = ad.min_passes + (1 if rmap_pages > 0 else 0)
    need_on_growth = ad.min_passes

    restarted = run_rule == "start" or prev.active is False
    mode, passes, need, verifying = st.mode, st.passes, st.need_passes, False
    if mode == "merging" and not restarted and prev.last is not None:
        verifying = st.verifying
    last_yield: Optional[float] = None
    idle_mergeable = st.idle_mergeable
    rule = "merging"
    grown = (mergeable or 0) - (idle_mergeable or 0)
    if restarted or prev.last is None:
        mode, passes, need, idle_mergeable = "merging", 0, need_on_start, mergeable
        rule = "resume" if prev.active is not None else "merging"
    elif mode == "idle":
        if mergeable is not None and grown > ad.resume_growth:
            mode, passes, need, idle_mergeable = "merging", 0, need_on_growth, mergeable
            rule = "resume"
            reasons.append("mergeable memory grew by %s since idle (> %s)"
                           % (format_bytes(grown), format_bytes(ad.resume_growth)))
        else:
            rule = "idle"
            reasons.append("no new merges to find; idle scan")
    elif mergeable is not None and grown > ad.resume_growth:
        # New memory while merging: it too needs two passes before anything is known.
        passes, need, idle_mergeable, verifying = 0, max(need_on_growth, need - passes), mergeable, False
        reasons.append("mergeable memory grew by %s while merging: counting passes again"
                       % format_bytes(grown))
    else:
        last = prev.last
        passes += max(0, now.full_scans - last.full_scans)
        scanned = now.pages_scanned - last.pages_scanned
        gained = now.saved_pages - last.saved_pages
        if scanned > 0:
            last_yield = 1000.0 * gained / scanned
            span = round(now.monotonic - last.monotonic, 1)
            if passes >= need and last_yield < ad.idle_yield:
                mode, rule, verifying = "idle", "idle", False
                idle_mergeable = int(mergeable) if mergeable is not None else idle_mergeable
                reasons.append("%d full passes since merging started, and the last %gs found %.2f new merges "
                               "per 1000 pages scanned (< %g): idle" % (passes, span, last_yield, ad.idle_yield))
            elif passes >= need and not verifying:
                # The passes are done, but this interval still merged (typically the end of
                # the last pass): check the next interval at a fraction of the pace.
                verifying = True
                reasons.append("%d full passes done, the last %gs still found %.2f new merges per 1000 pages: "
                               "checking at %g of the pace" % (passes, span, last_yield, ad.verify_rate))
            elif verifying:
                # Still finding merges at the checking pace: back to full pace for another pass.
                verifying, need = False, passes + 1
                reasons.append("still %.2f new merges per 1000 pages while checking: one more pass at full pace"
                               % last_yield)
    if mergeable is not None:  # growth counts from the low-water mark (guests may also exit)
        idle_mergeable = int(mergeable) if idle_mergeable is None else int(min(idle_mergeable, mergeable))
    rate = pages_total / ad.target_pass_seconds  # pages per second
    if verifying:
        rate *= ad.verify_rate
    npages = int(math.ceil(rate * max(sleep, 1) / 1000.0))
    npages = min(max(npages, pts.min), pts.max)
    if rule in ("merging", "resume"):
        reasons.append("merging: %d mergeable pages, one pass per %gs -> %d pages per %d ms; %d of %d passes%s"
                       % (pages_total, ad.target_pass_seconds, npages, sleep, min(passes, need), need,
                          "" if last_yield is None else ", last interval %.1f new merges/1000 pages" % last_yield))
    st = replace(st, mode=mode, passes=passes, last_pass_yield=last_yield,
                 idle_mergeable=idle_mergeable, need_passes=need, verifying=verifying)
    return npages, rule, st
