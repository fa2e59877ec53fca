"""The KSM benchmark's trickle workload without the real KSM: its plan leaves the
achievable saving as it was, its rewrites write (so they break merges) and leave every
page's contents as they were; the stale-merge metrics and notes; and a ksmctl policy with
a setting changed (ksmctl:default:min_pass_yield=0) as a controller."""
from __future__ import annotations

import ctypes
import mmap
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from ksm_bench import controllers as ctl  # noqa: E402
from ksm_bench import guest_proc as gp  # noqa: E402
from ksm_bench import report  # noqa: E402
from ksm_bench.metrics import Phases, summarize  # noqa: E402
from ksm_bench.run import StaleMerges  # noqa: E402
from ksm_bench.workload import (PAGE, WORKLOADS, Guest, GuestSpec, WorkloadSpec, achievable_pages,  # noqa: E402
                                content_copies, default_workload, quick_workload, trickle_workload)

from ksmctl.policy.loader import parse_policy  # noqa: E402

MIB = 1024 * 1024


def test_trickle_leaves_the_achievable_saving_as_it_was():
    plain, trickled = quick_workload(), trickle_workload(quick_workload())
    for guests in (lambda w: w.guests, lambda w: w.guests + w.growth):
        assert content_copies(guests(trickled), 2) == content_copies(guests(plain), 2)
    full, full_trickled = default_workload(), trickle_workload()
    assert [g.counts() for g in full_trickled.guests + full_trickled.growth] == \
        [g.counts() for g in full.guests + full.growth]
    assert achievable_pages(full_trickled.guests, 2, True) == achievable_pages(full.guests, 2, True)
    assert plain.trickle_per_s() == 0 and trickled.trickle_per_s() > trickled.trickle_per_s(growth=False) > 0
    assert WORKLOADS["trickle"][0]() == full_trickled


def test_trickle_rate_is_small_against_the_saving():
    w = trickle_workload()
    # 2% of every guest's pages, each rewritten every 20 s: 1130 pages/s (4.4 MiB/s) from the
    # initial guests, 5.6 MiB/s with the new ones; the pool is 3.8% of the initial saving.
    assert w.trickle_per_s(growth=False) * PAGE / MIB == pytest.approx(4.4, abs=0.1)
    assert w.trickle_per_s() * PAGE / MIB == pytest.approx(5.6, abs=0.1)
    pool = sum(g.trickle_pages for g in w.guests)
    assert 0.03 < pool / achievable_pages(w.guests) < 0.05


@pytest.mark.parametrize("base", [default_workload, quick_workload])
def test_trickle_ranges_never_cover_every_copy_of_a_content(base):
    """Each guest rewrites its own range of os contents, and every content in a range is
    held by another initial guest outside every range: its KSM page keeps a mapping."""
    w = trickle_workload(base())
    ranges = w.trickle_ranges()
    specs = w.guests + w.growth
    assert len(ranges) == len(specs)
    taken = set()
    for g, (start, n) in zip(specs, ranges):
        assert n == g.trickle_pages > 0 and start + n <= g.counts()["os"]
        ids = set(range(start, start + n))
        assert not ids & taken
        taken |= ids
    for i, (start, n) in enumerate(ranges):
        for j in (start, start + n - 1):
            assert any(h != i and w.guests[h].counts()["os"] > j for h in range(len(w.guests)))
    with pytest.raises(ValueError):
        WorkloadSpec(guests=[GuestSpec(1, os=0.1, trickle=0.2)]).trickle_ranges()


def _private_dirty_kib(address: int) -> int:
    """Private_Dirty of this process's mapping that holds address (/proc/self/smaps)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        span = line.split(" ", 1)[0].split("-")
        if len(span) == 2 and all(c in "0123456789abcdef" for c in span[0] + span[1]) and \
                int(span[0], 16) <= address < int(span[1], 16):
            for x in lines[i + 1:]:
                if x.startswith("Private_Dirty:"):
                    return int(x.split()[1])
    raise AssertionError("no mapping at %x" % address)


def test_rewrites_write_the_contents_each_page_holds():
    counts = dict(zero=16, osn=200, app=30, within=40, pool=8, churn=0, unique=20)
    n = sum(v for k, v in counts.items() if k != "pool")
    m = mmap.mmap(-1, n * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    first = gp.fill(m, 3, 1, 77, counts["zero"], counts["osn"], counts["app"], counts["within"], counts["pool"],
                    counts["churn"], counts["unique"])
    assert first["os"] == 16 and first["unique"] == n - 20
    before = bytes(m)
    # os content j is the same bytes in every guest: BASE with its header
    j = 5
    page = before[(first["os"] + j) * PAGE:(first["os"] + j + 1) * PAGE]
    assert page[24:] == gp.BASE[24:] and struct.unpack_from("<QQQ", page) == gp.os_header(j)
    t = gp.Trickle(m, first["os"], 50, 60, per_s=100.0)
    t.tick(t.t0 + 0.5)     # 50 pages
    assert t.done == 50
    t.tick(t.t0 + 1.0)     # 50 more: the range wraps after 60
    assert t.done == 100 and t.pos == 40
    assert bytes(m) == before


def test_a_rewrite_breaks_a_write_protected_page():
    """A merged page is write-protected, as a private page shared with a forked child is:
    after fork, the rewrites copy exactly the trickle pages (copy-on-write), as they
    break exactly those merges, and the contents stay as they were."""
    n = 300
    m = mmap.mmap(-1, n * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_NOHUGEPAGE)   # copied page by page; and a mapping of its own (no neighbour merges into it)
    first = gp.fill(m, 0, 0, 1, 10, 200, 0, 0, 1, 0, 90)
    before = bytes(m)
    address = ctypes.addressof(ctypes.c_char.from_buffer(m))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: rewrite 100 pages of a 60-page range, report its copied pages
        try:
            base = _private_dirty_kib(address)
            t = gp.Trickle(m, first["os"], 50, 60, per_s=100.0)
            t.tick(t.t0 + 1.0)
            out = "%d %d" % (_private_dirty_kib(address) - base, bytes(m) == before)
        except BaseException as e:  # noqa: BLE001
            out = "error %r" % (e,)
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    assert out == "%d 1" % (60 * PAGE // 1024), out


def test_a_guest_process_rewrites_its_trickle_range_and_keeps_its_contents():
    w = WorkloadSpec(guests=[GuestSpec(4, zero=0.1, os=0.5, app=0.1, within=0.1, within_pool=8, churn=0.0,
                                       trickle=0.25, trickle_rate=1.0)])
    (rng,) = w.trickle_ranges()
    g = Guest(0, w.guests[0], w.families, 1, rng).start()
    try:
        g.wait_ready()
        pid, address = g.proc.pid, g.address
        assert address
        c = w.guests[0].counts()
        pages = w.guests[0].pages
        try:
            with open("/proc/%d/mem" % pid, "rb") as f:
                f.seek(address)
                before = f.read(pages * PAGE)
        except OSError as e:
            pytest.skip("cannot read the guest's memory: %s" % e)
        time.sleep(1.5)   # 256 pages per second: all 256 trickle pages at least once
        with open("/proc/%d/mem" % pid, "rb") as f:
            f.seek(address)
            after = f.read(pages * PAGE)
        assert after == before
        os0 = c["zero"]
        for j in (rng[0], rng[0] + rng[1] - 1):
            o = (os0 + j) * PAGE
            assert struct.unpack_from("<QQQ", after, o) == gp.os_header(j) and after[o + 24:o + PAGE] == gp.BASE[24:]
        # Without KSM merging anything: no merges counted, none mapped, none stale.
        s = StaleMerges([g], every=5.0)
        first = s()
        if first:
            assert first == {"guest_ksm_counted": 0, "guest_ksm_mapped": 0, "stale_merges": 0}
            assert s() == {}   # sampled every 5 s only
    finally:
        g.stop()


def _samples():
    """Saving 0 to 1000 pages by 30 s; stale merges sampled every 5 s: 0 until 30 s, then 40 (1 s
    after growth at 60 s, 80 to release at 90 s)."""
    out = []
    for t in range(0, 101):
        s = {"t": float(t), "saved_pages": min(1000.0, max(0.0, 100.0 * (t - 20))), "ksmd_cpu": 0.1 * min(t, 33)}
        if t % 5 == 0:
            s["stale_merges"] = 0.0 if t <= 30 else 40.0 if t < 60 else 80.0
        out.append(s)
    return out


def test_stale_merges_metrics_and_notes(tmp_path):
    ph = Phases(onset=10.0, growth=60.0, release=90.0, end=100.0)
    m = summarize(_samples(), ph, 1000, 1000, PAGE, 40.0)
    assert m["stale_at_growth_pages"] == 80.0 and m["stale_max_pages"] == 80.0
    # interpolated: 0 on [10, 30], ramp to 40 on [30, 35], 40 to 55, ramp to 80 by 60, 80 to 90
    assert m["stale_mean_pages"] == pytest.approx((2.5 * 40 + 20 * 40 + 5 * 60 + 30 * 80) / 80)
    plain = summarize([{k: v for k, v in s.items() if k != "stale_merges"} for s in _samples()], ph, 1000, 1000,
                      PAGE, 40.0)
    assert plain["stale_mean_pages"] is None and plain["stale_max_pages"] is None
    run = {"controller": {"name": "ksmctl default", "interval": 2.0, "description": "d"}, "phases": ph.__dict__,
           "metrics": m, "foreign_mergeable_bytes": 0, "min_mem_available": 4 << 30,
           "achievable_pages": {"initial": 1000, "all": 1000}, "use_zero_pages": False, "max_page_sharing": 256,
           "samples": _samples()}
    result = {"params": {"window": 40.0, "calm": 10, "pressure": 50, "slow_factor": 2.5, "growth": 30,
                         "release": 10, "pressure_free": 0.17, "floor_gib": 3.0},
              "workload": {"guests": [{"mib": 1}], "growth": []}, "trickle_pages_per_s": 256.0,
              "machine": {"hostname": "h", "cores": 2, "cpu": "c", "mem_total_gib": 23.5, "kernel": "k",
                          "ksmtuned_package": "v", "date": "now"}, "page_size": PAGE, "runs": [run]}
    text = report.markdown(result, "p.png")
    assert "rewrite 256 pages per second (1.0 MiB/s" in text
    assert "when the new guests start 80 (0.3 MiB), at most 80" in text


def test_a_policy_with_a_setting_changed_is_a_controller():
    c = ctl.make("ksmctl:default:min_pass_yield=0")
    assert c.name == "ksmctl default min_pass_yield=0" and c.interval == 2.0
    assert "scan.adaptive.min_pass_yield=0" in c.description
    shipped = parse_policy((ctl.REPO / "policies" / "default.yaml").read_text())
    changed = parse_policy(c.text)
    assert changed.scan.adaptive.min_pass_yield == 0 and shipped.scan.adaptive.min_pass_yield == 0.2
    a, b = shipped.model_dump(), changed.model_dump()
    a["scan"]["adaptive"].pop("min_pass_yield")
    b["scan"]["adaptive"].pop("min_pass_yield")
    assert a == b
    assert ctl.make("ksmctl:default:scan.adaptive.min_pass_yield=0").text == c.text
    assert ctl.make("ksmctl:default").name == "ksmctl default"
    for bad in ("ksmctl:default:min_pass_yield=2", "ksmctl:default:pages_to_scan=5", "ksmctl:default:nosuch=1",
                "ksmctl:default:min_pass_yield"):
        with pytest.raises(Exception):
            ctl.make(bad)


def test_a_setting_the_policy_file_leaves_at_its_default_can_be_changed_by_its_dotted_path():
    c = ctl.make("ksmctl:default:scan.adaptive.verify_rate=0.01")
    assert parse_policy(c.text).scan.adaptive.verify_rate == 0.01
    assert parse_policy(ctl.make("ksmctl:default:kernel.smart_scan=false").text).kernel.smart_scan is False
    for bad, says in (("ksmctl:default:verify_rate=0.01", "give its dotted path"),
                      ("ksmctl:default:scan.nosuch.x=1", "the policy has no scan.nosuch"),
                      ("ksmctl:default:name.x=1", "name is not a section"),
                      ("ksmctl:default:kernel.nosuch=1", "kernel: unknown key 'nosuch'"),
                      ("ksmctl:default:nosection.x=1", "the policy has no nosection"),
                      ("ksmctl:default:scan.adaptive.verify_rate=abc", "scan.adaptive.verify_rate")):
        with pytest.raises(Exception, match=says):
            ctl.make(bad)


@pytest.mark.parametrize("script,extra", [("run_ksm_bench.py", ["--workload", "fill"]), ("run_guest_bench.py", [])])
def test_the_benches_name_a_bad_controller_without_a_traceback(script, extra):
    for bad, says in (("ksmctl:default:scan.adaptive.verify_rate=abc", "verify_rate"),
                      ("ksmctl:nosuch", "nosuch.yaml"), ("ksmtuned:abc", "abc"), ("bogus", "unknown controller")):
        r = subprocess.run([sys.executable, str(ctl.REPO / "bench" / script)] + extra + ["--controllers", bad],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and r.stderr.startswith("--controllers: ") and says in r.stderr


def test_targets_show_what_a_changed_setting_does():
    ph = Phases(onset=10.0, growth=60.0, release=90.0, end=100.0)

    def run(name: str, cpu_pressure: float) -> dict:
        m = summarize(_samples(), ph, 1000, 1000, PAGE, 40.0)
        m.update(cpu_pressure_s=cpu_pressure, cpu_growth_s=1.0, cpu_pressure_all_s=cpu_pressure + 1.0)
        return {"controller": {"name": name, "interval": 2.0}, "metrics": m, "phases": ph.__dict__}
    lines = report.targets({"runs": [run("ksmctl default", 3.0), run("ksmctl default min_pass_yield=0", 5.5)]})
    (line,) = [x for x in lines if "against min_pass_yield=0" in x]
    assert "pressure / growth 3.0 / 1.0 vs 5.5 / 1.0" in line and "+2.5 CPU-s with min_pass_yield=0" in line
