"""Writes results.md (tables, parameters, machine, targets) and the plot PNG."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

from .metrics import at_most, cpu_percent_series, series, value_at

GIB = 1024 ** 3
MIB = 1024 ** 2


def _n(v: Optional[float], fmt: str = "%.0f") -> str:
    return "—" if v is None else fmt % v


def _runs(result: dict) -> List[dict]:
    return list(result["runs"])


def table(result: dict) -> str:
    w = result["params"]["window"]
    head = ("| controller | pressure phase s | t50 s | t90 s | t99 s | peak %% of achievable | "
            "saving avg MiB (first %gs) | saving GiB·s (first %gs) | ksmd CPU-s first %gs | "
            "MiB per ksmd CPU-s | ksmd CPU-s calm / pressure / growth / release / total | "
            "ksmd CPU-s per GiB of peak | ksmd %% no pressure | idle after merges done s | "
            "resume after new guests s | new guests: t90 s | controller CPU-s |" % (w, w, w))
    grows = _grows(result)
    if grows:
        head += " lag MiB: end of pressure / mean over its second half |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in _runs(result):
        m = r["metrics"]
        ph = r["phases"]
        lag = " %s / %s |" % (_n(m.get("lag_end_mib")), _n(m.get("lag_mean_mib"))) if grows else ""
        lines.append("| %s | %.0f | %s | %s | %s | %s | %s | %s | %s | %s | %s / %s / %s / %s / %s | %s | %s | %s | %s | %s | %s |" % (
            r["controller"]["name"], ph["growth"] - ph["onset"],
            _n(m["t50_s"]), _n(m["t90_s"]), _n(m["t99_s"]),
            _n(None if m["peak_fraction"] is None else 100 * m["peak_fraction"], "%.1f"),
            _n(m["saving_avg_mib"]), _n(m["saving_integral_gib_s"], "%.1f"), _n(m["cpu_window_s"], "%.1f"),
            _n(m["mib_per_cpu_s"]),
            _n(m["cpu_calm_s"], "%.1f"), _n(m["cpu_pressure_s"], "%.1f"), _n(m["cpu_growth_s"], "%.1f"),
            _n(m["cpu_release_s"], "%.1f"), _n(m["cpu_total_s"], "%.1f"),
            _n(m["cpu_s_per_gib_peak"], "%.1f"), _n(m["cpu_no_pressure_percent"], "%.1f"),
            _n(m["quiet_after_done_s"]), _n(m["resume_s"]), _n(m["growth_t90_s"]),
            _n(m.get("controller_cpu_s"), "%.1f")) + lag)
    return "\n".join(lines)


def _grows(result: dict) -> bool:
    """Whether the achievable saving grew during the runs (guests filling pages)."""
    return any(r["metrics"].get("lag_end_mib") is not None for r in _runs(result))


DECLINED = "another full pass is not worth it"
ONE_MORE = "one more pass at full pace"
CHECKING = "checking at"
WEIGHED = re.compile(r"\(([0-9.]+)%\), the merging phase")  # worth.Worth.describe's share


def decision_summary(run: dict) -> Optional[Dict[str, Any]]:
    """What a ksmctl run's daemon decided after the passes every page needs (its trace):
    how many checks, how many more passes, how many declined by min_pass_yield, each with
    the first one's time (s since pressure onset) and reason. None for other controllers."""
    ds = run.get("decisions")
    if ds is None:
        return None
    on = run["phases"]["onset"]
    out: Dict[str, Any] = {}
    for key, phrase in (("checks", CHECKING), ("more_passes", ONE_MORE), ("declined", DECLINED)):
        hits = [(d["t"], r) for d in ds for r in d["reasons"] if phrase in r]
        out[key] = len(hits)
        out[key + "_first_s"] = hits[0][0] - on if hits else None
        out[key + "_first_reason"] = hits[0][1] if hits else None
    out["weighed"] = [(d["t"] - on, m.group(1), ONE_MORE in r) for d in ds for r in d["reasons"]
                      if (ONE_MORE in r or DECLINED in r) for m in [WEIGHED.search(r)] if m]
    return out


def decision_note(run: dict) -> Optional[str]:
    """The notes' line on what the daemon decided after the passes, with every check that
    weighed a pass: its share of the merging phase's yield, and whether the pass ran."""
    ds = decision_summary(run)
    if ds is None:
        return None
    weighed = "".join("; %.0f s: %s%% %s" % (t, share, "ran a pass" if ran else "declined")
                      for t, share, ran in ds["weighed"])
    return "after the passes: %d checks, %d more passes, %d declined by min_pass_yield%s%s" % (
        ds["checks"], ds["more_passes"], ds["declined"],
        "" if ds["declined_first_s"] is None else " (first %.0f s after onset: \"%s\")" % (
            ds["declined_first_s"], ds["declined_first_reason"]),
        "" if not weighed else " (checks weighed, s after onset and share of the phase's yield%s)" % weighed)


def _by(result: dict, name: str) -> Optional[dict]:
    for r in _runs(result):
        if r["controller"]["name"] == name:
            return r["metrics"]
    return None


def targets(result: dict, policy: str = "ksmctl default") -> List[str]:
    """The issue's targets for the default policy, checked against this run."""
    d = _by(result, policy)
    kt = _by(result, "ksmtuned default")
    kt10 = _by(result, "ksmtuned 10s")
    adv = _by(result, "kernel advisor")
    fl = _by(result, "floor")
    out: List[str] = []
    if d is None:
        return ["(%s was not run)" % policy]

    def row(ok: Optional[bool], text: str) -> None:
        out.append("- %s %s" % ({True: "**HOLDS**", False: "**MISSED**", None: "n/a"}[ok], text))

    if kt is not None:
        if d["t90_s"] is None:
            row(False, "90%% sooner than ksmtuned default: %s never reached 90%%" % policy)
        elif kt["t90_s"] is None:
            ph = next(r["phases"] for r in _runs(result) if r["controller"]["name"] == "ksmtuned default")
            bound = ph["growth"] - ph["onset"]
            row(True if 6 * d["t90_s"] <= bound else None,
                "90%% at least 6x sooner than ksmtuned default: %.0f s; ksmtuned default did not reach 90%% "
                "within its %.0f s pressure phase (so at least %.1fx)" % (d["t90_s"], bound, bound / max(d["t90_s"], 1)))
        else:
            ratio = kt["t90_s"] / max(d["t90_s"], 1.0)
            row(ratio >= 6, "90%% at least 6x sooner than ksmtuned default: %.0f s vs %.0f s (%.1fx)"
                % (d["t90_s"], kt["t90_s"], ratio))
    row(d["peak_fraction"] is not None and d["peak_fraction"] >= 0.99,
        "peak >= 99%% of the achievable%s: %.1f%%" % (
            " (as it is at the end of each phase)" if d.get("lag_end_mib") is not None else "",
            100 * (d["peak_fraction"] or 0)))
    rf = d.get("release_fraction")
    if rf is not None:
        row(rf >= 0.99, "new guests merged too: at release, %.1f%% of the achievable with all guests" % (100 * rf))
    rivals = [(n, x["mib_per_cpu_s"]) for n, x in (("ksmtuned default", kt), ("ksmtuned 10s", kt10),
                                                   ("kernel advisor", adv)) if x and x["mib_per_cpu_s"]]
    if rivals and d["mib_per_cpu_s"]:
        best = max(rivals, key=lambda x: x[1])
        row(d["mib_per_cpu_s"] >= 2.5 * best[1], "MiB per ksmd CPU-s at least 2.5x the better of ksmtuned "
            "and the advisor: %.0f vs %.0f (%s, %.1fx)" % (d["mib_per_cpu_s"], best[1], best[0],
                                                         d["mib_per_cpu_s"] / best[1]))
    # CPU per GiB of peak: at most 0.9x ksmtuned's (defaults), at most 1.2x the floor (the
    # merges themselves: two passes at full pace from pressure onset, controllers.FloorController).
    for n, x, factor in (("ksmtuned default", kt, 0.9), ("ksmtuned 10s", kt10, 1.0), ("floor", fl, 1.2)):
        if x and x["cpu_s_per_gib_peak"] and d["cpu_s_per_gib_peak"]:
            row(at_most(d["cpu_s_per_gib_peak"], x["cpu_s_per_gib_peak"], factor),
                "ksmd CPU-s per GiB of peak at most %gx %s: %.1f vs %.1f (%.2fx)"
                % (factor, n, d["cpu_s_per_gib_peak"], x["cpu_s_per_gib_peak"],
                   d["cpu_s_per_gib_peak"] / x["cpu_s_per_gib_peak"]))
    out += variants(result, policy)
    pol_interval = None
    for r in _runs(result):
        if r["controller"]["name"] == policy:
            pol_interval = r["controller"]["interval"]
    if pol_interval:
        # Samples are 1 s apart: a time is known to within a second.
        q = d["quiet_after_done_s"]
        row(q is not None and q <= 2 * pol_interval + 1, "ksmd under 1%% of a core within two intervals (%gs, "
            "+1 s sampling) once merges stop: %s s" % (2 * pol_interval, _n(q)))
        rs = d["resume_s"]
        row(rs is not None and rs <= 2 * pol_interval + 1, "full-speed merging within two intervals (+1 s "
            "sampling) of new guests: %s s" % _n(rs))
    return out


def variants(result: dict, policy: str = "ksmctl default") -> List[str]:
    """What a changed setting does, for every run of `policy` with settings changed
    (controllers.make: 'ksmctl:default:min_pass_yield=0', named 'ksmctl default
    min_pass_yield=0'): ksmd CPU and the saving reached, against the policy as shipped."""
    d = _by(result, policy)
    out: List[str] = []
    if d is None:
        return out
    for r in _runs(result):
        name = r["controller"]["name"]
        if not name.startswith(policy + " "):
            continue
        v = r["metrics"]
        setting = name[len(policy) + 1:]

        def cpu(m: dict) -> str:
            return "%s / %s" % (_n(m["cpu_pressure_s"], "%.1f"), _n(m["cpu_growth_s"], "%.1f"))
        diff = None
        if d["cpu_pressure_all_s"] is not None and v["cpu_pressure_all_s"] is not None:
            diff = v["cpu_pressure_all_s"] - d["cpu_pressure_all_s"]
        out.append("- %s against %s: ksmd CPU-s pressure / growth %s vs %s (onset to release %s vs %s: %s CPU-s "
                   "with %s); peak %s%% vs %s%%, at release %s%% vs %s%% of the achievable" % (
                       policy, setting, cpu(d), cpu(v), _n(d["cpu_pressure_all_s"], "%.1f"),
                       _n(v["cpu_pressure_all_s"], "%.1f"), _n(diff, "%+.1f"), setting,
                       _n(_pct(d["peak_fraction"]), "%.1f"), _n(_pct(v["peak_fraction"]), "%.1f"),
                       _n(_pct(d.get("release_fraction")), "%.1f"), _n(_pct(v.get("release_fraction")), "%.1f")))
        if d.get("lag_end_mib") is not None and v.get("lag_end_mib") is not None:
            out[-1] += ("; the saving's lag behind the growing achievable at the end of pressure %s vs %s MiB, "
                        "its mean over the pressure phase's second half %s vs %s MiB" % (_n(d["lag_end_mib"]), _n(v["lag_end_mib"]),
                                                            _n(d.get("lag_mean_mib")), _n(v.get("lag_mean_mib"))))
    return out


def _pct(v: Optional[float]) -> Optional[float]:
    return None if v is None else 100.0 * v


def markdown(result: dict, plot_name: str, elapsed: Optional[float] = None) -> str:
    p, mach, wl = result["params"], result["machine"], result["workload"]
    r0 = _runs(result)[0] if _runs(result) else None
    page = result["page_size"]
    parts = ["# ksmctl against what hosts run today: KSM benchmark results", ""]
    if result.get("workload_name"):
        parts.append("Workload variant: **%s** (bench/ksm_bench/workload.py WORKLOADS)." % result["workload_name"])
        parts.append("")
    parts.append("Machine: %s, %s cores (%s), %.1f GiB RAM, kernel %s; ksmtuned package %s; %s." % (
        mach["hostname"], mach["cores"], mach["cpu"], mach["mem_total_gib"], mach["kernel"],
        mach["ksmtuned_package"], mach["date"]))
    if elapsed is not None:
        parts.append("Run took %.1f minutes." % (elapsed / 60))
    parts.append("")
    if r0:
        a = r0["achievable_pages"]
        parts.append("Workload: %d guests (%.2f GiB) from the start, %d more (%.2f GiB) during pressure; "
                     "achievable saving %.2f GiB, then %.2f GiB (use_zero_pages=%d, max_page_sharing=%d). "
                     "Pressure: a ballast holds free memory (MemFree+Buffers+Cached) at %.0f%% of MemTotal, "
                     "MemAvailable never below %g GiB." % (
                         len(wl["guests"]), sum(g["mib"] for g in wl["guests"]) / 1024.0,
                         len(wl["growth"]), sum(g["mib"] for g in wl["growth"]) / 1024.0,
                         a["initial"] * page / GIB, a["all"] * page / GIB, r0["use_zero_pages"],
                         r0["max_page_sharing"], 100 * p["pressure_free"], p["floor_gib"]))
        parts.append("")
        per_s = result.get("trickle_pages_per_s")
        if per_s:
            parts.append("Trickle: the guests rewrite %.0f pages per second (%.1f MiB/s, all guests) with the contents "
                         "they hold: a write breaks a merge, ksmd's next look merges the page again. The kernel counts "
                         "a broken merge until that look, so the saving in the table does not dip; the notes give the "
                         "merges the guests had lost at that moment (stale: counted, no longer mapped)."
                         % (per_s, per_s * page / MIB))
            parts.append("")
        fill = result.get("fill_pages_per_s")
        if fill:
            init = result.get("fill_pages_per_s_initial") or 0.0
            parts.append("Fill: from when it is ready, every guest turns %.2g%% of its pages per second (from its "
                         "unique pages, until %.0f%% of its pages are) into copies of OS contents the other guests "
                         "hold: the achievable saving grows by %.0f pages per second (%.2f MiB/s) from the initial "
                         "guests, %.2f MiB/s with the new ones (achievable_initial and achievable_all in the "
                         "samples). t50/t90/t99 are the first moment the saving reaches that share of what is "
                         "achievable at that moment; peak %% compares the saving with what is achievable at the end "
                         "of its phase (the initial guests' when the new guests start, all guests' at release); "
                         "the lag is the achievable less the saving, at the end of the pressure phase and on "
                         "average over its second half." % (
                             100 * max(g.get("fill_rate", 0.0) for g in wl["guests"]),
                             100 * max(g.get("fill", 0.0) for g in wl["guests"]), init, init * page / MIB,
                             fill * page / MIB))
            parts.append("")
        parts.append("Phases: calm %gs, pressure %gs (at least %gx the controller's interval), new guests "
                     "%gs, release %gs. Window for the per-window columns: the first %gs of pressure." % (
                         p["calm"], p["pressure"], p["slow_factor"], p["growth"], p["release"], p["window"]))
    parts += ["", table(result), "", "![saving and ksmd CPU](%s)" % plot_name, "", "## Targets (policies/default.yaml)", ""]
    parts += targets(result)
    parts += ["", "## Notes", ""]
    for r in _runs(result):
        notes = []
        if r["foreign_mergeable_bytes"] > 64 * MIB:
            notes.append("%.0f MiB of other mergeable memory on the host" % (r["foreign_mergeable_bytes"] / MIB))
        notes.append("MemAvailable min %.1f GiB" % (r["min_mem_available"] / GIB))
        vol = r["metrics"].get("volatile_mean_pages")
        if vol is not None:
            notes.append("pages_volatile mean under pressure %.0f (%.0f MiB)" % (vol, vol * page / MIB))
        settled = r["metrics"].get("volatile_settled_pages")
        if settled is not None:
            notes.append("pages_volatile when the new guests start %.0f (%.0f MiB)" % (settled, settled * page / MIB))
        st = r["metrics"]
        if st.get("stale_max_pages") is not None:
            notes.append("stale merges (a write broke them, the kernel still counts them) mean under pressure %.0f "
                         "(%.1f MiB), when the new guests start %.0f (%.1f MiB), at most %.0f (%.1f MiB)" % (
                             st["stale_mean_pages"], st["stale_mean_pages"] * page / MIB,
                             st["stale_at_growth_pages"], st["stale_at_growth_pages"] * page / MIB,
                             st["stale_max_pages"], st["stale_max_pages"] * page / MIB))
        if st.get("lag_end_mib") is not None:
            notes.append("achievable grew by %.0f MiB in the pressure phase; the saving's lag behind it at the end of "
                         "pressure %.0f MiB, mean over the phase's second half %s MiB" % (
                             st["achievable_growth_mib"], st["lag_end_mib"], _n(st.get("lag_mean_mib"))))
        decided = decision_note(r)
        if decided is not None:
            notes.append(decided)
        parts.append("- %s (%s): %s" % (r["controller"]["name"], r["controller"]["description"], "; ".join(notes)))
    parts.append("")
    return "\n".join(parts)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 9), sharex=True)
    page = result["page_size"]
    colors = plt.get_cmap("tab20").colors + plt.get_cmap("tab20b").colors
    for i, r in enumerate(_runs(result)):
        s = r["samples"]
        on = r["phases"]["onset"]
        ts, saved = series(s, "saved_pages")
        name = r["controller"]["name"]
        style = "-" if name.startswith("ksmctl") else "--"
        width = 2.2 if name == "ksmctl default" else 1.2
        line, = ax1.plot([t - on for t in ts], [v * page / GIB for v in saved], label=name,
                         color=colors[(2 * i) % 20 if i < 10 else 20 + i], linestyle=style, linewidth=width)
        cts, cpu = series(s, "ksmd_cpu")
        pt, pv = cpu_percent_series(cts, cpu)
        # 3-sample moving average: ksmd CPU time has 10 ms resolution.
        sm = [sum(pv[max(0, i - 2):i + 1]) / len(pv[max(0, i - 2):i + 1]) for i in range(len(pv))]
        ax2.plot([t - on for t in pt], sm, color=line.get_color(), label=name, linestyle=style, linewidth=width)
        sts, stale = series(s, "stale_merges")
        if sts:   # the saving really held: the kernel's count less the merges writes broke since
            real = [(v - (value_at(sts, stale, t) or 0.0)) * page / GIB for t, v in zip(ts, saved)]
            ax1.plot([t - on for t in ts], real, color=line.get_color(), linestyle=":", linewidth=width)
        gr = r["phases"]["growth"] - on
        ax1.axvline(gr, color=line.get_color(), alpha=0.2, linestyle=":")
    if _runs(result):
        r0 = _runs(result)[0]
        a0 = r0["achievable_pages"]["initial"] * page / GIB
        a1 = r0["achievable_pages"]["all"] * page / GIB
        on, gr = r0["phases"]["onset"], r0["phases"]["growth"]
        t0, v0 = series(r0["samples"], "achievable_initial")
        t1, v1 = series(r0["samples"], "achievable_all")
        if t0:   # growing (guests fill pages): the first run's, the others' differ by their setup times
            ax1.plot([t - on for t in t0 if t < gr], [v * page / GIB for t, v in zip(t0, v0) if t < gr], color="k",
                     linestyle="--", linewidth=0.8,
                     label="achievable (initial guests; %s's run)" % r0["controller"]["name"])
            ax1.plot([t - on for t in t1 if t >= gr], [v * page / GIB for t, v in zip(t1, v1) if t >= gr],
                     color="gray", linestyle="--", linewidth=0.8, label="achievable (all guests)")
        else:
            ax1.axhline(a0, color="k", linestyle="--", linewidth=0.8, label="achievable (initial guests)")
            ax1.axhline(a1, color="gray", linestyle="--", linewidth=0.8, label="achievable (all guests)")
    ax1.axvline(0, color="k", linewidth=0.8)
    ax2.axvline(0, color="k", linewidth=0.8)
    ax1.set_ylabel("saving (GiB): pages_sharing + ksm_zero_pages\n(dotted: less the stale merges)")
    ax2.set_ylabel("ksmd CPU (% of one core, 3 s average)")
    ax2.set_xlabel("seconds since pressure onset (dotted: more guests start)")
    ax1.legend(fontsize=8, ncol=2)
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)


def write(result: dict, out: Path, elapsed: Optional[float] = None) -> Dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    png = out / "ksm_bench.png"
    plot(result, png)
    md = out / "results.md"
    md.write_text(markdown(result, png.name, elapsed))
    meta = {k: result[k] for k in ("params", "workload", "machine", "page_size", "trickle_pages_per_s",
                                   "fill_pages_per_s", "fill_pages_per_s_initial") if k in result}
    meta["ksm_found"] = result.get("ksm_found")
    meta["elapsed_s"] = elapsed
    meta["summary"] = [{"controller": r["controller"], "phases": r["phases"], "metrics": r["metrics"],
                        "achievable_pages": r["achievable_pages"], "decisions": decision_summary(r)}
                       for r in _runs(result)]
    (out / "params.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return {"md": md, "png": png, "json": out / "params.json"}
