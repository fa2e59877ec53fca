"""Runs every controller, one after another, on the same workload, and writes the results."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from . import controllers as ctl
from .metrics import Phases, summarize
from .sampler import Sampler
from .workload import (MIB, PAGE, AchievableCurve, Ballast, Guest, WorkloadSpec, achievable_pages, ksm_pages,
                       meminfo, start_guests)

GIB = 1024 * MIB


@dataclass
class Params:
    calm: float = 10.0          # no pressure, guests running
    pressure: float = 80.0      # ballast holds free memory at the target (scaled up for slow controllers)
    slow_factor: float = 3.5    # pressure phase >= slow_factor x the controller's interval
    growth: float = 30.0        # more guests start, still under pressure
    release: float = 10.0       # ballast released
    window: float = 80.0        # comparison window from pressure onset (same for all)
    pressure_free: float = 0.17  # target free memory (MemFree+Buffers+Cached) as a share of MemTotal
    floor_gib: float = 3.0      # the ballast never lets MemAvailable fall below this
    stale_every: float = 5.0    # seconds between samples of the guests' stale merges (trickle workloads)
    controllers: List[str] = field(default_factory=lambda: list(ctl.ALL))

    def pressure_for(self, c: ctl.Controller) -> float:
        return max(self.pressure, self.slow_factor * c.interval)


def machine() -> Dict[str, object]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ksmtuned = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "ksmtuned"], capture_output=True,
                                  text=True).stdout.strip() or None
    except OSError:
        ksmtuned = None
    return {"kernel": platform.release(), "cpu": cpu, "cores": os.cpu_count(),
            "mem_total_gib": round(meminfo()["MemTotal"] / GIB, 2), "python": platform.python_version(),
            "ksmtuned_package": ksmtuned, "hostname": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def foreign_mergeable(ours: List[int]) -> int:
    """RSS of processes with mergeable memory that are not part of the workload."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in ours:
            continue
        try:
            st = Path("/proc/%s/ksm_stat" % name).read_text()
            if "ksm_mergeable: yes" in st or "ksm_merge_any: yes" in st:
                total += int(Path("/proc/%s/statm" % name).read_text().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            continue
    return total


def lead_for(c: ctl.Controller, p: Params) -> float:
    """A controller that looks every N seconds is started so that its first look after
    pressure onset falls N/2 s after it: the expected case, neither lucky nor unlucky."""
    return max(0.0, c.interval / 2.0 - p.calm) if c.interval > 2 * p.calm else 0.0


def estimate_seconds(p: Params, setup: float = 15.0) -> float:
    return sum(lead_for(c, p) + p.calm + p.pressure_for(c) + p.growth + p.release + setup
               for c in map(ctl.make, p.controllers))


def drive(c: ctl.Controller, p: Params, ballast: Ballast, workdir: Path, start_growth: Callable[[], None],
          extra: Callable[[], Dict[str, object]]) -> Tuple[List[Dict[str, object]], Phases, Optional[float]]:
    """The phases every workload runs, sampled every second: calm, pressure (the ballast
    holds), growth (start_growth starts the new guests), release. Stops the controller on
    the way out; the caller stops its guests and the ballast. The samples, the phase
    times (seconds since the first sample) and the controller's own CPU."""
    phase = ["setup"]
    sampler: Optional[Sampler] = Sampler(lambda: phase[0], extra)
    try:
        c.start(workdir)
        time.sleep(lead_for(c, p))
        phase[0] = "calm"
        sampler.start()  # type: ignore[union-attr]
        t0 = sampler.t0  # type: ignore[union-attr]
        time.sleep(p.calm)
        phase[0] = "pressure"
        onset = time.monotonic() - t0
        ballast.hold()
        c.on_phase("pressure")
        time.sleep(p.pressure_for(c))
        growth = time.monotonic() - t0
        phase[0] = "growth"
        start_growth()
        c.on_phase("growth")
        time.sleep(max(0.0, growth + p.growth - (time.monotonic() - t0)))
        phase[0] = "release"
        release = time.monotonic() - t0
        ballast.release()
        c.on_phase("release")
        time.sleep(p.release)
        samples = sampler.stop()  # type: ignore[union-attr]
        sampler = None
        return samples, Phases(onset, growth, release, float(samples[-1]["t"])), c.own_cpu()  # type: ignore[arg-type]
    finally:
        if sampler is not None:
            sampler.stop()
        c.stop()


class StaleMerges:
    """Sample fields for workloads whose guests rewrite memory with the contents it holds:
    the merges the kernel counts for the guests but that a write broke (counted minus
    mapped, workload.ksm_pages), every `every` seconds (reading them costs CPU). The
    kernel's saving (pages_sharing) goes on counting those until ksmd looks again; the
    saving is really that much smaller."""

    def __init__(self, guests: List[Guest], every: float) -> None:
        self.guests, self.every = guests, every
        self.last: Optional[float] = None

    def __call__(self) -> Dict[str, object]:
        now = time.monotonic()
        if self.last is not None and now - self.last < self.every - 0.5:
            return {}
        self.last = now
        counted = mapped = 0
        for g in list(self.guests):
            c, m = ksm_pages(g.proc.pid) if g.proc is not None else (None, None)
            if c is None or m is None:
                return {}
            counted, mapped = counted + c, mapped + m
        return {"guest_ksm_counted": counted, "guest_ksm_mapped": mapped, "stale_merges": max(0, counted - mapped)}


def run_one(c: ctl.Controller, spec: WorkloadSpec, p: Params, workdir: Path, log=print) -> Dict[str, object]:
    ctl.kernel_reset()
    mi = meminfo()
    ballast = Ballast(int(mi["MemTotal"] * p.pressure_free), int(p.floor_gib * GIB)).start()
    guests: List[Guest] = []
    try:
        nonce = int(time.time()) & 0xFFFF
        guests.extend(start_guests(spec, False, nonce))
        foreign = foreign_mergeable([g.proc.pid for g in guests] + ballast.pids)  # type: ignore
        stale = StaleMerges(guests, p.stale_every) if spec.trickle_per_s() > 0 else None

        def growth() -> None:
            guests.extend(start_guests(spec, True, nonce))

        def extra() -> Dict[str, object]:
            return dict({"ballast": ballast.rss()}, **(stale() if stale else {}))
        samples, ph, own_cpu = drive(c, p, ballast, workdir, growth, extra)
    finally:
        for g in guests:
            g.stop()
        ballast.stop()
        ctl.kernel_reset()
    uzp = bool(int(samples[0].get("use_zero_pages") or 0))
    mps = int(samples[0].get("max_page_sharing") or 256)
    a0 = achievable_pages(spec.guests, spec.families, uzp, mps)
    a1 = achievable_pages(spec.guests + spec.growth, spec.families, uzp, mps)
    if spec.fill_per_s() > 0:
        add_achievable(samples, spec, guests, uzp, mps)
    m = summarize(samples, ph, a0, a1, PAGE, p.window)
    m["controller_cpu_s"] = own_cpu
    min_avail = min(int(s["mem_available"]) for s in samples)  # type: ignore[arg-type]
    out = {"controller": c.info(), "phases": asdict(ph), "achievable_pages": {"initial": a0, "all": a1},
           "use_zero_pages": uzp, "max_page_sharing": mps, "foreign_mergeable_bytes": foreign,
           "min_mem_available": min_avail, "metrics": m, "samples": samples}
    return with_decisions(out, c, samples)


def with_decisions(out: Dict[str, object], c: ctl.Controller, samples: List[Dict[str, object]]) -> Dict[str, object]:
    """`out` with the ksmctl daemon's decisions (its trace), each timed on the samples'
    clock, when the controller keeps one; what the report's decision note reads."""
    decisions = getattr(c, "decisions", None)
    if decisions is not None:
        t0 = float(samples[0]["mono"]) - float(samples[0]["t"])  # type: ignore[arg-type]
        out["decisions"] = [dict(d, t=round(d["mono"] - t0, 3)) for d in decisions()]
    return out


def add_achievable(samples: List[Dict[str, object]], spec: WorkloadSpec, guests: List[Guest], uzp: bool,
                   mps: int) -> None:
    """The achievable saving at each sample when guests fill pages (fill workload): fields
    achievable_initial (the initial guests) and achievable_all (all guests; the growth
    guests' fill counts from when each was ready), in pages, from each guest's own clock."""
    mod = spec.fill_mod()
    c0 = AchievableCurve.of(spec.guests, mod, spec.families, uzp, mps)
    c1 = AchievableCurve.of(spec.guests + spec.growth, mod, spec.families, uzp, mps)
    t0 = float(samples[0]["mono"]) - float(samples[0]["t"])  # type: ignore[arg-type]
    starts: List[Optional[float]] = [None if g.clock is None else g.clock - t0 for g in guests]
    starts += [None] * (len(spec.guests) + len(spec.growth) - len(starts))
    for s in samples:
        t = float(s["t"])  # type: ignore[arg-type]
        s["achievable_initial"] = c0.at(t, starts[:len(spec.guests)])
        s["achievable_all"] = c1.at(t, starts)


def ksm_guard(lock: bool = True):
    """The KSM test lock for a whole run, restoring the knobs found on the way out;
    lock=False (the caller holds the lock): only the restoring. Yields the knobs found."""
    sys.path.insert(0, str(ctl.REPO))
    from tests.ksmlock import ksm_exclusive, restore, snapshot  # noqa: E402
    if lock:
        return ksm_exclusive()

    @contextlib.contextmanager
    def _restoring():
        saved = snapshot()
        try:
            yield saved
        finally:
            restore(saved)
    return _restoring()


def run_all(spec: WorkloadSpec, p: Params, out: Path, log=print, lock: bool = True) -> Dict[str, object]:
    """Every controller in p.controllers, in order. Holds the KSM test lock throughout
    (lock=False: the caller already holds it) and restores the knobs found."""
    out.mkdir(parents=True, exist_ok=True)
    result: Dict[str, object] = {"params": asdict(p), "workload": spec.to_dict(), "machine": machine(),
                                 "page_size": PAGE, "trickle_pages_per_s": spec.trickle_per_s(),
                                 "fill_pages_per_s": spec.fill_per_s(),
                                 "fill_pages_per_s_initial": spec.fill_per_s(growth=False), "runs": []}
    guard = ksm_guard(lock)
    with guard as found, tempfile.TemporaryDirectory(prefix="ksm-bench-") as tmp:
        result["ksm_found"] = found
        for i, name in enumerate(p.controllers):
            c = ctl.make(name)
            t = time.monotonic()
            log("[%d/%d] %s: pressure %gs ..." % (i + 1, len(p.controllers), c.name, p.pressure_for(c)))
            r = run_one(c, spec, p, Path(tmp) / ("c%02d" % i), log)
            m = r["metrics"]
            log("    t90 %s s, peak %.1f%%, ksmd %.1f CPU-s, %.0f MiB/CPU-s  (%.0fs)" % (
                _f(m["t90_s"]), 100 * (m["peak_fraction"] or 0), m["cpu_total_s"] or 0,
                m["mib_per_cpu_s"] or 0, time.monotonic() - t))
            result["runs"].append(r)  # type: ignore[union-attr]
            (out / "run.json").write_text(json.dumps(result))
    return result


def _f(v: Optional[float]) -> str:
    return "-" if v is None else "%.0f" % v
