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
