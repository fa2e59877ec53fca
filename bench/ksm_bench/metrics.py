"""Summary metrics of one controller's run: pure functions over the sampled series.

A run is a list of samples (dicts with at least t, saved_pages and ksmd_cpu) and its
phase boundaries in seconds since the run started:

    calm [0, onset)  pressure [onset, growth)  growth [growth, release)  release [release, end]

`growth` is when more guests start (still under pressure). A0 is the achievable saving
(pages) of the initial guests, A1 of all guests. The comparison window is
[onset, onset + window]: the same length for every controller.

On workloads whose achievable saving grows (guests filling pages: the samples' fields
achievable_initial and achievable_all), A0 and A1 are functions of time: a time to a
fraction of the achievable is the first moment the saving reaches that fraction of what is
achievable at that moment; the peak compares the saving with what is achievable at the end
of its phase (A0 when the new guests start, A1 at release), so a saving that stops
following a growing achievable shows there; and the lag is A0(t) - saving(t), when the new
guests start and on average over the second half of the pressure phase.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

MIB = 1024 * 1024
GIB = 1024 * MIB


@dataclass(frozen=True)
class Phases:
    onset: float
    growth: float
    release: float
    end: float

    def bounds(self) -> Dict[str, Tuple[float, float]]:
        return {"calm": (0.0, self.onset), "pressure": (self.onset, self.growth),
                "growth": (self.growth, self.release), "release": (self.release, self.end)}


def series(samples: Sequence[dict], key: str) -> Tuple[List[float], List[float]]:
    ts, vs = [], []
    for s in samples:
        v = s.get(key)
        if v is not None:
            ts.append(float(s["t"]))
            vs.append(float(v))
    return ts, vs


def value_at(ts: Sequence[float], vs: Sequence[float], t: float) -> Optional[float]:
    """Linear interpolation; clamped to the first/last value outside the series."""
    if not ts:
        return None
    if t <= ts[0]:
        return vs[0]
    if t >= ts[-1]:
        return vs[-1]
    lo, hi = 0, len(ts) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ts[mid] <= t:
            lo = mid
        else:
            hi = mid
    t0, t1 = ts[lo], ts[hi]
    if t1 == t0:
        return vs[hi]
    return vs[lo] + (vs[hi] - vs[lo]) * (t - t0) / (t1 - t0)


def delta(ts: Sequence[float], vs: Sequence[float], a: float, b: float) -> Optional[float]:
    """Growth of a counter between a and b."""
    va, vb = value_at(ts, vs, a), value_at(ts, vs, b)
    return None if va is None or vb is None else vb - va


def integral(ts: Sequence[float], vs: Sequence[float], a: float, b: float) -> float:
    """Trapezoidal integral of the interpolated series over [a, b]."""
    if not ts or b <= a:
        return 0.0
    pts = [a] + [t for t in ts if a < t < b] + [b]
    vals = [value_at(ts, vs, t) for t in pts]
    return sum((pts[i + 1] - pts[i]) * (vals[i] + vals[i + 1]) / 2.0  # type: ignore[operator]
               for i in range(len(pts) - 1))


def first_reaching(ts: Sequence[float], vs: Sequence[float], level: Union[float, Callable[[float], float]],
                   a: float, b: float) -> Optional[float]:
    """First sample time in [a, b] whose value is >= level (a value reached before a counts at
    a); level may be a function of time (the level at each sample's time)."""
    for t, v in zip(ts, vs):
        if t > b:
            break
        if v >= (level(t) if callable(level) else level):
            return max(t, a)
    return None


def quiet_after(cts: Sequence[float], cvs: Sequence[float], start: float, end: float,
                limit_percent: float = 1.0, window: float = 5.0) -> Optional[float]:
    """Seconds from `start` until ksmd's CPU stays under limit_percent of a core: the
    first sample time t >= start such that every `window`-second span from t on (until
    `end`) averages below the limit. None if that never happens before end - window."""
    cand = [t for t in cts if start <= t <= end - window]
    for t in cand:
        ok = True
        for u in [x for x in cts if t <= x <= end - window]:
            d = delta(cts, cvs, u, u + window)
            if d is not None and d / window * 100.0 >= limit_percent:
                ok = False
                break
        if ok:
            return t - start
    return None


def mean_over(ts: Sequence[float], vs: Sequence[float], a: float, b: float) -> Optional[float]:
    """Time-weighted mean of the interpolated series over [a, b]; None without samples."""
    if not ts or b <= a:
        return None
    return integral(ts, vs, a, b) / (b - a)


def at_most(value: Optional[float], reference: Optional[float], factor: float) -> Optional[bool]:
    """value <= factor x reference; None when either is unknown (the target cannot be checked)."""
    if value is None or reference is None:
        return None
    return value <= factor * reference


def cpu_percent_series(cts: Sequence[float], cvs: Sequence[float]) -> Tuple[List[float], List[float]]:
    """ksmd CPU in % of one core between consecutive samples (stamped at the later one)."""
    out_t, out_v = [], []
    for i in range(1, len(cts)):
        dt = cts[i] - cts[i - 1]
        if dt > 0:
            out_t.append(cts[i])
            out_v.append(max(0.0, (cvs[i] - cvs[i - 1]) / dt * 100.0))
    return out_t, out_v


def summarize(samples: Sequence[dict], ph: Phases, a0_pages: int, a1_pages: int, page_size: int,
              window: float) -> Dict[str, Optional[float]]:
    """All summary metrics of one run (None where a metric does not apply)."""
    ts, saved = series(samples, "saved_pages")
    sb = [v * page_size for v in saved]   # bytes
    cts, cpu = series(samples, "ksmd_cpu")
    a0, a1 = a0_pages * page_size, a1_pages * page_size
    m: Dict[str, Optional[float]] = {}
    # The achievable (bytes) at time t: constant, or the samples' series where it grows.
    ach0, ach1 = achievable_at(samples, "achievable_initial", page_size), achievable_at(samples, "achievable_all",
                                                                                       page_size)
    grows = ach0 is not None
    a0_end = ach0(ph.growth) if ach0 else a0      # the initial guests' achievable at the end of pressure
    a1_end = ach1(ph.release) if ach1 else a1     # all guests' achievable at release

    def reach(frac: float) -> Optional[float]:
        level = (lambda t: frac * ach0(t)) if ach0 else frac * a0  # type: ignore[misc]
        t = first_reaching(ts, sb, level, ph.onset, ph.growth)
        return None if t is None else t - ph.onset

    m["t50_s"] = reach(0.5)
    m["t90_s"] = reach(0.9)
    m["t99_s"] = reach(0.99)
    for name, (a, b) in ph.bounds().items():
        m["cpu_%s_s" % name] = delta(cts, cpu, a, b)
    m["cpu_total_s"] = delta(cts, cpu, 0.0, ph.end)
    quiet_len = ph.onset + (ph.end - ph.release)
    quiet_cpu = (delta(cts, cpu, 0.0, ph.onset) or 0.0) + (delta(cts, cpu, ph.release, ph.end) or 0.0)
    m["cpu_no_pressure_percent"] = quiet_cpu / quiet_len * 100.0 if quiet_len > 0 and cts else None

    w_end = min(ph.onset + window, ph.growth)
    w_len = w_end - ph.onset
    integ = integral(ts, sb, ph.onset, w_end)
    m["saving_integral_gib_s"] = integ / GIB
    m["saving_avg_mib"] = integ / w_len / MIB if w_len > 0 else None
    w_cpu = delta(cts, cpu, ph.onset, w_end)
    m["cpu_window_s"] = w_cpu
    m["mib_per_cpu_s"] = (m["saving_avg_mib"] / w_cpu) if (w_cpu and m["saving_avg_mib"] is not None) else None

    # Peak as a fraction of what was achievable at that moment.
    peak_frac, peak_bytes = 0.0, 0.0
    for t, v in zip(ts, sb):
        if t < ph.onset or t > ph.release:
            continue
        ach = a0_end if t < ph.growth else a1_end
        if ach > 0:
            peak_frac = max(peak_frac, v / ach)
        peak_bytes = max(peak_bytes, v)
    m["peak_fraction"] = peak_frac if ts else None
    # The peak may come before the new guests: what is merged when pressure ends, of all guests' achievable.
    at_release = value_at(ts, sb, ph.release)
    m["release_fraction"] = at_release / a1_end if (at_release is not None and a1_end > 0) else None
    # A growing achievable: the saving's lag behind it (MiB) when the new guests start, and its
    # mean over the second half of the pressure phase (the initial passes long done, for the
    # controllers that merge at all; the same window for every controller with the same phase).
    m["achievable_growth_mib"] = m["lag_end_mib"] = m["lag_mean_mib"] = None
    if grows and ts:
        m["achievable_growth_mib"] = (a0_end - ach0(ph.onset)) / MIB  # type: ignore[misc]
        at_growth = value_at(ts, sb, ph.growth)
        m["lag_end_mib"] = (a0_end - at_growth) / MIB if at_growth is not None else None
        half = (ph.onset + ph.growth) / 2.0
        lt = [half] + [t for t in ts if half < t < ph.growth] + [ph.growth]
        lag = [ach0(t) - (value_at(ts, sb, t) or 0.0) for t in lt]  # type: ignore[misc]
        mean = mean_over(lt, lag, lt[0], lt[-1])
        m["lag_mean_mib"] = None if mean is None else mean / MIB
    m["peak_gib"] = peak_bytes / GIB
    p_cpu = delta(cts, cpu, ph.onset, ph.release)
    m["cpu_pressure_all_s"] = p_cpu
    m["cpu_s_per_gib_peak"] = (p_cpu / (peak_bytes / GIB)) if (p_cpu is not None and peak_bytes > 0) else None
    # Pages ksmd found changed since its previous look (guests rewriting memory), under pressure.
    vts, vol = series(samples, "pages_volatile")
    m["volatile_mean_pages"] = mean_over(vts, vol, ph.onset, ph.release)
    # Every page counts as volatile between ksmd's first and second look; once merging is
    # done, what stays volatile is what guests keep rewriting: the value as new guests start.
    m["volatile_settled_pages"] = value_at(vts, vol, ph.growth) if vts else None
    # Merges a write broke that the kernel still counts (guests rewriting pages with the
    # contents they hold; sampled on trickle workloads only): the saving is that much
    # smaller than pages_sharing says, until ksmd looks at those pages again.
    sts, stale = series(samples, "stale_merges")
    m["stale_mean_pages"] = mean_over(sts, stale, ph.onset, ph.release)
    m["stale_at_growth_pages"] = value_at(sts, stale, ph.growth) if sts else None
    in_run = [v for t, v in zip(sts, stale) if ph.onset <= t <= ph.release]
    m["stale_max_pages"] = max(in_run) if in_run else None

    # When merges stop: merging is done once the saving is within 1% of its pre-growth
    # maximum; then how long until ksmd stays under 1% of a core.
    pre = [(t, v) for t, v in zip(ts, sb) if ph.onset <= t < ph.growth]
    m["done_s"] = m["quiet_after_done_s"] = None
    if pre and max(v for _, v in pre) > 0:
        top = max(v for _, v in pre)
        done = next(t for t, v in pre if v >= 0.99 * top)
        m["done_s"] = done - ph.onset
        if cts:
            m["quiet_after_done_s"] = quiet_after(cts, cpu, done, ph.growth)

    # New guests during pressure: time until merging runs at full speed again (ksmd CPU
    # above half its pressure-phase peak), and until 90% of the new achievable.
    pct_t, pct_v = cpu_percent_series(cts, cpu)
    peak_pct = max([v for t, v in zip(pct_t, pct_v) if ph.onset <= t < ph.growth] or [0.0])
    m["resume_s"] = None
    if peak_pct > 5.0:
        for t, v in zip(pct_t, pct_v):
            if ph.growth < t <= ph.release and v >= 0.5 * peak_pct:
                m["resume_s"] = t - ph.growth
                break
    g90 = first_reaching(ts, sb, (lambda t: 0.9 * ach1(t)) if ach1 else 0.9 * a1,  # type: ignore[misc]
                         ph.growth, ph.release)
    m["growth_t90_s"] = None if g90 is None else g90 - ph.growth
    return m


def achievable_at(samples: Sequence[dict], key: str, page_size: int) -> Optional[Callable[[float], float]]:
    """The achievable saving (bytes) as a function of time from the samples' `key` (pages),
    interpolated between samples; None when the samples have no such series (the achievable
    is a constant)."""
    ts, vs = series(samples, key)
    if not ts:
        return None
    bs = [v * page_size for v in vs]
    return lambda t: value_at(ts, bs, t)  # type: ignore[return-value]
