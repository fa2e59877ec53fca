"""What the per-tick caches of the VM collectors must never do: show an old figure, credit
a reused pid, keep a guest that exited, or hold files of processes they no longer track.
Fixture trees (tests/lab/proctree.py) and, for the kept-file contract, real /proc."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ksmctl.collectors.procfs import ProcFs
from ksmctl.collectors.vms.libvirt import LibvirtCollector
from ksmctl.collectors.vms.qemu import QemuProcScanner
from tests.lab import proctree
from tests.support import need, terminate, wait_for

try:
    import libvirt
except ImportError:  # pragma: no cover
    libvirt = None

PAGE = os.sysconf("SC_PAGE_SIZE")


def by_name(vms) -> dict:
    return {v.name: v for v in vms}


def rewrite_ksm_stat(proc_root: Path, pid: int, merging: int) -> None:
    """In place, as the kernel's file changes: same inode, new contents."""
    text = proctree.KSM_STAT.format(rmap=merging + 10, zero=0, merging=merging, profit=merging * 4096,
                                    mergeable="yes")
    with open(proc_root / str(pid) / "ksm_stat", "r+") as f:
        f.truncate(0)
        f.write(text)


def rewrite_statm(proc_root: Path, pid: int, pages: int) -> None:
    with open(proc_root / str(pid) / "statm", "r+") as f:
        f.truncate(0)
        f.write("%d %d 100 10 0 %d 0\n" % (pages * 2, pages, pages))


def scanner_host(tmp_path: Path, kept: int = 1000):
    proc_root = tmp_path / "proc"
    for i, pid in enumerate((101, 102, 103)):
        proctree.add_process(proc_root, pid, proctree.qemu_argv("g%d" % i, "00000000-0000-4000-8000-00000000000%d" % i),
                             merging=100 * (i + 1))
    proctree.add_process(proc_root, 200, ["/usr/sbin/sshd", "-D"], ksm_stat=False)
    proc = ProcFs(str(proc_root), kept_files=kept)
    return proc_root, QemuProcScanner(proc)


@pytest.mark.parametrize("kept", [1000, 1, 0])  # every file kept open, one, none
def test_scanner_sees_a_changed_figure_at_the_next_tick(tmp_path, kept):
    proc_root, s = scanner_host(tmp_path, kept)
    first = by_name(s.collect())
    assert first["g0"].ksm.merging_pages == 100 and first["g0"].rss == 65536 * PAGE
    same = by_name(s.collect())
    assert same["g0"] is first["g0"]  # nothing changed: the very same reading
    rewrite_ksm_stat(proc_root, 101, 555)
    rewrite_statm(proc_root, 102, 4242)
    now = by_name(s.collect())
    assert now["g0"].ksm.merging_pages == 555 and now["g0"] is not first["g0"]
    assert now["g1"].rss == 4242 * PAGE
    assert now["g2"] is first["g2"]


@pytest.mark.parametrize("kept", [1000, 0])
def test_scanner_forgets_a_guest_that_exits_and_its_files(tmp_path, kept):
    proc_root, s = scanner_host(tmp_path, kept)
    assert set(by_name(s.collect())) == {"g0", "g1", "g2"}
    shutil.rmtree(proc_root / "102")
    assert set(by_name(s.collect())) == {"g0", "g2"}
    assert 102 not in s._files.pids()
    s.close()
    assert len(s._files) == 0


@pytest.mark.parametrize("kept", [1000, 0])
def test_scanner_does_not_credit_a_reused_pid(tmp_path, kept):
    """A new process under a known guest's pid: an unrelated one is no guest; another
    guest's QEMU is that guest, with its own figures."""
    proc_root, s = scanner_host(tmp_path, kept)
    s.collect()
    shutil.rmtree(proc_root / "101")
    proctree.add_process(proc_root, 101, ["/usr/bin/python3", "-c", "pass"], merging=777)
    shutil.rmtree(proc_root / "102")
    proctree.add_process(proc_root, 102, proctree.qemu_argv("newcomer", "11111111-0000-4000-8000-000000000000"),
                         merging=31)
    vms = by_name(s.collect())
    assert set(vms) == {"newcomer", "g2"}
    assert vms["newcomer"].pid == 102 and vms["newcomer"].ksm.merging_pages == 31


def test_scanner_sees_a_process_that_execs_qemu(tmp_path):
    """Same pid, same /proc/<pid>: a forked child that execs QEMU later is found then."""
    proc_root, s = scanner_host(tmp_path)
    proctree.add_process(proc_root, 300, ["/usr/sbin/libvirtd"], ksm_stat=False)
    assert "late" not in by_name(s.collect())
    proctree.add_process(proc_root, 300, proctree.qemu_argv("late", None), merging=9)
    assert by_name(s.collect())["late"].ksm.merging_pages == 9


def test_kept_files_stay_within_the_budget(tmp_path):
    proc_root, s = scanner_host(tmp_path, kept=2)
    for _ in range(3):
        vms = by_name(s.collect())
    assert len(s._files) == 2 and s.proc._budget.free == 0
    assert [vms[n].ksm.merging_pages for n in ("g0", "g1", "g2")] == [100, 200, 300]
    s.close()
    assert s.proc._budget.free == 2


def test_link_check_is_the_fixture_trees_stand_in_for_esrch(tmp_path):
    """Fixture trees check a kept file's link count (a removed file stays readable there);
    link_check=False, which the tick bench uses, reads as the real /proc costs: one pread."""
    proctree.add_process(tmp_path, 101, proctree.qemu_argv("g0", "00000000-0000-4000-8000-000000000000"))
    checked, unchecked = ProcFs(str(tmp_path)).kept_files(), ProcFs(str(tmp_path), link_check=False).kept_files()
    assert checked.read(101, "statm") is not None and unchecked.read(101, "statm") is not None
    assert checked._check_links and not unchecked._check_links
    shutil.rmtree(tmp_path / "101")
    assert checked.read(101, "statm") is None  # gone, as ESRCH says it on the real /proc
    assert unchecked.read(101, "statm") is not None  # the removed file still reads: no check
    checked.close()
    unchecked.close()


def test_kept_file_of_an_exited_process_never_reads_again():
    """The contract KeptFiles relies on, on the real /proc: a file opened for a process
    fails once that process is gone, so a pid reused later cannot be read through it."""
    proc = ProcFs("/proc")
    files = proc.kept_files()
    need(not files._check_links, "/proc here is not this pid namespace's procfs")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        got = files.read(child.pid, "statm")
        assert got is not None and proc.statm(got[0])
        assert files.read(child.pid, "statm")[1] == got[1]  # same open file, same identity
        assert len(files) == 1
    finally:
        terminate(child, timeout=10)
    wait_for(lambda: not os.path.exists("/proc/%d" % child.pid), 10, "the child's /proc entry to go")
    assert files.read(child.pid, "statm") is None
    assert len(files) == 0


# ---- libvirt (test driver) ----------------------------------------------------------------
@pytest.fixture
def host3(tmp_path):
    need(libvirt is not None, "libvirt-python is not installed")
    return proctree.host(tmp_path, 3, others=5)


def lv_collector(host, kept: int = 1000, events: bool = False) -> LibvirtCollector:
    from tests.test_vms_collector import Libvirt  # opens read-write, so a test may stop a domain
    uri, proc_root, run_root, _ = host
    return LibvirtCollector(uri, proc=ProcFs(str(proc_root), kept_files=kept), run_root=str(run_root),
                            events=events, libvirt_module=Libvirt())


@pytest.mark.parametrize("kept", [1000, 0])
@pytest.mark.parametrize("events", [False, True])  # True: the listing is reused (the hot path)
def test_libvirt_sees_a_changed_figure_at_the_next_tick(host3, kept, events):
    proc_root = host3[1]
    c = lv_collector(host3, kept, events)
    try:
        first = by_name(c.collect())
        assert by_name(c.collect())["vm0001"] is first["vm0001"]
        rewrite_ksm_stat(proc_root, 1001, 4321)
        rewrite_statm(proc_root, 1002, 777)
        now = by_name(c.collect())
        assert now["vm0001"].ksm.merging_pages == 4321 and now["vm0001"] is not first["vm0001"]
        assert now["vm0002"].rss == 777 * PAGE and now["vm0002"] is not first["vm0002"]
        assert now["vm0000"] is first["vm0000"]
        rewrite_statm(proc_root, 1002, 778)  # statm alone, with ksm_stat as it was
        assert by_name(c.collect())["vm0002"].rss == 778 * PAGE
    finally:
        c.close()


def test_libvirt_releases_files_of_guests_that_stop(host3):
    c = lv_collector(host3)
    c.collect()
    assert len(c._files) == 6  # ksm_stat and statm of three guests
    c._conn.lookupByName("vm0001").destroy()
    assert set(by_name(c.collect())) == {"vm0000", "vm0002"}
    assert len(c._files) == 4 and 1001 not in c._files.pids()
    c.close()
    assert len(c._files) == 0


# ---- per-VM metric lines, cached per reading --------------------------------------------------
def _tick(vms, page: int = 4096):
    from ksmctl.readings import KsmState, Readings
    from ksmctl.service.daemon import TickRecord
    from tests.test_metrics_golden import _policy
    ksm = KsmState(values={"pages_sharing": 10, "pages_shared": 2}, page_size=page)
    return TickRecord(policy=_policy(), readings=Readings(monotonic=1.0, wall=2.0, ksm=ksm, vms=tuple(vms)),
                      ok=True, wall=2.0)


def _vm(name: str, merging: int, **kw):
    from ksmctl.readings import KsmStat, VmReading
    return VmReading(uuid="uuid-" + name, name=name, pid=1, rss=1 << 20,
                     ksm=KsmStat(merging_pages=merging, zero_pages=1, process_profit=merging * 10), **kw)


def test_vm_metric_lines_follow_each_new_reading():
    from prometheus_client import CollectorRegistry, generate_latest
    from ksmctl.export.metrics import MetricsCollector, render_text

    reg = CollectorRegistry(auto_describe=False)
    m = MetricsCollector(reg, build={"version": "t", "python": "3"})

    def scrape(vms, page=4096) -> str:
        m.observe(_tick(vms, page))
        text = render_text(reg).decode()
        assert text == generate_latest(reg).decode()  # cached lines = what prometheus_client writes
        return text

    a, b = _vm("a", 5), _vm("b", 7)
    first = scrape([a, b])
    assert 'ksmctl_vm_merging_pages{domain="b",uuid="uuid-b"} 7.0' in first
    b2, c = _vm("b", 70), _vm("c\"q", 3, excluded=True)
    second = scrape([a, b2, c])
    assert 'ksmctl_vm_merging_pages{domain="b",uuid="uuid-b"} 70.0' in second and "} 7.0\n" not in second
    assert 'ksmctl_vm_excluded{domain="c\\"q",uuid="uuid-c\\"q"} 1.0' in second
    import dataclasses
    renamed = scrape([a, dataclasses.replace(b2, name="renamed"), c])  # same uuid, new name: new labels
    assert 'ksmctl_vm_rss_bytes{domain="renamed",uuid="uuid-b"}' in renamed and 'domain="b"' not in renamed
    third = scrape([b2], page=65536)  # a and c gone; a new page size changes every saving
    assert 'domain="a"' not in third and 'uuid-c' not in third
    from prometheus_client.utils import floatToGoString
    assert 'ksmctl_vm_memory_saved_bytes{domain="b",uuid="uuid-b"} %s\n' % floatToGoString(71 * 65536) in third


# ---- state file rows, encoded once per reading ------------------------------------------------
def test_state_file_rows_are_the_bytes_of_the_whole_document(tmp_path):
    """StateFile.write(doc, vms) splices cached rows; the file must be exactly what
    json.dumps writes for the whole document, tick after tick, as guests change."""
    import dataclasses
    import json
    from ksmctl.readings import KsmState, Readings
    from ksmctl.service.state import STATE_FORMAT, StateFile, parse_state

    path = tmp_path / "state.json"
    sf = StateFile(str(path)).acquire()
    a, b = _vm("a", 5), _vm("b\"\\q", 7)
    for vms in ([a, b], [a, _vm("b\"\\q", 8), _vm("new", 1, excluded=True)], [a],
                [dataclasses.replace(a, rss=5)], [dataclasses.replace(a, rss=5, ksm=None)], []):
        r = Readings(monotonic=1.0, wall=2.0, ksm=KsmState(values={"run": 1}), vms=tuple(vms))
        doc = {"pid": os.getpid(), "updated": 3.0, "readings": dataclasses.replace(r, vms=None).to_dict()}
        sf.write(doc, r.vms)
        whole = {"format": STATE_FORMAT, "pid": os.getpid(), "updated": 3.0, "readings": r.to_dict(vm_table=True)}
        text = path.read_text()
        assert text == json.dumps(whole, separators=(",", ":"), default=str)
        assert parse_state(text, str(path))["readings"]["vms"]["rows"] == json.loads(text)["readings"]["vms"]["rows"]
    sf.release()


def test_libvirt_sees_a_changed_domain_state_at_the_next_tick(host3):
    from ksmctl.readings import VmState
    c = lv_collector(host3)
    first = by_name(c.collect())["vm0002"]
    assert first.state is VmState.RUNNING
    c._conn.lookupByName("vm0002").suspend()
    now = by_name(c.collect())
    assert now["vm0002"].state is VmState.PAUSED and now["vm0002"] is not first
    assert now["vm0002"].ksm is first.ksm  # unchanged ksm_stat: parsed once


@pytest.mark.parametrize("kept", [1000, 0])
def test_same_guest_restarted_under_its_pid_shows_the_new_process(tmp_path, kept):
    """The same command line in a new /proc/<pid>: every figure is the new process's,
    statm too (it is read without its own identity check, after ksm_stat's)."""
    proc_root, s = scanner_host(tmp_path, kept)
    s.collect()
    shutil.rmtree(proc_root / "101")
    proctree.add_process(proc_root, 101, proctree.qemu_argv("g0", "00000000-0000-4000-8000-000000000000"),
                         merging=9, rss_pages=1234)
    v = by_name(s.collect())["g0"]
    assert (v.pid, v.ksm.merging_pages, v.rss) == (101, 9, 1234 * PAGE)


def test_fallback_scanner_gives_back_its_files_when_libvirt_returns(host3):
    from tests.test_vms_collector import FakeClock, Libvirt
    uri, proc_root, run_root, _ = host3
    clock = FakeClock()
    lv = Libvirt(fail_open=True)
    c = LibvirtCollector(uri, proc=ProcFs(str(proc_root), kept_files=1000), run_root=str(run_root),
                         events=False, libvirt_module=lv, clock=clock, backoff_initial=1.0)
    c.collect()
    assert c.source == "proc" and len(c._scanner._files) == 6
    lv.fail_open = False
    clock.now += 1.0
    c.collect()
    assert c.source == "libvirt" and len(c._scanner._files) == 0 and len(c._files) == 6


def test_a_zombie_guest_is_gone_although_its_kept_file_still_reads(tmp_path):
    """A QEMU process whose parent (libvirtd) died is reparented; until reaped it is a
    zombie, whose kept ksm_stat reads empty and whose cmdline is empty: it must drop out
    of /proc discovery (found with a guest killed while libvirtd was down)."""
    import subprocess
    import sys
    from ksmctl.collectors.procfs import ProcFs
    from ksmctl.collectors.vms import VmCollector
    code = "import time; time.sleep(60)"
    p = subprocess.Popen(["qemu-system-x86_64", "-c", code, "-name", "guest=zombie-1", "-m", "64"],
                         executable=sys.executable)
    c = VmCollector(uri=None, proc=ProcFs(), events=False)
    try:
        assert any(v.pid == p.pid for v in c.collect())
        p.kill()
        from tests.support import wait_for
        wait_for(lambda: open("/proc/%d/stat" % p.pid).read().split()[2] == "Z", 10, "the guest to be a zombie")
        assert not any(v.pid == p.pid for v in c.collect())
    finally:
        c.close()
        p.wait()
