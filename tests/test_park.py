"""Parking ksmd at a pass boundary (kernel/park.py, policy/strategies/adaptive/park.py).

The first tests judge the park's timing on a fixture tree with a clock the test moves:
whether a write lands in ksmd's sleep after a boundary depends on scheduling that a test
cannot arrange on the real kernel, so the tree stands in for ksmd there. The last two run
on this machine's real KSM: the daemon parks ksmd where its last pass ends, and a process
that starts then is scanned in the first pass after the resume (without the park it
would not be: tests/test_kernel_list_order.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ksmctl.collectors.procfs import parse_ksm_stat
from ksmctl.kernel.park import BoundaryPark, ParkOutcome
from ksmctl.kernel.sysfs import KsmSysfs
from ksmctl.kernel.writer import KsmWriter

from .daemon_proc import DaemonProc, wait_ticks
from .fixtures import make_sys
from .ksmlock import KSM, ksm_exclusive
from .mergeable import Holder, release
from .support import need_root, wait_for

REPO = Path(__file__).resolve().parent.parent


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _park(tmp_path, clock, full_scans=4, target=5):
    root = make_sys(tmp_path, {"full_scans": str(full_scans), "pages_to_scan": "1280", "run": "1"})
    sysfs = KsmSysfs(str(root))
    wrote = []
    park = BoundaryPark(sysfs, KsmWriter(sysfs), sysfs.read(), target, 50, wrote.append, clock=clock)
    return park, root / "kernel/mm/ksm", wrote


def test_the_park_writes_pages_to_scan_0_in_ksmds_sleep_after_the_boundary(tmp_path):
    clock = Clock()
    park, ksm, wrote = _park(tmp_path, clock)
    assert park.poll() is None                     # the pass runs
    (ksm / "full_scans").write_text("5\n")
    clock.t += 0.020                               # seen 20 ms after the last clear poll: in the 25 ms window
    assert park.poll() is ParkOutcome.parked
    assert (ksm / "pages_to_scan").read_text() == "0\n"
    assert [(c.knob, c.old, c.new) for c in wrote] == [("pages_to_scan", 1280, 0)]


def test_a_boundary_seen_too_late_writes_nothing(tmp_path):
    clock = Clock()
    park, ksm, wrote = _park(tmp_path, clock)
    assert park.poll() is None
    (ksm / "full_scans").write_text("5\n")
    clock.t += 0.030                               # past half of ksmd's 50 ms sleep: it may be scanning again
    assert park.poll() is ParkOutcome.late
    assert (ksm / "pages_to_scan").read_text() == "1280\n" and wrote == []


def test_a_boundary_before_the_first_poll_or_a_pass_beyond_it_is_late(tmp_path):
    clock = Clock()
    park, ksm, wrote = _park(tmp_path, clock, full_scans=5)
    assert park.poll() is ParkOutcome.late         # when it ended is unknown
    park, ksm, wrote = _park(tmp_path / "b", clock)
    assert park.poll() is None
    (ksm / "full_scans").write_text("6\n")         # two boundaries between polls: one pass too far
    assert park.poll() is ParkOutcome.late and wrote == []


def test_a_write_that_finished_late_is_taken_back(tmp_path):
    clock = Clock()
    park, ksm, wrote = _park(tmp_path, clock)
    assert park.poll() is None
    (ksm / "full_scans").write_text("5\n")
    clock.t += 0.010
    real_apply = park.writer.apply

    def slow_apply(*a, **kw):
        clock.t += 0.020                           # the write itself took 20 ms
        return real_apply(*a, **kw)
    park.writer.apply = slow_apply
    assert park.poll() is ParkOutcome.late
    assert (ksm / "pages_to_scan").read_text() == "1280\n"
    assert [(c.old, c.new) for c in wrote] == [(1280, 0), (0, 1280)]


def test_a_tick_inside_the_pass_hands_its_clear_poll_on(tmp_path):
    clock = Clock()
    earlier, ksm, _ = _park(tmp_path, clock)
    assert earlier.poll() is None
    (ksm / "full_scans").write_text("5\n")         # the boundary falls in the tick
    clock.t += 0.015
    park = BoundaryPark(earlier.sysfs, earlier.writer, earlier.state, 5, 50, lambda c: None,
                        clock=clock).carry(earlier)
    assert park.poll() is ParkOutcome.parked


def test_an_unreadable_full_scans_fails_with_its_path(tmp_path):
    clock = Clock()
    park, ksm, wrote = _park(tmp_path, clock)
    (ksm / "full_scans").write_bytes(b"\xff\xfe garbage\n")
    assert park.poll() is ParkOutcome.failed and "full_scans" in park.error and wrote == []


PARK_POLICY = """
name: test-park
interval: 0.5s
run:
  mode: conditional
  start_when: [{signal: memory_available, below: 100%}]
  stop_when: [{signal: memory_available, above: 100%}]
scan:
  strategy: adaptive
  pages_to_scan: {min: 100, max: 20000}
  sleep_millisecs: {base: 10, floor: 10}
  adaptive: {target_pass_seconds: 1, idle: {pages_to_scan: 100, sleep_millisecs: 1000}, resume_growth: 8MiB,
             park: true}
"""
LATE = 4096   # 16 MiB


def _read(name: str) -> int:
    return int((KSM / name).read_text())


def _rmap_items(pid: int) -> int:
    with open("/proc/%d/ksm_stat" % pid) as f:
        items = parse_ksm_stat(f.read()).rmap_items
    assert items is not None, "/proc/%d/ksm_stat has no ksm_rmap_items on this kernel" % pid
    return items


def test_the_daemon_parks_ksmd_at_a_boundary_and_a_new_guest_is_in_the_next_pass(tmp_path):
    need_root()
    sysfs = KsmSysfs()
    late = subprocess.Popen([sys.executable, "-m", "tests.mergeable", str(LATE), "64", "late"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(REPO))
    try:
        assert late.stdout.readline().strip() == "filled"
        with ksm_exclusive(), Holder(pages=20000, distinct=7):
            with DaemonProc(tmp_path, PARK_POLICY) as d:
                wait_for(lambda: (d.state() or {}).get("decision", {}).get("scan_rule") == "park", 90, "a park")
                assert sysfs.read().get("pages_sharing", 0) >= 19000
                assert _read("pages_to_scan") == 0
                assert "ksmd stopped at the pass boundary" in d.log_text()
                parked_at, scanned = _read("full_scans"), _read("pages_scanned")
                wait_ticks(d, 3)
                assert (_read("full_scans"), _read("pages_scanned")) == (parked_at, scanned), "parked ksmd scanned"
                late.stdin.write("go\n")
                late.stdin.flush()
                assert late.stdout.readline().startswith("ready")
                # The daemon sees 16 MiB more and resumes: the new process is at the end of
                # ksmd's list, so the first pass covers it.
                scans, first = wait_for(lambda: _read("full_scans") > parked_at and (_read("full_scans"),
                                                                                      _rmap_items(late.pid)),
                                        60, "the first boundary after the resume", interval=0.002)
                assert scans == parked_at + 1
                assert first == LATE, "ksmd's first pass after the park saw %d of the new process's pages" % first
                s = d.state()
                assert s["decision"]["scan_rule"] in ("resume", "merging", "park")
                wait_for(lambda: _read("full_scans") >= parked_at + 2 and _read("pages_to_scan") == 0, 60,
                         "two passes, then parked again")
                assert "grew by" in d.log_text()
    finally:
        release([late])
