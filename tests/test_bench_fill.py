"""The KSM benchmark's fill workload without the real KSM: the plan (each guest turns some
of its unique pages into copies of OS contents at a steady rate), the achievable saving as
a function of time (exact: one page per page filled, checked against the whole count), the
guest process keeping to the plan, the metrics against a growing achievable (times, peak,
lag), and the report of the daemon's decisions after the passes."""
from __future__ import annotations

import json
import mmap
import struct
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from ksm_bench import controllers as ctl  # noqa: E402
from ksm_bench import guest_proc as gp  # noqa: E402
from ksm_bench import report  # noqa: E402
from ksm_bench.metrics import Phases, summarize  # noqa: E402
from ksm_bench.run import add_achievable  # noqa: E402
from ksm_bench.workload import (FILL, FILL_RATE, FILL_RATE_QUICK, PAGE, WORKLOADS, AchievableCurve, Guest, GuestSpec,  # noqa: E402
                                WorkloadSpec, achievable_pages, content_copies, default_workload, fill_workload,
                                quick_workload)

MIB = 1024 * 1024


def test_fill_takes_unique_pages_and_leaves_the_plan_as_it_was():
    for base, filled in ((default_workload(), fill_workload()), (quick_workload(), fill_workload(quick_workload()))):
        specs, plain = filled.guests + filled.growth, base.guests + base.growth
        assert [g.counts() for g in specs] == [g.counts() for g in plain]
        assert not any(g.scatter for g in plain)
        for g in specs:
            assert 0 < g.fill_pages <= g.counts()["unique"] and g.fill_pages == int(g.pages * FILL)
            assert g.scatter
        # nothing filled yet: the default workload's saving, to the page
        assert content_copies(filled.guests, 2) == content_copies(base.guests, 2)
        assert base.fill_per_s() == 0 and filled.fill_per_s() > filled.fill_per_s(growth=False) > 0
        # every initial guest holds the os contents the fill cycles through
        assert filled.fill_mod() == min(g.counts()["os"] for g in filled.guests) > 0
    assert WORKLOADS["fill"][0]() == fill_workload()
    assert WORKLOADS["fill"][1]() == fill_workload(quick_workload(), FILL_RATE_QUICK)
    with pytest.raises(ValueError):   # more than its unique pages
        GuestSpec(4, zero=0.1, os=0.5, app=0.1, within=0.1, churn=0.0, fill=0.3).counts()


def test_fill_rates_as_stated():
    """The rates the README states: the share of every guest's pages per second, summed."""
    w, q = WORKLOADS["fill"][0](), WORKLOADS["fill"][1]()
    assert all(g.fill_rate == FILL_RATE for g in w.guests + w.growth)
    assert all(g.fill_rate == FILL_RATE_QUICK for g in q.guests + q.growth)
    pages = sum(g.pages for g in w.guests)
    assert w.fill_per_s(growth=False) == pytest.approx(pages * FILL_RATE)
    # 0.07% of 4416 MiB per second: 791 pages/s (3.09 MiB/s), 3.90 MiB/s with the new guests;
    # 0.15% of the quick workload's 320 MiB, 0.48 MiB/s, 0.62 with its new guest
    assert w.fill_per_s(growth=False) * PAGE / MIB == pytest.approx(3.09, abs=0.01)
    assert w.fill_per_s() * PAGE / MIB == pytest.approx(3.90, abs=0.01)
    assert q.fill_per_s(growth=False) * PAGE / MIB == pytest.approx(0.48, abs=0.01)
    # the cap is reached 257 s after a guest is ready: after every controller's pressure
    # phase (ksmtuned's ends about 240 s after its guests are ready)
    assert min(g.fill_pages / g.fill_per_s for g in w.guests) == pytest.approx(257, abs=1)


@pytest.mark.parametrize("make", [lambda: fill_workload(quick_workload()), fill_workload])
def test_the_achievable_grows_by_one_page_per_page_filled(make):
    w = make()
    mod = w.fill_mod()
    for guests in (w.guests, w.guests + w.growth):
        for uzp in (False, True) if make is not fill_workload else (True,):
            curve = AchievableCurve.of(guests, mod, w.families, uzp, 256)
            base = achievable_pages(guests, w.families, uzp, 256)
            assert curve.base == base
            caps = [g.fill_pages for g in guests]
            assert achievable_pages(guests, w.families, uzp, 256, caps, mod) == base + sum(caps)
    # the curve at a few moments against the exact count (the quick workload: the full one
    # takes seconds a call): before a guest starts, while filling, at and past its cap
    if make is fill_workload:
        return
    guests = w.guests + w.growth
    curve = AchievableCurve.of(guests, mod, w.families, True, 256)
    starts = [0.0, 1.5, 3.0, None]     # the growth guest not started
    for t in (0.0, 1.0, 10.0, 37.3, 100.0, 1e4):
        filled = [0 if s is None else gp.filled_pages(t - s, g.fill_per_s, g.fill_pages)
                  for s, g in zip(starts, guests)]
        assert curve.at(t, starts) == achievable_pages(guests, w.families, True, 256, filled, mod)
        assert curve.filled(t, starts) == sum(filled)
    assert curve.at(1e4, starts) == curve.base + sum(g.fill_pages for g in guests[:3])   # capped


def test_a_fill_that_would_not_save_a_page_per_page_is_refused():
    # max_page_sharing 2: os contents held by two guests fill a KSM page; a third copy needs another
    g = GuestSpec(1, zero=0.0, os=0.5, app=0.0, within=0.0, churn=0.0, fill=0.25, fill_rate=1.0)
    w = WorkloadSpec(guests=[g, g])
    assert AchievableCurve.of(w.guests, w.fill_mod(), max_page_sharing=256).base == 128
    with pytest.raises(ValueError):
        AchievableCurve.of(w.guests, w.fill_mod(), max_page_sharing=2)
    with pytest.raises(ValueError):
        content_copies(w.guests, 2, [g.fill_pages + 1, 0], w.fill_mod())


def test_filled_pages_plan_and_the_fill_writes():
    assert gp.filled_pages(-1.0, 100.0, 50) == 0 and gp.filled_pages(0.25, 100.0, 50) == 25
    assert gp.filled_pages(10.0, 100.0, 50) == 50 and gp.filled_pages(10.0, 0.0, 50) == 0
    assert [gp.fill_os_id(k, 3) for k in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    counts = dict(zero=4, osn=10, app=0, within=0, pool=1, churn=0, unique=30)
    n = sum(v for k, v in counts.items() if k != "pool")
    m = mmap.mmap(-1, n * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    first = gp.fill(m, 2, 0, 9, counts["zero"], counts["osn"], counts["app"], counts["within"], counts["pool"],
                    counts["churn"], counts["unique"])
    before = bytes(m)
    f = gp.Fill(m, first["unique"], 20, mod=7, per_s=10.0, t0=100.0)
    f.tick(99.0)
    assert f.done == 0 and bytes(m) == before
    f.tick(101.25)    # 12 pages
    assert f.done == 12
    f.tick(200.0)     # capped at 20
    assert f.done == 20
    after = bytes(m)

    def page(data: bytes, i: int) -> bytes:
        return data[i * PAGE:(i + 1) * PAGE]
    for k in range(30):
        i = first["unique"] + k
        if k < 20:   # byte for byte the os page of its content: the same in every guest
            assert page(after, i) == page(before, first["os"] + gp.fill_os_id(k, 7))
        else:
            assert page(after, i) == page(before, i)
    assert after[:first["unique"] * PAGE] == before[:first["unique"] * PAGE]


def test_a_scattered_layout_spreads_every_kind_through_the_mapping():
    for n in (24576, 114688, 262144, 7919 * 4):
        lay = gp.Layout(n, gp.scatter_stride(n))
        assert sorted(lay.offset(i) // PAGE for i in range(n)) == list(range(n))
    with pytest.raises(ValueError):
        gp.Layout(12, 4)
    counts = dict(zero=640, osn=4800, app=0, within=960, pool=4, churn=0, unique=1792)
    n = sum(v for k, v in counts.items() if k != "pool")
    lay = gp.Layout(n, gp.scatter_stride(n))   # 8192 pages
    m = mmap.mmap(-1, n * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    first = gp.fill(m, 0, 0, 1, counts["zero"], counts["osn"], counts["app"], counts["within"], counts["pool"],
                    counts["churn"], counts["unique"], lay)
    data = bytes(m)
    kinds = [struct.unpack_from("<QQQ", data, i * PAGE)[0] for i in range(n)]
    # every sixteenth of the mapping holds its share of unique pages (1792 / 16 = 112), within 3;
    # the first 50 filled pages are spread too (none of the 16 parts has more than 3 + 1)
    for part in range(16):
        assert abs(kinds[part * 512:(part + 1) * 512].count(gp.UNIQUE) - 112) <= 3
    spots = [lay.offset(first["unique"] + k) // PAGE // 512 for k in range(50)]
    assert max(spots.count(part) for part in range(16)) <= 4
    j = 7
    assert struct.unpack_from("<QQQ", data, lay.offset(first["os"] + j)) == gp.os_header(j)
    before = data
    f = gp.Fill(m, first["unique"], 50, mod=4800, per_s=1e6, t0=0.0, layout=lay)
    f.tick(1.0)
    for k in range(50):
        o = lay.offset(first["unique"] + k)
        assert m[o:o + PAGE] == before[lay.offset(first["os"] + k):lay.offset(first["os"] + k) + PAGE]


def _read(pid: int, address: int, pages: int) -> bytes:
    with open("/proc/%d/mem" % pid, "rb") as f:
        f.seek(address)
        return f.read(pages * PAGE)


def test_a_guest_process_fills_at_its_planned_rate():
    w = WorkloadSpec(guests=[GuestSpec(4, zero=0.1, os=0.5, app=0.1, within=0.1, within_pool=8, churn=0.0,
                                       fill=0.2, fill_rate=0.2, scatter=True)])   # its 204 unique pages, 204.8/s
    spec = w.guests[0]
    lay = gp.Layout(spec.pages, gp.scatter_stride(spec.pages))
    g = Guest(0, spec, w.families, 1, fill_mod=w.fill_mod()).start()
    try:
        g.wait_ready()
        assert g.clock is not None and abs(time.monotonic() - g.clock) < 5
        c = spec.counts()
        os0, u0 = c["zero"], c["zero"] + c["os"] + c["app"] + c["within"] + c["churn"]
        time.sleep(0.5)
        lo = time.monotonic()
        try:
            data = _read(g.proc.pid, g.address, spec.pages)
        except OSError as e:
            pytest.skip("cannot read the guest's memory: %s" % e)
        hi = time.monotonic()
        os_page = {struct.unpack_from("<QQQ", data, lay.offset(os0 + j)): j for j in range(c["os"])}
        done = sum(1 for k in range(c["unique"])
                   if struct.unpack_from("<QQQ", data, lay.offset(u0 + k)) in os_page)
        # the plan at the read, less the guest's 0.1 s loop (and scheduling)
        plan = (gp.filled_pages(lo - g.clock - 0.3, spec.fill_per_s, spec.fill_pages),
                gp.filled_pages(hi - g.clock, spec.fill_per_s, spec.fill_pages))
        assert plan[0] <= done <= plan[1], (done, plan)
        time.sleep(max(0.0, g.clock + 1.3 - time.monotonic()))   # past its cap
        data = _read(g.proc.pid, g.address, spec.pages)
        for k in range(c["unique"]):
            o = lay.offset(u0 + k)
            head = struct.unpack_from("<QQQ", data, o)
            if k < spec.fill_pages:
                assert head == gp.os_header(gp.fill_os_id(k, w.fill_mod()))
                src = lay.offset(os0 + head[2])
                assert data[o:o + PAGE] == data[src:src + PAGE]
            else:
                assert head[0] == gp.UNIQUE
    finally:
        g.stop()


def test_the_run_adds_the_achievable_to_its_samples():
    w = fill_workload(quick_workload())
    t0 = 1000.0
    samples = [{"t": float(t), "mono": t0 + t} for t in range(0, 60)]
    # initial guests ready 3, 2 and 1 s before the first sample; the growth guest 40 s after it
    guests = [SimpleNamespace(clock=t0 - 3.0), SimpleNamespace(clock=t0 - 2.0), SimpleNamespace(clock=t0 - 1.0),
              SimpleNamespace(clock=t0 + 40.0)]
    add_achievable(samples, w, guests[:3], True, 256)   # before the growth guest started
    c0 = AchievableCurve.of(w.guests, w.fill_mod(), w.families, True, 256)
    assert samples[10]["achievable_initial"] == c0.at(10.0, [-3.0, -2.0, -1.0])
    base1 = achievable_pages(w.guests + w.growth, 2, True)
    assert samples[10]["achievable_all"] == base1 + c0.filled(10.0, [-3, -2, -1])
    add_achievable(samples, w, guests, True, 256)
    c1 = AchievableCurve.of(w.guests + w.growth, w.fill_mod(), w.families, True, 256)
    assert samples[50]["achievable_all"] == c1.at(50.0, [-3.0, -2.0, -1.0, 40.0])
    rate = w.fill_per_s(growth=False)
    assert samples[30]["achievable_initial"] - samples[20]["achievable_initial"] == pytest.approx(10 * rate, abs=3)


def _growing():
    """Achievable 1000 pages at onset (10 s), +10 pages/s to 1500 when the new guests start
    (60 s); all guests' 2000 then, +10/s. The saving reaches 1100 at 20 s (t99: 1100 >= 0.99 x
    1100), then stays flat (an idle policy); from 60 s it merges 100 pages/s up to 2000."""
    out = []
    for t in range(0, 101):
        a0 = 900 + 10 * t
        a1 = 1400 + 10 * t
        s = min(1100.0, 110.0 * max(0, t - 10))
        if t > 60:
            s = min(2000.0, s + 100.0 * (t - 60))
        out.append({"t": float(t), "saved_pages": s, "ksmd_cpu": 0.1 * min(t, 30), "achievable_initial": a0,
                    "achievable_all": a1})
    return out


PH = Phases(onset=10.0, growth=60.0, release=90.0, end=100.0)


def test_metrics_against_a_growing_achievable():
    m = summarize(_growing(), PH, 1000, 1500, PAGE, 40.0)
    # t50: 110 (t - 10) >= 0.5 (900 + 10 t) from t = 15 (550 >= 525; 440 < 520 at 14); t90 from 19
    # (990 >= 981; 880 < 972 at 18); t99 from 20 (1100 >= 1089; 990 < 1079.1 at 19)
    assert m["t50_s"] == 5.0 and m["t90_s"] == 9.0 and m["t99_s"] == 10.0
    # peak: 1100 of the 1500 achievable at the end of pressure, 2000 of the 2300 at release
    assert m["peak_fraction"] == pytest.approx(2000 / 2300)
    assert m["release_fraction"] == pytest.approx(2000 / 2300)
    assert m["achievable_growth_mib"] == pytest.approx(500 * PAGE / MIB)
    assert m["lag_end_mib"] == pytest.approx(400 * PAGE / MIB)
    # lag over the pressure phase's second half (35 to 60 s): 150 rising to 400, linear: 275 on average
    assert m["lag_mean_mib"] == pytest.approx(275 * PAGE / MIB)
    # the new guests: 1100 + 100 (t - 60) against 0.9 x (1400 + 10 t): 1900 >= 1872 at 68, 1800 < 1863 at 67
    assert m["growth_t90_s"] == 8.0
    flat = [dict(s, saved_pages=min(s["saved_pages"], 1100.0)) for s in _growing()]
    assert summarize(flat, PH, 1000, 1500, PAGE, 40.0)["peak_fraction"] == pytest.approx(1100 / 1500)
    # without the series the same samples compare with the constants, as before
    plain = [{k: v for k, v in s.items() if not k.startswith("achievable")} for s in _growing()]
    p = summarize(plain, PH, 1000, 1500, PAGE, 40.0)
    assert p["t90_s"] == 9.0 and p["t99_s"] == 9.0 and p["peak_fraction"] == pytest.approx(2000 / 1500)
    assert p["lag_end_mib"] is None and p["lag_mean_mib"] is None
    # the lag's mean does not need t99 to be reached
    late = [dict(s, achievable_initial=s["achievable_initial"] + 200) for s in _growing()]
    q = summarize(late, PH, 1000, 1500, PAGE, 40.0)
    assert q["t99_s"] is None and q["lag_mean_mib"] == pytest.approx(475 * PAGE / MIB)


DECISIONS = [
    {"t": 12.0, "scan_rule": "merging", "reasons": ["merging: 100 mergeable pages"]},
    {"t": 30.0, "scan_rule": "merging",
     "reasons": ["2 full passes done, the last 2s still found 40.00 new merges per 1000 pages: checking at 0.1 of "
                 "the pace", "merging: ..."]},
    {"t": 32.0, "scan_rule": "idle",
     "reasons": ["still 2.10 new merges per 1000 pages while checking, but another full pass is not worth it: the "
                 "last interval gained 3.1 MiB saved per ksmd CPU-second (1.8%), the merging phase 170 on average; "
                 "a pass needs 0.05 of it (min_pass_yield): idle, whose slow scan still merges the trickle"]},
    {"t": 34.0, "scan_rule": "idle", "reasons": ["no new merges to find; idle scan"]},
    {"t": 40.0, "scan_rule": "merging",
     "reasons": ["still 9.00 new merges per 1000 pages while checking: one more pass at full pace (the last "
                 "interval gained 40 MiB saved per ksmd CPU-second (23.5%), the merging phase 170 on average; a "
                 "pass needs 0.2 of it)"]},
]


def test_report_shows_the_lag_and_the_decisions(tmp_path):
    m = summarize(_growing(), PH, 1000, 1500, PAGE, 40.0)
    run = {"controller": {"name": "ksmctl default", "interval": 2.0, "description": "d"}, "phases": PH.__dict__,
           "metrics": m, "foreign_mergeable_bytes": 0, "min_mem_available": 4 << 30,
           "achievable_pages": {"initial": 1000, "all": 1500}, "use_zero_pages": True, "max_page_sharing": 256,
           "samples": _growing(), "decisions": DECISIONS}
    ds = report.decision_summary(run)
    assert ds["checks"] == 1 and ds["more_passes"] == 1 and ds["declined"] == 1
    assert ds["weighed"] == [(22.0, "1.8", False), (30.0, "23.5", True)]
    assert ds["declined_first_s"] == 22.0 and "another full pass is not worth it" in ds["declined_first_reason"]
    assert report.decision_summary({"phases": PH.__dict__}) is None
    g = GuestSpec(1, fill=0.15, fill_rate=6e-4)
    result = {"params": {"window": 40.0, "calm": 10, "pressure": 50, "slow_factor": 2.5, "growth": 30,
                         "release": 10, "pressure_free": 0.17, "floor_gib": 3.0},
              "workload": WorkloadSpec(guests=[g]).to_dict(), "fill_pages_per_s": 10.0,
              "fill_pages_per_s_initial": 10.0,
              "machine": {"hostname": "h", "cores": 2, "cpu": "c", "mem_total_gib": 23.5, "kernel": "k",
                          "ksmtuned_package": "v", "date": "now"}, "page_size": PAGE, "runs": [run]}
    table = report.table(result)
    assert table.splitlines()[0].endswith("| lag MiB: end of pressure / mean over its second half |")
    assert table.splitlines()[2].endswith("| 2 / 1 |")    # 400 and 275 pages
    text = report.markdown(result, "p.png")
    assert "turns 0.06% of its pages per second" in text and "until 15% of its pages are" in text
    assert "grows by 10 pages per second (0.04 MiB/s)" in text
    assert "1 declined by min_pass_yield (first 22 s after onset: \"still 2.10" in text
    assert "(checks weighed, s after onset and share of the phase's yield; 22 s: 1.8% declined; 30 s: 23.5% ran " \
        "a pass)" in text
    assert "the saving's lag behind it at the end of pressure 2 MiB" in text
    lines = report.targets(result)
    assert any("**MISSED** peak >= 99% of the achievable (as it is at the end of each phase): 87.0%" in x
               for x in lines), lines


def test_a_ksmctl_controller_reads_its_decisions_from_its_trace(tmp_path):
    c = ctl.make("ksmctl:default")
    assert c.decisions() == []    # not started: no trace
    c.trace = tmp_path / "trace.jsonl"
    lines = [{"readings": {"monotonic": 100.0 + i}, "decision": {"scan_rule": d["scan_rule"], "run_rule": "keep_running",
                                                                 "reasons": d["reasons"]}}
             for i, d in enumerate(DECISIONS)]
    c.trace.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    got = c.decisions()
    assert [d["mono"] for d in got] == [100.0, 101.0, 102.0, 103.0, 104.0]
    assert got[2]["scan_rule"] == "idle" and got[2]["reasons"] == DECISIONS[2]["reasons"]
