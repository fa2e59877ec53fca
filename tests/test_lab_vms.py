"""The per-VM collector against real libvirtd, real QEMU guests and the real ksmd.

Needs root, libvirt, QEMU and busybox-static (tests/lab). Skipped locally without them;
fails in CI. The guests boot once per session (fixture lab_guests)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from ksmctl.collectors.procfs import ProcFs
from ksmctl.kernel.sysfs import KsmSysfs
from ksmctl.collectors.vms import VmCollector, vm_savings
from ksmctl.readings import vm_dicts
from ksmctl.readings import VmReading
from tests.ksmlock import KSM, ksm_exclusive
from tests.lab.lab import URI, Guest, Lab, kill_pid, pid_alive
from tests.support import wait_for

pytestmark = [pytest.mark.lab, pytest.mark.kernel]

MIN_MERGED = 8000  # pages; each sharing guest writes ~12,000 pages shared with the others
PROC = ProcFs()


def by_uuid(vms) -> Dict[str, VmReading]:
    return {v.uuid: v for v in vms}


def sharing(guests: List[Guest]) -> List[Guest]:
    return [g for g in guests if not g.nosharepages]


def merging(pid: int) -> int:
    st = PROC.ksm_stat(pid)
    return (st.merging_pages or 0) if st else 0


def _knob(name: str, value: str) -> None:
    if (KSM / name).exists():
        (KSM / name).write_text(value)


# ---- the real daemon against the lab ------------------------------------------------------
def _state(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _vms_in_state(path: Path, source: str):
    st = _state(path)
    vms = vm_dicts(((st or {}).get("readings") or {}).get("vms"))
    if not vms or any(v["source"] != source for v in vms):
        return None
    return {v["uuid"]: v for v in vms}


@pytest.fixture
def daemon_proc(tmp_path):
    """`ksmctl daemon --dry-run` (reads everything, writes no knob) ticking every second."""
    state = tmp_path / "state.json"
    (tmp_path / "empty.yaml").write_text("{}\n")
    env = dict(os.environ, KSMCTL_STATE_FILE=str(state), KSMCTL_INTERVAL="1", KSMCTL_EXPORTER="false",
               KSMCTL_LIBVIRT_URI=URI, KSMCTL_CONFIG=str(tmp_path / "empty.yaml"))
    log = open(str(tmp_path / "daemon.log"), "w")
    p = subprocess.Popen([str(Path(sys.executable).parent / "ksmctl"), "daemon", "--dry-run", "--force",
                          "--log-level", "debug"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield p, tmp_path / "state-dry-run.json", tmp_path / "daemon.log"  # a dry run's own state file
    finally:
        kill_pid(p.pid)
        p.wait(10)
        log.close()


def _settled() -> bool:
    a = (KSM / "pages_sharing").read_text()
    time.sleep(1.0)
    return a == (KSM / "pages_sharing").read_text()


def agrees(pid: int, reported: int) -> bool:
    """reported was read between two reads of ksm_stat: it lies between them, give or take."""
    a = merging(pid)
    b = merging(pid)
    return min(a, b) - 64 <= reported <= max(a, b) + 64


@contextlib.contextmanager
def merging_fast(guests: List[Guest]):
    """ksmd merging fast under the global KSM lock (knobs restored after), once every
    sharing guest has MIN_MERGED merged pages."""
    with ksm_exclusive():
        if (KSM / "advisor_mode").exists():
            _knob("advisor_mode", "none")
        _knob("pages_to_scan", "5000")
        _knob("sleep_millisecs", "10")
        _knob("run", "1")
        wait_for(lambda: all(merging(g.pid) >= MIN_MERGED for g in sharing(guests)), 180,
                 "every sharing guest to have %d merged pages" % MIN_MERGED, interval=0.5)
        yield guests


@pytest.fixture(scope="class")
def merged(lab_guests):
    """ksmd merging the guests fast, settled."""
    with merging_fast(lab_guests):
        wait_for(_settled, 120, "merging to settle (pages_sharing unchanged for a second)", interval=0.1)
        yield lab_guests


class TestMerging:
    """Everything measured while ksmd merges the guests fast (one lock, knobs restored)."""

    def test_per_vm_savings_agree_with_ksm_stat(self, merged):
        c = VmCollector(URI, events=False)
        try:
            vms = by_uuid(c.collect())
            assert c.source == "libvirt"
        finally:
            c.close()
        for g in merged:
            vm = vms[g.uuid]
            assert vm.name == g.name and vm.pid == g.pid and vm.source == "libvirt"
            assert vm.state == "running"
            assert vm.balloon_current == 256 * 1024 * 1024 and vm.balloon_maximum == 256 * 1024 * 1024
            assert vm.rss and vm.rss > 32 * 1024 * 1024
            assert vm.ksm is not None
            assert agrees(g.pid, vm.ksm.merging_pages), (vm.ksm, PROC.ksm_stat(g.pid))
            if not g.nosharepages:
                assert vm.ksm.merging_pages >= MIN_MERGED
                assert vm.ksm.mergeable is True and vm.excluded is False

    def test_sum_of_guest_savings_matches_host_saving(self, merged):
        guest_pids = {g.pid for g in merged}
        c = VmCollector(URI, events=False)
        sysfs = KsmSysfs()

        def check():
            before = sysfs.read()
            vms = [v for v in c.collect() if v.pid in guest_pids]
            after = sysfs.read()
            if before.values.get("pages_sharing") != after.values.get("pages_sharing"):
                return False  # ksmd merged something between reads: measure again
            outside = 0
            for pid in PROC.pids():
                if pid not in guest_pids:
                    st = PROC.ksm_stat(pid)
                    if st is not None:
                        outside += (st.merging_pages or 0) + (st.zero_pages or 0)
            saved = vm_savings(vms, after)
            guest_sum = sum(s["saved_bytes"] or 0 for s in saved.values())
            host = after.saved_bytes
            ps = after.page_size
            slack = 64 * ps  # pages that change state between the reads of many files
            ok = guest_sum <= host + slack and host - guest_sum <= outside * ps + slack
            # Each merged page is counted in every process that maps it.
            all_merging = sum(v.ksm.merging_pages for v in vms) + outside
            ok = ok and abs(all_merging - (after.get("pages_sharing") + after.get("pages_shared")
                                           + after.get("ksm_zero_pages", 0))) <= 64
            return ok and (guest_sum, host, outside)

        try:
            guest_sum, host, outside = wait_for(check, 60, "a consistent reading of guests vs host saving", 0.5)
        finally:
            c.close()
        assert guest_sum > 2 * MIN_MERGED * 4096 * 0.5

    def test_nosharepages_guest_is_excluded(self, merged):
        g = [g for g in merged if g.nosharepages][0]
        c = VmCollector(URI, events=False)
        try:
            vm = by_uuid(c.collect())[g.uuid]
        finally:
            c.close()
        assert vm.excluded is True
        assert vm.ksm is not None and vm.ksm.mergeable is False and vm.ksm.merging_pages == 0

    def test_cli_vms_live_against_the_lab(self, merged):
        out = subprocess.run([str(Path(sys.executable).parent / "ksmctl"), "vms", "--live", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["source"] == "libvirt"
        rows = {r["uuid"]: r for r in doc["vms"]}
        for g in merged:
            assert rows[g.uuid]["excluded"] is g.nosharepages
            if not g.nosharepages:
                assert rows[g.uuid]["saved_bytes"] > 0 and rows[g.uuid]["share"] > 0

    def test_daemon_reports_per_vm_savings(self, merged, daemon_proc):
        p, state, log = daemon_proc
        guests = {g.uuid: g for g in merged}
        vms = wait_for(lambda: (lambda v: v if v and set(guests) <= set(v) else None)(_vms_in_state(state, "libvirt")),
                       30, "the daemon's state file to list the lab guests")
        for uuid, g in guests.items():
            v = vms[uuid]
            assert v["pid"] == g.pid and v["excluded"] is g.nosharepages
            assert agrees(g.pid, v["ksm"]["merging_pages"]), (v["ksm"], PROC.ksm_stat(g.pid))
        # `ksmctl vms` reads the running daemon's state file.
        out = subprocess.run([str(Path(sys.executable).parent / "ksmctl"), "vms", "--json", "--state-file", str(state)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["source"].startswith("daemon")
        assert {g.uuid for g in merged} <= {r["uuid"] for r in doc["vms"]}


def test_guest_started_appears_and_destroyed_goes_away(lab: Lab, lab_guests):
    c = VmCollector(URI, events=True)
    try:
        before = by_uuid(c.collect())
        assert c.source == "libvirt"
        g = lab.start_guest(memory_mib=128)
        # The lifecycle event arrives at once; the next tick lists the guest.
        wait_for(c.changed.is_set, 10, "a libvirt lifecycle event for the new guest")
        vm = wait_for(lambda: by_uuid(c.collect()).get(g.uuid), 10, "the new guest in a tick")
        assert g.uuid not in before and vm.name == g.name
        wait_for(lambda: by_uuid(c.collect()).get(g.uuid).pid == g.pid, 10, "the new guest's pid")
        lab.destroy_guest(g)
        assert not pid_alive(g.pid)
        assert g.uuid not in by_uuid(c.collect())
    finally:
        c.close()


def test_libvirtd_killed_mid_run_then_back(lab: Lab, lab_guests):
    c = VmCollector(URI, events=True, backoff_initial=0.2, backoff_max=1.0)
    extra = lab.start_guest(memory_mib=128)
    try:
        vms = by_uuid(c.collect())
        assert c.source == "libvirt" and {g.uuid for g in lab_guests} <= set(vms)
        lab.kill_libvirtd(signal.SIGKILL)
        # The guests keep running without libvirtd; the collector finds them in /proc.
        wait_for(lambda: (c.collect(), c.source == "proc")[1], 30, "the fallback to /proc")
        vms = by_uuid(c.collect())
        for g in lab_guests + [extra]:
            assert vms[g.uuid].name == g.name and vms[g.uuid].pid == g.pid
            assert vms[g.uuid].source == "proc" and vms[g.uuid].excluded is g.nosharepages
        # A guest that dies while libvirtd is away is not reported again.
        kill_pid(extra.pid)
        assert extra.uuid not in by_uuid(c.collect())
        lab.start_libvirtd()
        wait_for(lambda: (c.collect(), c.source == "libvirt")[1], 60, "the collector back on libvirt")
        vms = by_uuid(c.collect())
        assert {g.uuid for g in lab_guests} <= set(vms)
        assert extra.uuid not in vms
        assert all(vms[g.uuid].pid == g.pid for g in lab_guests)
    finally:
        c.close()
        if lab.libvirtd_pid() is None:
            lab.start_libvirtd()
        lab.destroy_guest(extra)


def test_libvirtd_stopped_from_start_proc_discovery(lab: Lab, lab_guests):
    lab.kill_libvirtd(signal.SIGTERM)
    c = VmCollector(URI, events=True)
    try:
        vms = by_uuid(c.collect())
        assert c.source == "proc" and "cannot connect to libvirt" in (c.last_error or "")
        for g in lab_guests:
            vm = vms[g.uuid]
            assert (vm.name, vm.pid, vm.source) == (g.name, g.pid, "proc")
            assert vm.balloon_maximum == 256 * 1024 * 1024 and vm.ksm is not None
            assert vm.excluded is g.nosharepages
    finally:
        c.close()
        lab.start_libvirtd()


def test_lab_left_no_strays(lab: Lab, lab_guests):
    """Every QEMU process of this lab is one of its guests (destroyed ones are gone)."""
    mine = {g.pid for g in lab_guests}
    for pid in PROC.pids():
        argv = PROC.cmdline(pid) or ()
        if argv and os.path.basename(argv[0]).startswith("qemu-system") and any(lab.prefix in a for a in argv):
            assert pid in mine


def test_daemon_survives_libvirtd_restart(lab: Lab, lab_guests, daemon_proc):
    p, state, log = daemon_proc
    uuids = {g.uuid for g in lab_guests}
    wait_for(lambda: (lambda v: v and uuids <= set(v))(_vms_in_state(state, "libvirt")), 30,
             "the daemon on libvirt")
    try:
        lab.kill_libvirtd(signal.SIGKILL)
        wait_for(lambda: (lambda v: v and uuids <= set(v))(_vms_in_state(state, "proc")), 30,
                 "the daemon to fall back to /proc")
        assert p.poll() is None, log.read_text()[-2000:]
    finally:
        lab.start_libvirtd()
    wait_for(lambda: (lambda v: v and uuids <= set(v))(_vms_in_state(state, "libvirt")), 60,
             "the daemon back on libvirt")
    assert p.poll() is None
    text = log.read_text()
    assert "Traceback" not in text
    assert text.count("per-VM data from /proc") == 1, text[-3000:]


def test_guest_reported_memory_and_signals(lab_guests):
    from ksmctl.readings import vm_signals
    c = VmCollector(URI, events=False)
    try:
        vms = wait_for(lambda: (lambda v: v if all(v[g.uuid].guest_usable for g in lab_guests) else None)(
            by_uuid(c.collect())), 30, "balloon statistics reported by the guests")
    finally:
        c.close()
    mine = [vms[g.uuid] for g in lab_guests]
    for vm in mine:
        assert 0 < vm.guest_usable < vm.balloon_current and vm.guest_unused is not None
        assert vm.guest_swap_in is not None and vm.guest_major_faults is not None
    sig = vm_signals(mine, PROC.meminfo())
    assert sig["running_vms"] == len(lab_guests) and sig["excluded_vms"] == 1
    assert sig["committed_current_bytes"] == len(lab_guests) * 256 * 1024 * 1024
    assert 0 < sig["committed_current_ratio"] < 1
    assert sig["guest_free_vms"] == len(lab_guests) and sig["guest_free_bytes"] == sum(v.guest_usable for v in mine)


class _CountingConn:
    """The real connection; records how many domains each balloon fetch asks for. A
    wrapper only to count: every call goes to libvirtd and QEMU."""

    def __init__(self, real, asked: List[int]) -> None:
        self._real = real
        self._asked = asked

    def __getattr__(self, name):
        return getattr(self._real, name)

    def domainListGetStats(self, doms, stats, flags=0):
        self._asked.append(len(doms))
        return self._real.domainListGetStats(doms, stats, flags)


def test_balloon_statistics_fetched_when_due_and_on_balloon_events(lab: Lab, lab_guests):
    """With libvirt's events, a guest's balloon statistics are asked for about once per
    stats period (2 s in the lab's XML), not every tick, and are never more than one of
    the guest's updates behind; a balloon change reaches the collector as libvirt's event."""
    import libvirt

    class Module:
        def __getattr__(self, name):
            return getattr(libvirt, name)

        def openReadOnly(self, uri):
            return _CountingConn(libvirt.openReadOnly(uri), asked)

    asked: List[int] = []
    lazy = VmCollector(URI, libvirt_module=Module(), events=True)
    fresh = lab.conn()
    mine = {g.uuid: g for g in lab_guests}
    def stats() -> dict:
        return {d.UUIDString(): p for d, p in fresh.domainListGetStats(
            [fresh.lookupByUUIDString(u) for u in mine], libvirt.VIR_DOMAIN_STATS_BALLOON, 0)}

    wait_for(lambda: all("balloon.last-update" in p for p in stats().values()), 60,
             "every guest to report balloon statistics")
    try:
        lazy.collect()
        assert lazy._impl._balloon_events
        ticks = 0
        end = time.monotonic() + 10
        while time.monotonic() < end:
            time.sleep(0.5)
            lazy.collect()
            ticks += 1
            known = lazy._impl._known
            now = stats()
            for uuid in mine:
                have = known[uuid].balloon or {}
                # One update behind at most: the period (2 s) plus the second it waits.
                assert now[uuid]["balloon.last-update"] - have.get("balloon.last-update", 0) <= 3, (uuid, have)
        per_guest = sum(asked) / len(mine)
        # Every tick would be `ticks` (about 20); once per period about 5, plus the first.
        assert 2 <= per_guest <= ticks / 2, (asked, ticks)

        g = next(g for g in lab_guests if not g.nosharepages)
        dom = lab.conn().lookupByUUIDString(g.uuid)
        try:
            dom.setMemory(224 * 1024)  # KiB: the guest's balloon inflates by 32 MiB
            wait_for(lambda: g.uuid in lazy._impl._balloon_marked, 20, "libvirt's balloon-change event")
            vm = wait_for(lambda: (lambda v: v if v.balloon_current < 256 << 20 else None)(
                by_uuid(lazy.collect())[g.uuid]), 20, "the smaller balloon in the readings")
            assert vm.balloon_current == dom.info()[2] * 1024
        finally:
            dom.setMemory(256 * 1024)
            wait_for(lambda: dom.info()[2] == 256 * 1024, 30, "the balloon back at 256 MiB")
    finally:
        lazy.close()
