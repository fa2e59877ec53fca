"""The daemon loop on fixture trees: a VM event ticks at once, a stop request ends the
loop promptly, and a tick that cannot read /proc/meminfo is skipped, not fatal."""
from __future__ import annotations

import threading

from ksmctl.collectors.host import HostCollector
from ksmctl.collectors.procfs import ProcFs
from ksmctl.kernel.sysfs import KsmSysfs
from ksmctl.config import Config
from ksmctl.service.daemon import Daemon
from ksmctl.kernel.writer import KsmWriter
from ksmctl.policy.loader import parse_policy, LoadedPolicy

from .fixtures import make_proc, make_sys
from .support import wait_for

SLOW = "name: slow\ninterval: 3600\nrun: {mode: always}\n"


def _daemon(tmp_path):
    sys_root = make_sys(tmp_path / "sys", {"run": "0"})
    proc_root = make_proc(tmp_path / "proc")
    collector = HostCollector(KsmSysfs(str(sys_root)), ProcFs(str(proc_root)))
    lp = LoadedPolicy(parse_policy(SLOW, "slow.yaml"), "slow.yaml", "0" * 64)
    d = Daemon(Config(state_file=str(tmp_path / "state.json"), restore_on_exit=True), lp, collector,
               KsmWriter(collector.sysfs))
    return d, sys_root, proc_root


def test_vm_event_ticks_at_once_and_stop_restores(tmp_path):
    d, sys_root, _ = _daemon(tmp_path)
    t = threading.Thread(target=d.run, daemon=True)
    t.start()
    wait_for(lambda: d.ticks == 1, 10, "the first tick")
    assert (sys_root / "kernel/mm/ksm/run").read_text() == "1\n"
    d.request_tick()  # what a libvirt lifecycle event does
    wait_for(lambda: d.ticks == 2, 10, "a tick right after the VM event (interval is 1 h)")
    d.request_stop()
    t.join(10)
    assert not t.is_alive()
    assert (sys_root / "kernel/mm/ksm/run").read_text() == "0\n"  # restored
    assert not (tmp_path / "state.json").exists()


def test_unreadable_meminfo_skips_the_tick(tmp_path):
    d, sys_root, proc_root = _daemon(tmp_path)
    (proc_root / "meminfo").unlink()
    rec = d.tick()
    assert not rec.ok and rec.decision is None and rec.errors[0][0] == "proc"
    assert (sys_root / "kernel/mm/ksm/run").read_text() == "0\n"  # nothing written on a skipped tick
    assert "last tick failed" in d.state_dict(rec)["status"]


GROWING = """
name: growing
run: {mode: always}
scan:
  strategy: adaptive
  adaptive: {target_pass_seconds: 4, min_passes: 2, resume_growth: 64MiB}
"""


def test_the_daemon_asks_for_coverage_after_growth_and_the_next_boundary_answers(tmp_path):
    """Growth while ksmd holds pages counts a pass more; the daemon then has the collector
    read, at the next boundary, whether ksmd saw the grown memory, and the decision that
    drops the pass says so. Only then: the smaps walk is not for every tick."""
    import os
    page = os.sysconf("SC_PAGE_SIZE")
    mg_kib = 150 * 1024
    procs = {100: {"ksm_stat": "ksm_rmap_items %d\nksm_mergeable: yes\n" % (mg_kib * 1024 // page),
                   "statm": "50000 1000 10 1 0 900 0\n",
                   "smaps": "7f0000000000-7f0040000000 rw-p 00000000 00:00 0\nAnonymous: %d kB\n"
                            "VmFlags: rd wr mr mw me ac sd mg\n" % mg_kib}}
    held = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")
    sys_root = make_sys(tmp_path / "sys", {name: "0" for name in held})   # ksmd holds nothing yet
    proc_root = make_proc(tmp_path / "proc", processes=procs)
    collector = HostCollector(KsmSysfs(str(sys_root)), ProcFs(str(proc_root)))
    lp = LoadedPolicy(parse_policy(GROWING, "growing.yaml"), "growing.yaml", "0" * 64)
    d = Daemon(Config(state_file=str(tmp_path / "state.json")), lp, collector, KsmWriter(collector.sysfs))
    asked = []   # coverage_wanted, as the daemon passes it to each tick's collect()
    real = collector.collect

    def collect(coverage_wanted=False):
        asked.append(coverage_wanted)
        return real(coverage_wanted)
    collector.collect = collect
    ksm = sys_root / "kernel/mm/ksm"
    d.tick()
    assert asked == [False] and d.engine.adaptive.need_passes == 2
    for name in held:                                   # part-way through a pass now
        (ksm / name).write_text("1000\n")
    grown = 1000 + 100 * 1024 * 1024 // page
    (proc_root / "100/statm").write_text("50000 %d 10 1 0 900 0\n" % grown)
    rec = d.tick()
    assert "grew by" in rec.decision.reason and d.engine.adaptive.need_passes == 3
    assert asked == [False, False]
    (ksm / "full_scans").write_text("10\n")
    (ksm / "pages_scanned").write_text("200000\n")
    rec = d.tick()
    assert asked == [False, False, True]
    assert rec.readings.coverage is not None and rec.readings.coverage.processes == 1
    assert "it counts, 2 passes, not 3" in rec.decision.reason and d.engine.adaptive.need_passes == 2
    d.tick()
    assert asked == [False, False, True, False]
    d.shutdown()
