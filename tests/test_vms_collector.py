"""Per-VM collector error paths, fast: libvirt's in-process test driver plus generated
/proc and /run trees (tests/lab/proctree.py). No daemon, no guests, no root."""
from __future__ import annotations

import logging
import shutil
import sys
from typing import Any, Callable, List, Optional

import pytest

from ksmctl.collectors.vms.libvirt import LibvirtCollector, nosharepages
from ksmctl.collectors.procfs import ProcFs
from ksmctl.collectors.vms.qemu import QemuProcScanner, parse_qemu_cmdline
from ksmctl.collectors.vms import VmCollector, vm_savings
from ksmctl.readings import vm_signals
from ksmctl.errors import ErrorSource
from ksmctl.readings import KsmStat, KsmState, MemInfo, VmReading, VmSource, VmState, vm_from_dict
from tests.lab import proctree
from tests.support import need

try:
    import libvirt  # type: ignore[no-redef]
except ImportError:  # pragma: no cover
    libvirt = None


def need_libvirt() -> None:
    need(libvirt is not None, "libvirt-python is not installed")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Conn:
    """The real test-driver connection with a hook after getAllDomainStats.

    A stand-in is needed only for timing: the hook lets a test act between libvirt's
    listing and the collector's per-domain reads, which nothing real can schedule."""

    def __init__(self, real: Any, shim: "Libvirt") -> None:
        self._real = real
        self._shim = shim

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def getAllDomainStats(self, stats: int, flags: int = 0) -> list:
        self._shim.calls.append(("all", stats, None))
        recs = self._real.getAllDomainStats(stats, flags)
        after = self._shim.after_stats
        return after(self._real, recs) if after else recs

    def domainListGetStats(self, doms: list, stats: int, flags: int = 0) -> list:
        self._shim.calls.append(("list", stats, len(doms)))
        if self._shim.fail_list:
            self._shim.fail_list -= 1
            return self._real.domainListGetStats(doms, stats, 1 << 28)  # a real error: bad flags
        return self._real.domainListGetStats(doms, stats, flags)


class Libvirt:
    """The real libvirt module, except that openReadOnly opens read-write (a test-driver
    file URI gives each connection its own state, so the hook must act on the collector's
    own connection) and wraps it in Conn. Counts connection attempts."""

    def __init__(self, after_stats: Optional[Callable[[Any, list], list]] = None,
                 fail_open: bool = False) -> None:
        self.after_stats = after_stats
        self.fail_open = fail_open
        self.fail_list = 0  # how many domainListGetStats calls fail
        self.calls: List[tuple] = []  # ("all" | "list", stats flags, domains asked for)
        self.opens = 0
        self.conns: List[Conn] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(libvirt, name)

    def openReadOnly(self, uri: str) -> Conn:
        self.opens += 1
        if self.fail_open:
            return libvirt.openReadOnly("qemu+unix:///system?socket=/nonexistent/sock")
        c = Conn(libvirt.open(uri), self)
        self.conns.append(c)
        return c


class Dom:
    """A real domain whose XMLDesc fails with a real libvirt error (bad flags)."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def XMLDesc(self, flags: int = 0) -> str:
        return self._real.XMLDesc(1 << 30)


@pytest.fixture
def host3(tmp_path):
    need_libvirt()
    return proctree.host(tmp_path, 3, others=5)


def collector(host, lv: Any = None, **kw) -> LibvirtCollector:
    uri, proc_root, run_root, _ = host
    kw.setdefault("events", False)
    return LibvirtCollector(uri, proc=ProcFs(str(proc_root)), run_root=str(run_root),
                            libvirt_module=lv or Libvirt(), **kw)


def by_name(vms) -> dict:
    return {v.name: v for v in vms}


# ---- libvirt test driver ----------------------------------------------------------------
def test_readings_tied_to_qemu_processes(host3):
    c = collector(host3)
    vms = by_name(c.collect())
    assert c.source == "libvirt" and c.errors == []
    for name, uuid, pid in host3[3]:
        v = vms[name]
        assert (v.uuid, v.pid, v.source, v.state) == (uuid, pid, "libvirt", "running")
        assert v.ksm is not None and v.ksm.merging_pages == 1000 + pid - 1000
        assert v.rss == 65536 * ProcFs().page_size


def test_domain_vanishing_between_list_and_read_is_skipped(host3):
    def destroy_vm1(conn, recs):
        dom = conn.lookupByName("vm0001")
        dom.destroy()
        dom.undefine()
        return recs

    lv = Libvirt(after_stats=destroy_vm1)
    c = collector(host3, lv)
    vms = by_name(c.collect())
    assert set(vms) == {"vm0000", "vm0002"} and c.source == "libvirt" and c.errors == []
    lv.after_stats = None
    assert set(by_name(c.collect())) == {"vm0000", "vm0002"}


def test_domain_whose_pid_file_goes_away_is_skipped(host3):
    c = collector(host3)
    assert by_name(c.collect())["vm0002"].pid == 1002
    assert by_name(c.collect())["vm0001"].pid == 1001
    # QEMU exited after libvirt's listing: first its process, then (libvirt) its pid file.
    shutil.rmtree(str(host3[1] / "1002"))
    shutil.rmtree(str(host3[1] / "1001"))
    (host3[2] / "libvirt/qemu/vm0001.pid").unlink()
    vms = by_name(c.collect())
    assert set(vms) == {"vm0000"} and c.errors == []


def test_libvirt_error_on_one_domain_spares_the_others(host3, caplog):
    def break_vm0(conn, recs):
        return [(Dom(d) if d.name() == "vm0000" else d, p) for d, p in recs]

    c = collector(host3, Libvirt(after_stats=break_vm0))
    with caplog.at_level(logging.WARNING, logger="ksmctl.vms"):
        vms = by_name(c.collect())
        vms2 = by_name(c.collect())
    assert set(vms) == {"vm0000", "vm0001", "vm0002"} and c.source == "libvirt"
    assert vms["vm0000"].ksm is not None  # still tied to its process
    assert len(c.errors) == 1 and "reading the XML of vm0000" in c.errors[0][1]
    assert c.errors[0][0] is ErrorSource.LIBVIRT
    assert "Traceback" not in c.errors[0][1]
    # Logged once, not every tick.
    assert sum("vm0000" in r.getMessage() for r in caplog.records) == 1
    assert set(vms2) == set(vms)


def test_xml_fetched_once_per_domain(host3):
    calls = []

    class Counting(Dom):
        def XMLDesc(self, flags: int = 0) -> str:
            calls.append(self._real.name())
            return self._real.XMLDesc(flags)

    c = collector(host3, Libvirt(after_stats=lambda conn, recs: [(Counting(d), p) for d, p in recs]))
    for _ in range(5):
        c.collect()
    assert sorted(calls) == ["vm0000", "vm0001", "vm0002"]


def test_nosharepages_and_mem_merge_off_are_excluded(tmp_path):
    need_libvirt()
    proc_root, run_root = tmp_path / "proc", tmp_path / "run"
    guests = [("share", "11111111-1111-1111-1111-111111111111", False, False),
              ("noshare", "22222222-2222-2222-2222-222222222222", True, False),
              ("mergeoff", "33333333-3333-3333-3333-333333333333", False, True)]
    uri = proctree.node_xml(tmp_path / "node.xml", [(n, u, ns) for n, u, ns, _ in guests])
    for i, (n, u, _ns, off) in enumerate(guests):
        proctree.add_process(proc_root, 10 + i, proctree.qemu_argv(n, u, merge_off=off), merging=0 if off else 50)
        proctree.add_pidfile(run_root, n, 10 + i)
    c = collector((uri, proc_root, run_root, None))
    vms = by_name(c.collect())
    assert (vms["share"].excluded, vms["noshare"].excluded, vms["mergeoff"].excluded) == (False, True, True)


@pytest.mark.parametrize("content, why", [
    ("999", "gone"),                    # stale: the process is gone
    ("50", "not a QEMU process"),       # reused by an unrelated process
    ("51", "another guest"),            # reused by another guest's QEMU
    ("garbage", "not a pid"),
])
def test_stale_or_reused_pid_is_never_attributed(host3, content, why):
    proc_root, run_root = host3[1], host3[2]
    proctree.add_process(proc_root, 50, ["/usr/bin/python3", "-c", "pass"], merging=777)
    proctree.add_process(proc_root, 51, proctree.qemu_argv("elsewhere", "99999999-9999-9999-9999-999999999999"),
                         merging=888)
    proctree.add_pidfile(run_root, "vm0000", content)
    c = collector(host3)
    v = by_name(c.collect())["vm0000"]
    assert v.pid is None and v.ksm is None  # reported (libvirt says it runs), nothing attributed
    assert [s for s, m in c.errors if "vm0000" in m and why in m] == [ErrorSource.PROC], c.errors


@pytest.mark.parametrize("events", [False, True])  # True: the listing is reused (the hot path)
def test_pid_reused_after_verification_is_noticed(host3, events):
    """Once verified, a guest's pid is only re-checked by the identity of the ksm_stat it
    reads; a new process under the same pid (a new /proc/<pid> directory) must still be
    caught, not attributed."""
    import shutil
    proc_root = host3[1]
    c = collector(host3, events=events)
    v = by_name(c.collect())["vm0000"]
    assert v.pid is not None and v.ksm is not None and v.ksm.merging_pages
    for _ in range(2):   # steady state: identity unchanged, same readings
        assert by_name(c.collect())["vm0000"].pid == v.pid
    shutil.rmtree(proc_root / str(v.pid))
    proctree.add_process(proc_root, v.pid, ["/usr/bin/python3", "-c", "pass"], merging=777)
    again = by_name(c.collect())["vm0000"]
    assert again.pid is None and again.ksm is None
    assert any("vm0000" in m and "not a QEMU process" in m for _s, m in c.errors), c.errors


def test_same_name_different_uuid_is_not_attributed(host3):
    proc_root, run_root = host3[1], host3[2]
    proctree.add_process(proc_root, 60, proctree.qemu_argv("vm0000", "99999999-9999-9999-9999-999999999999"))
    proctree.add_pidfile(run_root, "vm0000", 60)
    assert by_name(collector(host3).collect())["vm0000"].pid is None


def test_bogus_uri_falls_back_to_proc_and_retries_with_backoff(host3, caplog):
    clock = FakeClock()
    lv = Libvirt(fail_open=True)
    c = collector(host3, lv, clock=clock, backoff_initial=1.0, backoff_max=4.0)
    with caplog.at_level(logging.INFO, logger="ksmctl.vms"):
        vms = by_name(c.collect())
        assert c.source == "proc" and "cannot connect to libvirt" in c.last_error
        assert set(vms) == {"vm0000", "vm0001", "vm0002"}
        assert all(v.source == "proc" and v.pid for v in vms.values())
        assert lv.opens == 1
        c.collect()
        assert lv.opens == 1  # within the backoff: no new attempt
        clock.now += 1.0
        c.collect()
        assert lv.opens == 2
        clock.now += 1.5
        c.collect()
        assert lv.opens == 2  # backoff doubled to 2s
        clock.now += 0.5
        c.collect()
        assert lv.opens == 3
        for _ in range(5):
            clock.now += 4.0
            c.collect()
        lv.fail_open = False
        clock.now += 4.0  # never more than backoff_max
        c.collect()
        assert c.source == "libvirt"
    fallbacks = [r for r in caplog.records if "per-VM data from /proc" in r.getMessage()]
    assert len(fallbacks) == 1  # logged once, not at every retry
    assert any("per-VM data from libvirt" in r.getMessage() for r in caplog.records)
    assert all("Traceback" not in r.getMessage() for r in caplog.records)


def test_failed_call_falls_back_then_reconnects(host3):
    clock = FakeClock()
    state = {"fail": False}

    def maybe_fail(conn, recs):
        if state["fail"]:
            conn.lookupByName("no-such-domain")  # a real libvirt error
        return recs

    lv = Libvirt(after_stats=maybe_fail)
    c = collector(host3, lv, clock=clock, backoff_initial=1.0)
    c.collect()
    assert c.source == "libvirt"
    state["fail"] = True
    vms = c.collect()
    assert c.source == "proc" and len(vms) == 3 and "listing domains failed" in c.last_error
    state["fail"] = False
    clock.now += 1.0
    c.collect()
    assert c.source == "libvirt" and lv.opens == 2


def test_without_libvirt_python(host3, monkeypatch):
    monkeypatch.setitem(sys.modules, "libvirt", None)  # import libvirt -> ImportError
    uri, proc_root, run_root, _ = host3
    c = VmCollector(uri, proc=ProcFs(str(proc_root)), run_root=str(run_root))
    assert len(c.collect()) == 3 and c.source is VmSource.PROC
    assert c.last_error == "libvirt-python is not installed"
    assert c.errors == []  # /proc is all this host has: no outage


def test_no_uri_means_proc_only(host3):
    c = VmCollector("none", proc=ProcFs(str(host3[1])), run_root=str(host3[2]))
    for _ in range(2):
        assert len(c.collect()) == 3 and c.source is VmSource.PROC and c.errors == []


def test_libvirt_outage_is_an_error_every_tick_it_lasts(host3):
    """Connect failures, ticks within the backoff (no attempt) and a failed listing all
    count: each of those ticks has per-VM data from /proc only because libvirt failed."""
    clock = FakeClock()
    state = {"fail": False}

    def maybe_fail(conn, recs):
        if state["fail"]:
            conn.lookupByName("no-such-domain")
        return recs

    lv = Libvirt(fail_open=True, after_stats=maybe_fail)
    c = collector(host3, lv, clock=clock, backoff_initial=10.0)
    seen = []
    for _ in range(3):  # one attempt, then two ticks inside the backoff
        c.collect()
        seen.append((c.source, [s for s, _m in c.errors]))
    assert seen == [(VmSource.PROC, [ErrorSource.LIBVIRT])] * 3 and lv.opens == 1
    assert "cannot connect to libvirt" in c.errors[0][1]
    lv.fail_open = False
    clock.now += 10.0
    c.collect()
    assert c.source is VmSource.LIBVIRT and c.errors == []
    state["fail"] = True
    c.collect()
    assert c.source is VmSource.PROC and [s for s, _m in c.errors] == [ErrorSource.LIBVIRT]
    assert "listing domains failed" in c.errors[0][1]


def test_host_readings_and_metrics_show_the_outage_and_the_source(host3, tmp_path):
    """Through HostCollector and the exporter: errors_total{source="libvirt"} grows by one
    per tick on /proc, and ksmctl_vm_data_source says proc."""
    from ksmctl.collectors.host import HostCollector
    from ksmctl.export.metrics import MetricsCollector, render_text
    from ksmctl.kernel.sysfs import KsmSysfs
    from ksmctl.policy.loader import LoadedPolicy, parse_policy
    from ksmctl.service.daemon import TickRecord
    from prometheus_client import CollectorRegistry
    from tests.fixtures import make_proc, make_sys
    uri, proc_root, run_root, _ = host3
    make_proc(proc_root)
    text = "name: t\ninterval: 10s\nrun: {mode: always}\n"
    lp = LoadedPolicy(policy=parse_policy(text, "t.yaml"), path="t.yaml", sha256="0")
    reg = CollectorRegistry(auto_describe=False)
    metrics = MetricsCollector(reg, build={"version": "0", "python": "3"})

    def ticks(vms, n):
        host = HostCollector(KsmSysfs(str(make_sys(tmp_path / "sys"))), ProcFs(str(proc_root)), vms=vms)
        for _ in range(n):
            r = host.collect()
            metrics.observe(TickRecord(policy=lp, readings=r, errors=list(r.errors), ok=True))
        return r, render_text(reg).decode()

    down = VmCollector("qemu+unix:///system?socket=/nonexistent/sock", proc=ProcFs(str(proc_root)),
                       run_root=str(run_root), events=False)
    r, out = ticks(down, 3)
    assert r.vm_source is VmSource.PROC and len(r.vms) == 3
    assert 'ksmctl_errors_total{source="libvirt"} 3.0' in out
    assert 'ksmctl_vm_data_source{source="proc"} 1.0' in out
    assert 'ksmctl_vm_data_source{source="libvirt"} 0.0' in out
    up = VmCollector(uri, proc=ProcFs(str(proc_root)), run_root=str(run_root), events=False,
                     libvirt_module=Libvirt())
    r, out = ticks(up, 2)
    assert r.vm_source is VmSource.LIBVIRT and r.errors == ()
    assert 'ksmctl_errors_total{source="libvirt"} 3.0' in out and 'ksmctl_errors_total{source="other"} 0.0' in out
    assert 'ksmctl_vm_data_source{source="libvirt"} 1.0' in out
    down.close()
    up.close()


def test_domain_states_are_libvirts(host3):
    lv = Libvirt()
    c = collector(host3, lv)
    c.collect()
    lv.conns[-1].lookupByName("vm0001").suspend()
    vms = by_name(c.collect())
    assert vms["vm0001"].state is VmState.PAUSED and vms["vm0000"].state is VmState.RUNNING
    assert "%s/%s" % (vms["vm0001"].state, vms["vm0001"].source) == "paused/libvirt"


def test_lifecycle_events_mark_the_list_changed(tmp_path):
    need_libvirt()
    lv = Libvirt()
    c = LibvirtCollector("test:///default", proc=ProcFs(str(tmp_path)), run_root=str(tmp_path),
                         libvirt_module=lv, events=True)
    try:
        c.collect()
        assert not c.changed.is_set()
        conn = lv.conns[-1]
        dom = conn.defineXML(proctree.domain_xml("evt", "44444444-4444-4444-4444-444444444444"))
        dom.create()
        from tests.support import wait_for
        wait_for(c.changed.is_set, 10, "a lifecycle event")
        assert "evt" in by_name(c.collect())
        dom.destroy()
        dom.undefine()
        # Its stop event arrives on libvirt's event thread and makes the next tick list again:
        # within seconds, long before the listing's 30 s maximum age.
        wait_for(lambda: "evt" not in by_name(c.collect()), 10, "the destroyed domain gone from a tick")
    finally:
        c.close()


# ---- the listing: on lifecycle events, and at most relist_max_age apart -----------------
def calls(lv: "Libvirt", which: str) -> list:
    """Since the last look (which it forgets): for each call of one kind, "all"
    (getAllDomainStats) or "list" (domainListGetStats), the domains it asked for."""
    out = [n for kind, _stats, n in lv.calls if kind == which]
    lv.calls.clear()
    return out


def listings(lv: "Libvirt") -> int:
    return len(calls(lv, "all"))


def test_listing_reused_until_a_lifecycle_event_or_its_max_age(host3):
    clock = FakeClock()
    lv = Libvirt()
    c = collector(host3, lv, events=True, clock=clock, relist_max_age=30)
    try:
        first = by_name(c.collect())
        assert c._lifecycle_events and listings(lv) == 1
        clock.now += 29
        again = by_name(c.collect())
        assert listings(lv) == 0 and again == first  # still read: pids, ksm_stat, statm
        assert again["vm0001"].state is VmState.RUNNING
        # A real lifecycle event from the test driver (suspend on the collector's own connection).
        lv.conns[-1].lookupByName("vm0001").suspend()
        from tests.support import wait_for
        wait_for(c.changed.is_set, 10, "the suspend's lifecycle event")
        vms = by_name(c.collect())
        assert listings(lv) == 1 and vms["vm0001"].state is VmState.PAUSED
        assert vms["vm0000"].state is VmState.RUNNING
        c.collect()
        assert listings(lv) == 0
        clock.now += 30  # the max age: listed again, event or not
        c.collect()
        assert listings(lv) == 1
    finally:
        c.close()


def test_reused_listing_skips_a_guest_gone_before_its_event_and_lists_again(host3):
    lv = Libvirt()
    c = collector(host3, lv, events=True)
    try:
        assert by_name(c.collect())["vm0001"].pid == 1001
        listings(lv)
        # QEMU exited and libvirt removed its pid file; its event has not arrived.
        shutil.rmtree(str(host3[1] / "1001"))
        (host3[2] / "libvirt/qemu/vm0001.pid").unlink()
        vms = by_name(c.collect())
        assert set(vms) == {"vm0000", "vm0002"} and listings(lv) == 0 and c.errors == []
        # The next tick lists again instead of showing the domain without its process.
        vms = by_name(c.collect())
        assert listings(lv) == 1 and "vm0001" in vms and vms["vm0001"].pid is None  # libvirt still lists it
    finally:
        c.close()


def test_listing_after_a_reconnect_is_new(host3):
    lv = Libvirt()
    c = collector(host3, lv, events=True, backoff_initial=0)
    try:
        c.collect()
        listings(lv)
        c._on_close(None, 0, None)  # libvirtd closed the connection
        vms = by_name(c.collect())
        assert lv.opens == 2 and listings(lv) == 1 and set(vms) == {"vm0000", "vm0001", "vm0002"}
    finally:
        c.close()


# ---- balloon statistics: fetched when they can have changed ------------------------------
BALLOON = 4  # VIR_DOMAIN_STATS_BALLOON


def lists(lv: "Libvirt") -> List[int]:
    return calls(lv, "list")


def test_balloon_fetched_at_start_on_events_and_at_max_age(host3):
    clock = FakeClock()
    lv = Libvirt()
    c = collector(host3, lv, events=True, clock=clock, balloon_max_age=60)
    try:
        first = by_name(c.collect())
        assert c._balloon_events  # libvirt took the balloon-change registration
        assert all(not stats & BALLOON for kind, stats, _ in lv.calls if kind == "all")  # state only
        assert lists(lv) == [3]
        # (The test driver's balloon records are empty: figures are checked in test_lab_vms.py.)
        clock.now += 40
        assert by_name(c.collect()) == first and lists(lv) == []  # nothing due: not asked again
        # The balloon-change event of one domain (the lab test has libvirt deliver a real one).
        dom = lv.conns[-1].lookupByName("vm0001")
        c._on_balloon(None, dom, 1024, None)
        c.collect()
        assert lists(lv) == [1]
        clock.now += 21  # past the max age of the two fetched first (45 s: their spread is 0.75)
        c.collect()
        assert lists(lv) == [2]  # the one fetched for its event is not due yet
    finally:
        c.close()


def test_without_events_balloon_comes_with_the_state_every_tick(host3):
    lv = Libvirt()
    c = collector(host3, lv, events=False)
    c.collect()
    c.collect()
    assert [stats & BALLOON for kind, stats, _ in lv.calls] == [BALLOON, BALLOON]  # no list calls


def test_failed_balloon_fetch_keeps_the_domains_due_and_is_an_error(host3):
    lv = Libvirt()
    c = collector(host3, lv, events=True)
    try:
        lv.fail_list = 1
        assert len(c.collect()) == 3
        assert [src for src, _ in c.errors] == [ErrorSource.LIBVIRT]
        assert "balloon statistics of 3 domains" in c.errors[0][1]
        assert len(c.collect()) == 3
        assert lists(lv) == [3, 3] and not c.errors  # still due after the failure: asked again
        c.collect()
        assert lists(lv) == []
    finally:
        c.close()


def test_balloon_due_follows_the_guests_statistics_period():
    from ksmctl.collectors.vms.libvirt import _Known, xml_facts
    k = _Known()
    k.stats_period = 10
    k.set_balloon({"balloon.last-update": 997, "balloon.current": 1}, now=50.0, wall=1000.0, max_age=60, spread=1.0)
    assert k.balloon_due == 50.0 + 8.0  # the guest's next update (997 + 10) plus a second
    k.set_balloon({"balloon.last-update": 900}, now=50.0, wall=1000.0, max_age=60, spread=1.0)
    assert k.balloon_due == 60.0  # late: look again in a period
    k.set_balloon({"balloon.current": 1}, now=50.0, wall=1000.0, max_age=60, spread=1.0)
    assert k.balloon_due == 60.0  # not stamped yet (booting): every period
    k.set_balloon({"balloon.last-update": 999}, now=50.0, wall=1000.0, max_age=5, spread=0.8)
    assert k.balloon_due == 54.0  # max age (times the domain's spread) bounds it
    k.set_balloon({"balloon.last-update": "soon"}, now=50.0, wall=1000.0, max_age=60, spread=1.0)
    assert k.balloon_due == 60.0  # not a timestamp: as if not stamped
    k.stats_period = None
    k.set_balloon({"balloon.last-update": 999}, now=50.0, wall=1000.0, max_age=60, spread=0.75)
    assert k.balloon_due == 95.0 and k.balloon == {"balloon.last-update": 999}
    xml = ("<domain><devices><memballoon model='virtio'><stats period='%s'/></memballoon></devices>"
           "<memoryBacking><nosharepages/></memoryBacking></domain>")
    assert xml_facts(xml % "5") == (True, 5)
    assert xml_facts(xml % "zero") == (True, None) and xml_facts(xml % "0") == (True, None)
    assert xml_facts(xml % "-5") == (True, None)  # else a negative wait: fetched every tick
    assert xml_facts("<domain/>") == (False, None) and xml_facts("<domain") == (False, None)


# ---- /proc discovery --------------------------------------------------------------------
@pytest.mark.parametrize("argv, name, uuid, memory, off", [
    (proctree.qemu_argv("web", "AAAAAAAA-0000-0000-0000-000000000001", 2048), "web",
     "aaaaaaaa-0000-0000-0000-000000000001", 2048 << 20, False),
    (["qemu-system-aarch64", "-name", "plain", "-m", "size=1048576k,slots=4,maxmem=8G"], "plain", None, 1 << 30, False),
    (["/usr/libexec/qemu-kvm", "-M", "q35,mem-merge=off", "-m", "1G", "-name", "guest=a,,b"], "a,b", None, 1 << 30, True),
    (["qemu-system-x86_64", "-object", "memory-backend-ram,id=m0,size=1G,merge=off"], None, None, None, True),
    (["qemu-system-x86_64", "-object", '{"qom-type":"memory-backend-memfd","id":"m","merge":false}'], None, None, None, True),
    (["qemu-system-x86_64", "--name", "x", "-machine", "pc,mem-merge=on"], "x", None, None, False),
])
def test_parse_qemu_cmdline(argv, name, uuid, memory, off):
    a = parse_qemu_cmdline(argv)
    assert (a.name, a.uuid, a.memory, a.mem_merge_off) == (name, uuid, memory, off)


@pytest.mark.parametrize("argv", [[], ["/usr/bin/python3", "qemu-system-x86_64"], ["qemu-img", "info"],
                                  ["/usr/bin/python3", "-name", "guest=x"], ["qemu-system", "-name", "x"],
                                  ["/usr/bin/qemu-nbd", "-name", "x"]])
def test_not_qemu(argv):
    assert parse_qemu_cmdline(argv) is None


# The estimator's guest-name cases and the /proc scanner's, one parser for both.
@pytest.mark.parametrize("argv, name", [
    (["/usr/bin/qemu-system-x86_64", "-name", "guest=web1,debug-threads=on", "-m", "256"], "web1"),
    (["qemu-system-aarch64", "-name", "db,process=qemu:db"], "db"),
    (["/usr/libexec/qemu-kvm", "-name", "guest=a,,b,debug-threads=on"], "a,b"),
    (["qemu-kvm", "--name", "guest=rhel9"], "rhel9"),
    (["/usr/bin/qemu-system-x86_64", "-name", "web,,1"], "web,1"),            # bare name with an escape
    (["/usr/bin/qemu-system-x86_64", "-name", "debug-threads=on,guest=late"], "late"),
    (["/usr/bin/qemu-system-x86_64", "-name", "first", "-name", "guest=second"], "second"),  # last wins
    (["/usr/bin/qemu-system-x86_64", "-name", "guest="], None),
    (["/usr/bin/qemu-system-x86_64", "-name"], None),                          # truncated command line
    (["/usr/bin/qemu-system-x86_64", "-m", "256"], None),
])
def test_guest_names(argv, name):
    assert parse_qemu_cmdline(argv).name == name


def test_proc_scanner_reads_generated_tree(tmp_path):
    proctree.add_process(tmp_path, 7, proctree.qemu_argv("g1", "12345678-1234-1234-1234-123456789abc", merge_off=True),
                         merging=5)
    proctree.add_process(tmp_path, 8, ["qemu-system-x86_64", "-m", "512"], merging=3)
    proctree.add_process(tmp_path, 9, ["/sbin/init"], ksm_stat=False)
    (tmp_path / "10").mkdir()  # a process that exited mid-scan: empty directory
    vms = {v.pid: v for v in QemuProcScanner(ProcFs(str(tmp_path))).collect()}
    assert set(vms) == {7, 8}
    assert (vms[7].name, vms[7].uuid, vms[7].excluded, vms[7].ksm.merging_pages) == (
        "g1", "12345678-1234-1234-1234-123456789abc", True, 5)
    assert (vms[8].name, vms[8].uuid, vms[8].balloon_maximum) == ("qemu-8", "pid:8", 512 << 20)


def test_enums_are_their_values_in_text_and_json():
    import json
    for member in (VmState.PAUSED, VmSource.PROC, ErrorSource.LIBVIRT):
        assert str(member) == "%s" % member == "{}".format(member) == member.value
        assert json.dumps([member]) == '["%s"]' % member.value
    assert ErrorSource.parse("vms") is ErrorSource.OTHER and ErrorSource.parse("proc") is ErrorSource.PROC


def test_vm_from_dict_reads_state_file_rows():
    v = vm_from_dict({"uuid": "u", "state": "pmsuspended", "source": "proc", "extra": 1,
                      "ksm": {"merging_pages": 3, "future": 1}})
    assert (v.name, v.state, v.source, v.ksm) == ("u", VmState.PMSUSPENDED, VmSource.PROC, KsmStat(merging_pages=3))
    assert vm_from_dict({"uuid": "w", "state": "melting"}).state is VmState.UNKNOWN


def test_nosharepages_xml():
    assert nosharepages("<domain><memoryBacking><nosharepages/></memoryBacking></domain>")
    assert not nosharepages("<domain><memoryBacking><hugepages/></memoryBacking></domain>")
    assert not nosharepages("<not xml")


# ---- signals and attribution ------------------------------------------------------------
def vm(uuid: str, **kw) -> VmReading:
    return VmReading(uuid=uuid, name=uuid, **kw)


def test_vm_signals():
    meminfo = MemInfo(total=8 << 30, available=4 << 30, free=2 << 30)
    vms = [vm("a", balloon_current=2 << 30, balloon_maximum=4 << 30, guest_usable=1 << 30, guest_unused=5),
           vm("b", rss=1 << 30, excluded=True),
           vm("c", balloon_current=1 << 30, guest_unused=256 << 20)]
    s = vm_signals(vms, meminfo)
    assert s["running_vms"] == 3 and s["excluded_vms"] == 1
    assert s["committed_current_bytes"] == 4 << 30 and s["committed_maximum_bytes"] == 6 << 30
    assert s["committed_current_ratio"] == 0.5 and s["committed_maximum_ratio"] == 0.75
    assert s["guest_free_bytes"] == (1 << 30) + (256 << 20) and s["guest_free_vms"] == 2
    none = vm_signals([vm("x", rss=1)], meminfo)
    assert none["guest_free_bytes"] is None and none["guest_free_vms"] == 0
    assert vm_signals(None, meminfo)["running_vms"] is None
    assert vm_signals([], None)["committed_current_ratio"] is None


def test_vm_savings_sum_to_host_saving():
    # 100 KSM pages each mapped by 3 processes -> sharing 200, shared 100; 10 zero pages.
    ksm = KsmState(values={"pages_sharing": 200, "pages_shared": 100, "ksm_zero_pages": 10}, page_size=4096)
    vms = [vm("a", ksm=KsmStat(merging_pages=100, zero_pages=10)), vm("b", ksm=KsmStat(merging_pages=100)),
           vm("c", ksm=KsmStat(merging_pages=100)), vm("d"), vm("e", excluded=True, ksm=KsmStat(merging_pages=0))]
    s = vm_savings(vms, ksm)
    assert sum(x["saved_bytes"] or 0 for x in s.values()) == pytest.approx(ksm.saved_bytes)
    assert s["a"]["share"] == pytest.approx((200 / 3 + 10) / 210)
    assert s["d"]["saved_bytes"] is None and s["e"]["saved_bytes"] == 0.0
    assert vm_savings(vms, None)["a"]["saved_bytes"] is None
