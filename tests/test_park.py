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
import threading
from pathlib import Path

from prometheus_client.registry import CollectorRegistry

from ksmctl.collectors.host import HostCollector
from ksmctl.collectors.procfs import ProcFs, parse_ksm_stat
from ksmctl.config import Config
from ksmctl.export.metrics import MetricsCollector, render_text
from ksmctl.kernel.park import BoundaryPark, ParkOutcome
from ksmctl.kernel.sysfs import KsmSysfs
from ksmctl.kernel.writer import KsmWriter
from ksmctl.policy.loader import LoadedPolicy, parse_policy
from ksmctl.service.daemon import Daemon

from .daemon_proc import DaemonProc, adaptive_on_policy, wait_ticks
from .fixtures import make_proc, make_sys
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


ONE_PASS = """
name: one-pass
interval: 3600
run: {mode: always}
scan:
  strategy: adaptive
  pages_to_scan: {min: 100, max: 100000}
  sleep_millisecs: {base: 1000, floor: 1000}   # a 0.5 s window: a busy test host still polls in time
  adaptive: {target_pass_seconds: 1, min_passes: 1, park: true}
"""


def _fixture_daemon(tmp_path, dry_run=False, restore=False):
    """The daemon on a fixture tree; the test plays ksmd by writing full_scans."""
    empty = {n: "0" for n in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")}
    sys_root = make_sys(tmp_path / "sys", {"run": "0", "full_scans": "7", "pages_to_scan": "100", **empty})
    collector = HostCollector(KsmSysfs(str(sys_root)), ProcFs(str(make_proc(tmp_path / "proc"))))
    lp = LoadedPolicy(parse_policy(ONE_PASS, "one-pass.yaml"), "one-pass.yaml", "0" * 64)
    d = Daemon(Config(state_file=str(tmp_path / "state.json"), restore_on_exit=restore), lp, collector,
               KsmWriter(collector.sysfs, dry_run=dry_run))
    return d, sys_root / "kernel/mm/ksm"


def test_the_daemon_polls_between_ticks_and_counts_the_park_write_with_the_next_tick(tmp_path):
    d, ksm = _fixture_daemon(tmp_path)
    t = threading.Thread(target=d.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: d.ticks == 1 and d.park is not None and d.park.clear is not None, 10,
                 "the first tick, armed (one pass needed), and a poll that saw the pass running")
        assert d.last.decision.park_at == 8 and (ksm / "sleep_millisecs").read_text() == "1000\n"
        (ksm / "full_scans").write_text("8\n")          # the pass ends
        wait_for(lambda: (ksm / "pages_to_scan").read_text() == "0\n", 10, "pages_to_scan 0")
        assert d.park is None
        d.request_tick()
        wait_for(lambda: d.ticks == 2, 10, "the next tick")
        rec = d.last
        assert rec.decision.scan_rule == "park" and rec.decision.targets["pages_to_scan"] == 0
        assert [(c.knob, c.new) for c in rec.changes][:1] == [("pages_to_scan", 0)]
        assert rec.external == []                      # the park's write is ours, not drift
        assert rec.parks == [ParkOutcome.parked]
        reg = CollectorRegistry(auto_describe=False)
        MetricsCollector(reg, build={"version": "x", "python": "x"}).observe(rec)
        text = render_text(reg).decode()
        assert 'ksmctl_parks_total{outcome="parked"} 1.0' in text
        assert 'ksmctl_parks_total{outcome="late"} 0.0' in text
    finally:
        d.request_stop()
        t.join(10)


def test_a_stop_after_the_park_restores_pages_to_scan_and_a_stop_while_armed_writes_nothing_later(tmp_path):
    d, ksm = _fixture_daemon(tmp_path, restore=True)
    d.tick()
    assert d.park is not None and (ksm / "run").read_text() == "1\n"
    (ksm / "full_scans").write_text("8\n")
    d.park.clear = d.park.clock()          # the last poll saw the pass running just now
    d._poll_park()
    assert (ksm / "pages_to_scan").read_text() == "0\n"
    d.shutdown()                            # SIGTERM right after the park
    assert [(ksm / n).read_text() for n in ("run", "pages_to_scan")] == ["0\n", "100\n"]

    d, ksm = _fixture_daemon(tmp_path / "armed", restore=True)
    t = threading.Thread(target=d.run, daemon=True)
    t.start()
    wait_for(lambda: d.park is not None and d.park.clear is not None, 10, "armed, the pass running")
    d.request_stop()                        # SIGTERM while armed
    t.join(10)
    assert not t.is_alive()
    (ksm / "full_scans").write_text("8\n")  # the pass ends after the daemon stopped
    d._poll_park()                          # a poll after the stop: the park is gone with the daemon
    assert d.park is None
    assert [(ksm / n).read_text() for n in ("run", "pages_to_scan")] == ["0\n", "100\n"]


def test_a_reload_to_another_policy_disarms_the_park(tmp_path):
    d, ksm = _fixture_daemon(tmp_path)
    d.tick()
    assert d.park is not None
    other = ONE_PASS.replace("park: true", "park: false")
    d.policy_loader = lambda path: LoadedPolicy(parse_policy(other, "one-pass.yaml"), "one-pass.yaml", "1" * 64)
    assert d.reload()
    assert d.park is None
    (ksm / "full_scans").write_text("8\n")
    d._poll_park()
    assert (ksm / "pages_to_scan").read_text() != "0\n"


def test_a_dry_run_arms_no_park_and_says_what_it_would_do(tmp_path, caplog):
    d, ksm = _fixture_daemon(tmp_path, dry_run=True)
    with caplog.at_level("INFO", logger="ksmctl"):
        rec = d.tick()
    assert rec.decision.park_at == 8 and d.park is None
    assert "dry run: would stop ksmd at the end of this pass (pages_to_scan 0 at full_scans 8)" in caplog.text
    (ksm / "full_scans").write_text("8\n")
    d._poll_park()
    assert (ksm / "pages_to_scan").read_text() == "100\n"


PARK_POLICY = adaptive_on_policy("test-park", "target_pass_seconds: 1, resume_growth: 8MiB, park: true")
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
