"""The policy format: typed, validated, and the source of the shipped JSON Schema.

A policy says when KSM runs (start/stop conditions with hysteresis), how fast ksmd
scans (stepped like ksmtuned, adaptive on the merge yield, or delegated to the kernel's
advisor), what ksmd may cost (a CPU budget) and what happens when pressure ends.
Conditions are data (signal, comparison, threshold), never expressions to evaluate.
"""
from __future__ import annotations

import enum
import math
from typing import Any, Dict, List, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator, model_validator

from ksmctl.kernel.knobs import BY_NAME
from ksmctl.policy.rules import Comparison, OnExternalChange, OnStop, RunMode, Strategy
from ksmctl.policy.vms import VmsSection
from ksmctl.units import parse_duration, parse_size
from ksmctl.yamlload import NoBoolNumbers


class Model(NoBoolNumbers):
    # NaN compares false with every bound and infinity overflows int(): neither is a setting.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _kernel_range(knob: str, **kw: Any) -> Any:
    """A field bounded by what the kernel accepts for `knob` (the knob table's range)."""
    k = BY_NAME[knob]
    return Field(ge=k.lo, le=k.hi, **kw)


def size(v: Any) -> int:
    """parse_size, with non-finite and too-large sizes as ValueError (pydantic reports those;
    an OverflowError would escape as a traceback)."""
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError("expected a finite size, found %r" % v)
    try:
        return parse_size(v)
    except OverflowError:
        raise ValueError("too large for a size: %.20s..." % (v,)) from None


class Signal(str, enum.Enum):
    """What a condition can look at. Byte signals accept sizes and % of MemTotal."""

    memory_available = "memory_available"       # MemAvailable
    memory_free = "memory_free"                 # MemFree + Buffers + Cached (ksmtuned's "free")
    memory_available_fall = "memory_available_fall"  # how far MemAvailable fell in the last 60 s
    psi_some_avg10 = "psi_some_avg10"           # % of time some task stalled on memory
    psi_some_avg60 = "psi_some_avg60"
    psi_full_avg10 = "psi_full_avg10"
    psi_full_avg60 = "psi_full_avg60"
    guest_committed = "guest_committed"         # sum of guests' balloon current (RSS without libvirt)
    guest_maximum = "guest_maximum"             # sum of guests' balloon maximum
    guest_rss = "guest_rss"                     # sum of QEMU processes' RSS (what ksmtuned counts)
    guest_committed_headroom = "guest_committed_headroom"  # MemTotal - guest_committed
    guest_rss_headroom = "guest_rss_headroom"   # MemTotal - guest_rss (ksmtuned: total - committed)
    guest_free = "guest_free"                   # guests' own reported unused memory (balloon stats)
    running_vms = "running_vms"
    mergeable_memory = "mergeable_memory"       # RSS of processes with MADV_MERGEABLE memory
    merge_potential = "merge_potential"         # achievable - achieved (bytes) from the estimator


PSI_SIGNALS = frozenset((Signal.psi_some_avg10, Signal.psi_some_avg60, Signal.psi_full_avg10,
                         Signal.psi_full_avg60))
BYTE_SIGNALS = frozenset(s for s in Signal if s not in PSI_SIGNALS and s is not Signal.running_vms)
# MemTotal minus what guests hold: negative when guests are overcommitted.
SIGNED_SIGNALS = frozenset((Signal.guest_committed_headroom, Signal.guest_rss_headroom))


class Threshold(Model):
    """A bound. Written as a number, a size ('2GiB'), a percentage of MemTotal ('20%'),
    or {percent: 20, at_least: 2MiB} for 'the larger of 20% of RAM and 2 MiB'.
    Percentages round down to a whole KiB, as ksmtuned's shell arithmetic does."""

    value: Optional[float] = None
    percent: Optional[float] = Field(default=None, ge=0, le=100)
    at_least: Optional[int] = None
    at_most: Optional[int] = None

    @model_validator(mode="before")
    @classmethod
    def _from_short_form(cls, data: Any) -> Any:
        if isinstance(data, bool):
            raise ValueError("expected a number, a size like 2GiB or a percentage like 20%%, found %r" % data)
        if isinstance(data, (int, float)):
            return {"value": data}
        if isinstance(data, str):
            text = data.strip()
            if text.endswith("%"):
                try:
                    return {"percent": float(text[:-1])}
                except ValueError:
                    raise ValueError("expected a percentage like 20%%, found %r" % data) from None
            return {"value": size(text)}
        if isinstance(data, dict):
            out = dict(data)
            for k in ("at_least", "at_most"):
                if k in out and isinstance(out[k], (str, int, float)) and not isinstance(out[k], bool):
                    out[k] = size(out[k])
            return out
        raise ValueError("expected a number, a size, a percentage or {percent, at_least, at_most}")

    @model_validator(mode="after")
    def _one_base(self) -> "Threshold":
        if (self.value is None) == (self.percent is None):
            raise ValueError("give either a value or a percent")
        if self.at_least is not None and self.at_most is not None and self.at_least > self.at_most:
            raise ValueError("at_least (%d) is larger than at_most (%d)" % (self.at_least, self.at_most))
        return self

    def resolve(self, mem_total: Optional[int]) -> Optional[float]:
        """The bound in the signal's unit; None when a percentage has no MemTotal to refer to."""
        if self.percent is not None:
            if mem_total is None:
                return None
            v: float = (mem_total // 1024) * self.percent // 100 * 1024
        else:
            v = float(self.value)  # type: ignore[arg-type]
        if self.at_least is not None:
            v = max(v, self.at_least)
        if self.at_most is not None:
            v = min(v, self.at_most)
        return v


class Condition(Model):
    """One comparison: {signal: memory_available, below: 20%}."""

    signal: Signal
    below: Optional[Threshold] = None
    at_most: Optional[Threshold] = None
    above: Optional[Threshold] = None
    at_least: Optional[Threshold] = None

    @model_validator(mode="after")
    def _one_comparison(self) -> "Condition":
        given = [k.value for k in Comparison if getattr(self, k.value) is not None]
        if len(given) != 1:
            raise ValueError("a condition needs exactly one of below, at_most, above, at_least (found %s)"
                             % (", ".join(given) or "none"))
        t = getattr(self, given[0])
        if t.percent is not None and self.signal not in BYTE_SIGNALS:
            raise ValueError("a percentage of MemTotal only applies to memory signals, not %s"
                             % self.signal.value)
        return self

    @field_validator("below", "at_most", "above", "at_least")
    @classmethod
    def _meaningful(cls, t: Optional[Threshold], info: ValidationInfo) -> Optional[Threshold]:
        """Bounds no reading can cross mean nothing: negative sizes or counts, stall time outside 0..100%."""
        signal = info.data.get("signal")
        if t is None or t.value is None or signal is None:
            return t
        if signal in PSI_SIGNALS and not 0 <= t.value <= 100:
            raise ValueError("PSI is a percentage of time, 0..100")
        if t.value < 0 and signal not in PSI_SIGNALS and signal not in SIGNED_SIGNALS:
            raise ValueError("%s cannot be negative" % signal.value)
        return t

    @property
    def op(self) -> Comparison:
        for k in Comparison:
            if getattr(self, k.value) is not None:
                return k
        raise AssertionError("validated")

    @property
    def threshold(self) -> Threshold:
        t = getattr(self, self.op.value)
        assert isinstance(t, Threshold)
        return t


def _duration(v: Any) -> float:
    return parse_duration(v)


class ScanPoint(Model):
    pages_to_scan: int = _kernel_range("pages_to_scan")
    sleep_millisecs: int = _kernel_range("sleep_millisecs")


class RunSection(Model):
    """When KSM runs. conditional: start when ANY start_when holds, stop when ALL
    stop_when hold (separate thresholds give hysteresis); always; or off."""

    mode: RunMode = RunMode.conditional
    start_when: List[Condition] = Field(default_factory=list)
    stop_when: List[Condition] = Field(default_factory=list)
    on_stop: OnStop = OnStop.stop
    background: Optional[ScanPoint] = None

    @model_validator(mode="after")
    def _consistent(self) -> "RunSection":
        if self.mode is RunMode.conditional and not self.start_when:
            raise ValueError("mode conditional needs at least one start_when condition")
        if self.on_stop is OnStop.background and self.background is None:
            raise ValueError("on_stop: background needs a background: {pages_to_scan, sleep_millisecs}")
        return self


class PagesToScan(Model):
    initial: int = _kernel_range("pages_to_scan", default=100)
    min: int = _kernel_range("pages_to_scan", default=64)
    max: int = Field(default=1250, ge=1, le=BY_NAME["pages_to_scan"].hi)
    boost: int = _kernel_range("pages_to_scan", default=300)  # added per tick while a boost_when condition holds
    decay: int = _kernel_range("pages_to_scan", default=50)   # subtracted per tick otherwise

    @model_validator(mode="after")
    def _order(self) -> "PagesToScan":
        if self.min > self.max:
            raise ValueError("min (%d) is larger than max (%d)" % (self.min, self.max))
        return self


class SleepMillisecs(Model):
    """sleep = base x reference_memory / MemTotal (when reference_memory is set), then
    floor/ceiling: bigger hosts sleep less, as ksmtuned's 10 ms per 16 GiB."""

    base: int = Field(default=20, ge=0, le=60000)
    reference_memory: Optional[int] = None
    floor: int = Field(default=10, ge=0, le=60000)
    ceiling: int = Field(default=60000, ge=1, le=BY_NAME["sleep_millisecs"].hi)

    @field_validator("reference_memory", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        return None if v is None else size(v)

    @model_validator(mode="after")
    def _order(self) -> "SleepMillisecs":
        if self.floor > self.ceiling:
            raise ValueError("floor (%d) is larger than ceiling (%d)" % (self.floor, self.ceiling))
        if not self.reference_memory and not self.floor <= self.base <= self.ceiling:
            # Without reference_memory the base is the sleep: outside floor..ceiling it is never used.
            raise ValueError("base (%d) is outside floor..ceiling (%d..%d)" % (self.base, self.floor, self.ceiling))
        return self


_SHARES = {"min_pass_yield": ("a share of the merging phase's yield per ksmd CPU-second",
                              "e.g. 0.05; 0 always runs the pass"),
           "sweep_cpu": ("the share of one core that idle sweeps may cost on average", "e.g. 0.01; 0: no sweeps")}


class Adaptive(Model):
    """Scan as fast as merges are being found, and stop paying when they are not.

    While merging, ksmd is paced to cover all mergeable memory every target_pass_seconds
    (within the CPU budget): a page merges only when a second pass sees it unchanged, so
    the pass time bounds the time to the saving. After min_passes full passes since
    merging (re)started (one more when KSM restarts with ksmd part-way through a pass),
    every page that could merge has had its chance; from then on the first tick whose
    interval found fewer than idle_yield new merges per 1000 pages scanned drops ksmd to
    the idle scan point. When that interval still merged (the last pass ended in it), the
    next one is scanned at verify_rate of the pace and decides: idle, or one more pass.
    One more pass runs only when it is worth its cost: when the checking interval gained
    at least min_pass_yield times the saving per ksmd CPU-second (per page scanned where
    ksmd's CPU time is unknown) that the merging phase gained on average; below that
    (guests rewriting memory leave a trickle of merges) it goes idle, whose slow scan
    still reaches the trickle (at the idle pace: hours per pass on a large host). 0 always runs the pass.
    While idle, a sweep (one full pass at the merging pace, after the end of the pass ksmd
    is in) bounds how long the idle scan's slowness is paid for: pairs the kernel's unstable
    tree lost in a pass, the trickle, and merges the kernel still counts after a write broke
    them all wait for the next sweep, not for the idle scan's hours. Sweeps are spaced to
    cost at most sweep_cpu of one core, judged by what the last phase's passes cost in
    ksmd CPU (none where ksmd's CPU time is unknown).
    With park, the last pass needed ends with ksmd stopped exactly at the pass boundary
    (pages_to_scan 0) instead of the check and the idle scan: the kernel adds a guest
    that starts later to the end of ksmd's list then, not behind a cursor part-way
    through a pass, so min_passes passes merge it rather than one more. What the passes
    left (a trickle, lost pairs) waits for the next sweep. When the daemon cannot stop
    ksmd in time at the boundary, the policy goes on as without park.
    It resumes when mergeable memory grows by resume_growth (new guests: min_passes
    again), or when the start conditions become newly true. Kernels before Linux 6.7
    count no pages scanned: there each whole pass is judged at its boundary, and the last
    pass is the check (no verify_rate interval)."""

    target_pass_seconds: float = Field(default=10.0, gt=0, le=86400)
    idle_yield: float = Field(default=1.0, ge=0, le=1000)
    min_passes: int = Field(default=2, ge=1, le=100)
    verify_rate: float = Field(default=0.1, gt=0, le=1)  # share of the pace while checking for leftovers
    idle: ScanPoint = ScanPoint(pages_to_scan=100, sleep_millisecs=1000)
    resume_growth: int = Field(default=64 * 1024 * 1024, ge=0)
    # Another full pass only when the checking interval's saving per ksmd CPU-second is at
    # least this share of the merging phase's average (0..1; 0: always pass).
    min_pass_yield: float = Field(default=0.05, ge=0, le=1)
    # While idle, one full pass (a sweep) whenever sweeps so spaced cost at most this share of
    # one core on average, judged by the last phase's ksmd CPU per pass (0..1; 0: never).
    sweep_cpu: float = Field(default=0.0, ge=0, le=1)
    # Stop ksmd exactly where the last pass needed ends (pages_to_scan 0), not check and
    # idle-scan: guests that start later merge one pass sooner.
    park: StrictBool = False

    @field_validator("min_pass_yield", "sweep_cpu", mode="before")
    @classmethod
    def _share(cls, v: Any, info: ValidationInfo) -> Any:
        """A share 0..1 written as a number; a bool or a string is a mistake, not a value."""
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:  # NaN fails 0 <= v
            name = info.field_name or ""
            what, e_g = _SHARES[name]
            raise ValueError("%s is %s: a number from 0 to 1 (%s), found %r" % (name, what, e_g, v))
        return float(v)

    @field_validator("resume_growth", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        return size(v)


class Advisor(Model):
    """Hand the scan rate to the kernel (advisor_mode=scan-time, Linux 6.9+)."""

    target_scan_time: int = _kernel_range("advisor_target_scan_time", default=200)
    max_cpu: int = _kernel_range("advisor_max_cpu", default=70)
    min_pages_to_scan: int = _kernel_range("advisor_min_pages_to_scan", default=500)
    max_pages_to_scan: int = _kernel_range("advisor_max_pages_to_scan", default=30000)

    @model_validator(mode="after")
    def _order(self) -> "Advisor":
        if self.min_pages_to_scan > self.max_pages_to_scan:
            raise ValueError("min_pages_to_scan (%d) is larger than max_pages_to_scan (%d)"
                             % (self.min_pages_to_scan, self.max_pages_to_scan))
        return self


class ScanSection(Model):
    strategy: Strategy = Strategy.step
    pages_to_scan: PagesToScan = PagesToScan()
    boost_when: List[Condition] = Field(default_factory=list)  # any: boost, else decay ("step")
    sleep_millisecs: SleepMillisecs = SleepMillisecs()
    cpu_budget: Optional[float] = Field(default=None, gt=0, le=100)  # % of one core for ksmd
    adaptive: Adaptive = Adaptive()
    advisor: Advisor = Advisor()


class Ownership(Model):
    """What to do when someone else writes a knob ksmctl set: put it back, or leave it
    for one interval (back_off) and re-assert only if it changed again by policy."""

    on_external_change: OnExternalChange = OnExternalChange.reassert


class KernelSettings(Model):
    """KSM settings that change what can merge; an unset key is left as the kernel has it.
    max_page_sharing and merge_across_nodes change only while nothing is merged: the
    daemon unmerges first when MemAvailable absorbs it (kernel/transition.py), and says
    so in its log and status. A key this kernel lacks is reported and skipped."""

    use_zero_pages: Optional[bool] = None       # empty pages map to the zero page (ksm_zero_pages)
    smart_scan: Optional[bool] = None           # skip pages that did not merge on earlier passes
    merge_across_nodes: Optional[bool] = None   # merge identical pages of different NUMA nodes
    max_page_sharing: Optional[int] = Field(default=None, ge=BY_NAME["max_page_sharing"].lo,
                                            le=BY_NAME["max_page_sharing"].hi)

    def knobs(self) -> Dict[str, int]:
        return {name: int(value) for name, value in self if value is not None}


class Policy(Model):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    interval: float = Field(default=10.0, ge=0.1, le=3600)
    run: RunSection = RunSection(mode=RunMode.always)
    scan: ScanSection = ScanSection()
    ownership: Ownership = Ownership()
    kernel: KernelSettings = KernelSettings()
    vms: Optional[VmsSection] = None  # per-VM merge control (ksmctl/policy/vms.py)

    @field_validator("interval", mode="before")
    @classmethod
    def _interval(cls, v: Any) -> Any:
        return _duration(v)


def threshold_repr(t: Threshold) -> str:
    if t.percent is not None:
        s = "%g%%" % t.percent
    else:
        s = "%g" % t.value  # type: ignore[str-format]
    if t.at_least is not None:
        s += " (at least %d)" % t.at_least
    if t.at_most is not None:
        s += " (at most %d)" % t.at_most
    return s

