"""Readers on fixture trees: new and old kernels, odd values, garbage."""
from __future__ import annotations

import functools
import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ksmctl.collectors.host import CollectionFailed, HostCollector
from ksmctl.collectors.procfs import Process, ProcFs, parse_ksm_stat, parse_psi
from ksmctl.kernel.sysfs import KsmSysfs, parse_advisor_mode
from ksmctl.errors import ErrorSource, KsmNotAvailable, ReadError
from ksmctl.kernel.knobs import attribute_names
from ksmctl.readings import KsmStat, VmSource

from .fixtures import KSM_STAT_NEW, OLD_KERNEL_DROPS, make_proc, make_sys


def test_new_kernel_reads_every_attribute(tmp_path):
    s = KsmSysfs(str(make_sys(tmp_path)), page_size=4096).read()
    assert s.unsupported == frozenset()
    assert set(s.values) | {"advisor_mode"} == set(attribute_names())
    assert s.advisor_mode == "none" and s.advisor_modes == ("none", "scan-time")
    assert s.get("pages_sharing") == 25000 and s.running
    assert s.saved_bytes == (25000 + 500) * 4096


def test_old_kernel_reports_missing_attributes_as_unsupported(tmp_path):
    s = KsmSysfs(str(make_sys(tmp_path, drop=OLD_KERNEL_DROPS)), page_size=4096).read()
    assert s.unsupported == frozenset(OLD_KERNEL_DROPS)
    assert s.advisor_mode is None and s.unreadable == {}
    assert s.saved_bytes == 25000 * 4096  # no ksm_zero_pages on this kernel


def test_negative_general_profit(tmp_path):
    s = KsmSysfs(str(make_sys(tmp_path, {"general_profit": "-4096000"}))).read()
    assert s.get("general_profit") == -4096000


def test_garbage_in_one_file_costs_only_that_attribute(tmp_path):
    s = KsmSysfs(str(make_sys(tmp_path, {"pages_sharing": "lots", "advisor_mode": "none scan-time"}))).read()
    assert "pages_sharing" not in s.values and s.get("pages_shared") == 1000
    assert "expected an integer, found 'lots'" in s.unreadable["pages_sharing"]
    assert str(tmp_path / "kernel/mm/ksm/pages_sharing") in s.unreadable["pages_sharing"]
    assert "one [selected]" in s.unreadable["advisor_mode"]


def test_no_ksm_in_kernel(tmp_path):
    with pytest.raises(KsmNotAvailable, match="CONFIG_KSM"):
        KsmSysfs(str(tmp_path)).read()


def test_advisor_mode_parsing():
    assert parse_advisor_mode("none [scan-time]") == ("scan-time", ("none", "scan-time"))
    with pytest.raises(ValueError):
        parse_advisor_mode("none scan-time")


def test_meminfo_psi_and_ksmd_cpu(tmp_path):
    p = ProcFs(str(make_proc(tmp_path, ksmd_ticks=(150, 50))))
    m = p.meminfo()
    assert m.total == 24683656 * 1024 and m.available == 21000000 * 1024 and m.buffers == 100000 * 1024
    psi = p.psi()
    assert (psi.some_avg10, psi.some_avg60, psi.full_avg10, psi.full_avg60) == (1.5, 0.75, 0.25, 0.05)
    assert p.ksmd_pid() == 36
    assert p.ksmd_cpu_seconds() == pytest.approx(200 / os.sysconf("SC_CLK_TCK"))


def test_missing_psi_is_not_an_error(tmp_path):
    assert ProcFs(str(make_proc(tmp_path, psi=None))).psi() is None


def test_bad_meminfo_names_file_and_field(tmp_path):
    p = ProcFs(str(make_proc(tmp_path, meminfo="MemTotal: lots kB\nMemFree: 1 kB\n")))
    with pytest.raises(ReadError, match=r"meminfo: MemTotal: expected '<number> kB', found 'lots kB'"):
        p.meminfo()
    with pytest.raises(ReadError, match="avg10: expected a number"):
        parse_psi("some avg10=x avg60=1\n")


def test_ksm_stat_both_line_formats():
    st = parse_ksm_stat(KSM_STAT_NEW)
    assert (st.rmap_items, st.zero_pages, st.merging_pages, st.process_profit) == (2048, 3, 1500, 5963776)
    assert st.merge_any is False and st.mergeable is True
    old = parse_ksm_stat("ksm_rmap_items 5\n")  # 6.1: one field only
    assert old.rmap_items == 5 and old.merging_pages is None and old.mergeable is None


_KSM_KEYS = ["ksm_rmap_items", "ksm_zero_pages", "ksm_merging_pages", "ksm_process_profit",
             "ksm_merge_any:", "ksm_mergeable:", "ksm_future_field", "other", "ksm_rmap_items:",
             "ksm_mergeable", "ksm_merge_any"]
_KSM_VALUES = ["0", "12", "-3", "+7", "yes", "no", "x", "1.5", "", "yes:"]
_NUMBERS = {"ksm_rmap_items": "rmap_items", "ksm_zero_pages": "zero_pages",
            "ksm_merging_pages": "merging_pages", "ksm_process_profit": "process_profit"}
_FLAGS = {"ksm_merge_any": "merge_any", "ksm_mergeable": "mergeable"}


def reference_ksm_stat(text: str) -> KsmStat:
    """The rule, spelled out: the last 'name value' line of each field counts (a ':' after
    the name allowed); numbers are numbers, flags yes/no; a value of the wrong kind makes
    the field unknown; any other value is ignored."""
    last = {}
    for line in text.splitlines():
        m = re.fullmatch(r"\s*(\w+):?\s+(\S+)\s*", line)
        if m is None:
            continue
        key, value = m.groups()
        if value in ("yes", "no"):
            last[key] = value == "yes"
        elif re.fullmatch(r"[+-]?[0-9]+", value):
            last[key] = int(value)
    kw = {f: last[k] for k, f in _NUMBERS.items() if type(last.get(k)) is int}
    kw.update({f: last[k] for k, f in _FLAGS.items() if type(last.get(k)) is bool})
    return KsmStat(**kw)


_pair = st.tuples(st.sampled_from(_KSM_KEYS), st.sampled_from(_KSM_VALUES)).map(list)  # mostly well formed
_junk = st.lists(st.sampled_from(_KSM_KEYS + _KSM_VALUES), min_size=0, max_size=3)


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.one_of(_pair, _pair, _junk), max_size=8))
def test_ksm_stat_parser_agrees_with_reference(lines):
    """parse_ksm_stat pairs tokens in one pass for speed; on any layout it must give what
    the rule says."""
    text = "\n".join(" ".join(words) for words in lines) + "\n"
    assert parse_ksm_stat(text) == reference_ksm_stat(text)


def test_ksm_stat_kernel_fields_round_trip():
    st_ = parse_ksm_stat(KSM_STAT_NEW)
    fields = st_.kernel_fields()
    assert fields["ksm_merging_pages"] == 1500 and fields["ksm_mergeable"] is True
    text = "".join("%s %s\n" % (k, ("yes" if v else "no") if type(v) is bool else v) for k, v in fields.items())
    assert parse_ksm_stat(text) == st_
    assert parse_ksm_stat("ksm_rmap_items 5\n").kernel_fields() == {"ksm_rmap_items": 5}


def test_processes_lists_user_processes_with_argv_and_comm(tmp_path):
    procs = {300: {"cmdline": "/usr/bin/python3\0-m\0ksmctl\0daemon\0", "comm": "python3\n"},
             200: {"cmdline": "/bin/bash\0/usr/sbin/ksmtuned\0", "comm": "ksmtuned\n"},
             201: {"cmdline": "", "comm": "zombie\n"},          # zombie: empty command line
             202: {"comm": "gone\n"}}                         # exited before cmdline was read
    p = ProcFs(str(make_proc(tmp_path, processes=procs)))
    (tmp_path / "self").mkdir()
    assert list(p.pids()) == [36, 200, 201, 202, 300]
    assert list(p.processes()) == [Process(200, ("/bin/bash", "/usr/sbin/ksmtuned"), "ksmtuned"),
                                   Process(300, ("/usr/bin/python3", "-m", "ksmctl", "daemon"), "python3")]
    assert p.cmdline(36) == () and p.cmdline(999) is None and p.comm(999) is None
    assert p.ksm_stat(999) is None and p.statm_bytes(999) is None and p.smaps(999) is None


def test_smaps_is_read_whole_on_the_real_proc():
    """smaps is a seq_file of one record per mapping: each read() hands out one buffer
    (about a page), so a short read is not its end. A process with many mappings (a
    Python that imported a few modules) has every mapping read, the last one included."""
    import subprocess
    import sys
    code = "import json, decimal, sqlite3, ssl, sys; print('ready', flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"   # imported: its mappings are settled
        text = ProcFs().smaps(child.pid)
        with open("/proc/%d/maps" % child.pid) as f:
            mappings = len(f.read().splitlines())
        assert text is not None and len(text) > 16384
        assert text.count("VmFlags:") == mappings
    finally:
        child.stdin.close()
        child.wait(timeout=30)


def test_unlistable_proc_names_the_directory(tmp_path):
    with pytest.raises(ReadError, match=str(tmp_path / "nope")):
        list(ProcFs(str(tmp_path / "nope")).pids())


def test_mergeable_rss_counts_only_mergeable_processes_and_only_their_anonymous_pages(tmp_path):
    """KSM merges private anonymous pages only: statm's file and shmem pages (its third
    field) are out of its reach, a guest's shared-memfd RAM (vhost-user, virtiofs) too."""
    page = os.sysconf("SC_PAGE_SIZE")
    procs = {100: {"ksm_stat": KSM_STAT_NEW, "statm": "5000 1000 10 1 0 900 0\n", "comm": "qemu\n"},
             101: {"ksm_stat": KSM_STAT_NEW.replace("ksm_mergeable: yes", "ksm_mergeable: no"),
                   "statm": "5000 3000 10 1 0 900 0\n", "comm": "bash\n"},
             102: {"ksm_stat": KSM_STAT_NEW, "statm": "90000 70000 65000 1 0 900 0\n", "comm": "qemu\n"},
             103: {"ksm_stat": KSM_STAT_NEW, "statm": "9 5 7 0 0 0 0\n", "comm": "odd\n"},
             104: {"ksm_stat": KSM_STAT_NEW, "statm": "9 \xff 7\n", "comm": "garbled\n"}}
    p = ProcFs(str(make_proc(tmp_path, processes=procs)))
    assert p.mergeable_rss() == (990 + 5000) * page
    assert p.statm_bytes(102) == (70000 * page, 5000 * page)
    assert p.statm_bytes(103).anon == 0 and p.statm_bytes(104) is None


def test_host_collector_skips_tick_without_meminfo_but_tolerates_missing_psi(tmp_path):
    sysfs = KsmSysfs(str(make_sys(tmp_path / "sys")))
    proc_root = make_proc(tmp_path / "proc", psi=None)
    r = HostCollector(sysfs, ProcFs(str(proc_root))).collect()
    assert r.psi is None and r.meminfo is not None and r.errors == ()
    (proc_root / "meminfo").unlink()
    with pytest.raises(CollectionFailed) as e:
        HostCollector(sysfs, ProcFs(str(proc_root))).collect()
    assert e.value.source is ErrorSource.PROC and "meminfo" in e.value.message


def test_real_host_reads_without_errors():
    """This machine's own /sys and /proc (read-only)."""
    s = KsmSysfs().read()
    assert s.unreadable == {} and "run" in s.values
    r = HostCollector(KsmSysfs(), ProcFs()).collect()
    assert r.meminfo.total > 0 and r.ksmd_cpu_seconds is not None


def test_mergeable_memory_takes_guests_from_vm_readings(tmp_path):
    """Guests' mergeable RSS comes from the VM collector's readings (read once per tick),
    other processes' from /proc."""
    from ksmctl.readings import KsmStat, VmReading
    page = os.sysconf("SC_PAGE_SIZE")
    procs = {100: {"ksm_stat": KSM_STAT_NEW, "statm": "5000 1000 10 1 0 900 0\n"},
             200: {"ksm_stat": KSM_STAT_NEW, "statm": "5000 9 2 1 0 900 0\n"}}

    class Vms:
        errors = [(ErrorSource.LIBVIRT, "domain x vanished")]
        source = VmSource.LIBVIRT

        def collect(self):
            return (VmReading(uuid="u", name="g", pid=100, rss=150 * page, anon_rss=123 * page,
                              ksm=KsmStat(mergeable=True)),
                    VmReading(uuid="v", name="off", pid=300, rss=999 * page, anon_rss=999 * page,
                              ksm=KsmStat(mergeable=False)))

    sysfs = KsmSysfs(str(make_sys(tmp_path / "sys")))
    r = HostCollector(sysfs, ProcFs(str(make_proc(tmp_path / "proc", processes=procs))), vms=Vms()).collect()
    assert r.mergeable_rss == (123 + 7) * page
    assert (ErrorSource.LIBVIRT, "domain x vanished") in r.errors and r.vm_source is VmSource.LIBVIRT


def test_guests_count_as_mergeable_from_their_configuration_where_the_kernel_does_not_say(tmp_path):
    """Before ksm_stat said ksm_mergeable (2025), and without ksm_stat at all (before 6.1),
    a guest that ksmd has not reached yet counted as nothing: one started while ksmctl was
    idle stayed unseen until the idle crawl reached it, hours on a large host. Now its
    configuration decides (QEMU marks guest RAM mergeable unless mem-merge=off or
    nosharepages), and the kernel's word, where it gives one, wins. A fixture /proc: this
    host's kernel writes ksm_mergeable, and the 6.1 guest of test_deb_guest.py runs no QEMU."""
    from ksmctl.collectors.host import guest_mergeable
    from ksmctl.readings import VmReading
    page = os.sysconf("SC_PAGE_SIZE")
    old_stat = KsmStat(rmap_items=0, merging_pages=0)            # 6.1: no ksm_mergeable line
    guests = (VmReading(uuid="a", name="new-on-6.1", pid=100, anon_rss=100 * page, ksm=old_stat),
              VmReading(uuid="b", name="on-5.14", pid=101, anon_rss=20 * page, ksm=None),
              VmReading(uuid="c", name="nosharepages", pid=102, anon_rss=3000 * page, ksm=old_stat, excluded=True),
              VmReading(uuid="d", name="kernel-says-no", pid=103, anon_rss=5000 * page, ksm=KsmStat(mergeable=False)),
              VmReading(uuid="e", name="seen", pid=104, anon_rss=4 * page, ksm=KsmStat(rmap_items=9), excluded=True))
    assert [guest_mergeable(v) for v in guests] == [True, True, False, False, True]

    class Vms:
        errors: list = []
        source = VmSource.PROC

        def collect(self):
            return guests

    # The 5.14 guest's pid has no ksm_stat in /proc: it must not be looked up there too.
    procs = {pid: {"statm": "5000 77 10 1 0 900 0\n"} for pid in (100, 101, 102, 103, 104)}
    sysfs = KsmSysfs(str(make_sys(tmp_path / "sys")))
    r = HostCollector(sysfs, ProcFs(str(make_proc(tmp_path / "proc", processes=procs))), vms=Vms()).collect()
    assert r.mergeable_rss == (100 + 20 + 4) * page


def test_vm_table_round_trips_to_the_dicts_traces_hold():
    """The state file's VM table decodes to exactly what Readings.to_dict writes for traces."""
    from ksmctl.readings import KsmStat, KsmState, Readings, VmReading, vm_dicts, vms_table
    vms = (VmReading(uuid="u1", name="a", pid=7, balloon_current=1 << 30, rss=5,
                     ksm=KsmStat(rmap_items=1, zero_pages=2, merging_pages=3, process_profit=4,
                                 merge_any=False, mergeable=True)),
           VmReading(uuid="u2", name="b", state="paused", excluded=True))
    r = Readings(monotonic=1.0, wall=2.0, ksm=KsmState(values={}), vms=vms)
    assert vm_dicts(r.to_dict(vm_table=True)["vms"]) == r.to_dict()["vms"]
    assert vm_dicts(vms_table(())) == []
    assert vm_dicts({"fields": ["uuid"]}) is None and vm_dicts("x") is None


def _smaps_text(mg_anon_kib: int, other_anon_kib: int = 65536) -> str:
    """Two mappings as QEMU has them: guest RAM (mergeable) and its own heap."""
    return ("7f0000000000-7f0040000000 rw-p 00000000 00:00 0\nRss: %d kB\nAnonymous: %d kB\n"
            "VmFlags: rd wr mr mw me ac sd mg\n"
            "55d000000000-55d004000000 rw-p 00000000 00:00 0 [heap]\nRss: %d kB\nAnonymous: %d kB\n"
            "VmFlags: rd wr mr mw me ac sd\n" % (mg_anon_kib, mg_anon_kib, other_anon_kib, other_anon_kib))


def _coverage_host(tmp_path, rmap_items: int, mg_anon_kib: int):
    page = os.sysconf("SC_PAGE_SIZE")
    stat = KSM_STAT_NEW.replace("ksm_rmap_items 2048", "ksm_rmap_items %d" % rmap_items)
    procs = {100: {"ksm_stat": stat, "statm": "5000 1000 10 1 0 900 0\n", "smaps": _smaps_text(mg_anon_kib)}}
    sys_root, proc_root = make_sys(tmp_path / "sys"), make_proc(tmp_path / "proc", processes=procs)
    collector = HostCollector(KsmSysfs(str(sys_root)), ProcFs(str(proc_root)))
    return collector, sys_root / "kernel/mm/ksm/full_scans", proc_root / "100", page


def test_coverage_is_read_at_a_boundary_when_wanted_for_the_processes_that_grew(tmp_path):
    """The pass more for growth behind ksmd's cursor (policy resume.py) is dropped only on
    this reading, so it is read at the tick that sees full_scans move, when the daemon
    asks, for the processes whose memory grew since the tick before the boundary before."""
    collector, full_scans, proc, page = _coverage_host(tmp_path, rmap_items=2000, mg_anon_kib=8192)
    tick = functools.partial(collector.collect, coverage_wanted=True)   # the daemon asks
    assert tick().coverage is None                                    # the first tick (full_scans 9): none known
    full_scans.write_text("11\n")
    c = tick().coverage                                               # a boundary; everything new since
    assert c is not None and (c.processes, c.mergeable_pages, c.rmap_items) == (1, 8192 * 1024 // page, 2000)
    assert c.unseen_pages == 8192 * 1024 // page - 2000
    assert tick().coverage is None                                    # no boundary this tick
    full_scans.write_text("12\n")
    c = tick().coverage                                               # nothing grew since the tick before 11
    assert c is not None and (c.processes, c.unseen_pages) == (0, 0)
    (proc / "statm").write_text("5000 1010 10 1 0 900 0\n")           # +10 pages: too little to read, unseen
    tick()
    full_scans.write_text("13\n")
    c = tick().coverage
    assert c is not None and (c.processes, c.unseen_pages) == (0, 10)
    (proc / "statm").write_text("5000 4000 10 1 0 900 0\n")
    tick()
    full_scans.write_text("14\n")
    assert collector.collect().coverage is None                        # not asked: smaps is not walked


@pytest.mark.parametrize("breakage", ["no_rmap_items", "too_many"])
def test_coverage_that_cannot_tell_is_none(tmp_path, monkeypatch, breakage):
    """None keeps the pass more: a kernel before 6.1 (no ksm_rmap_items), more grown
    processes than are worth walking."""
    import ksmctl.collectors.coverage as coverage
    collector, full_scans, proc, page = _coverage_host(tmp_path, rmap_items=2000, mg_anon_kib=8192)
    if breakage == "no_rmap_items":
        (proc / "ksm_stat").write_text("ksm_merging_pages 1500\nksm_mergeable: yes\n")
    else:
        monkeypatch.setattr(coverage, "MAX_PROCESSES", 0)
    collector.collect(coverage_wanted=True)
    full_scans.write_text("11\n")
    r = collector.collect(coverage_wanted=True)
    assert r.coverage is None and r.mergeable_rss is not None and r.errors == ()


@pytest.mark.parametrize("smaps", ["directory", "fifo", "device", "unreadable"])
def test_a_grown_process_whose_smaps_cannot_be_read_is_counted_unreadable(tmp_path, smaps):
    """The shipped unit's daemon cannot read another user's smaps (no CAP_SYS_PTRACE): the
    reading says so, and no error is counted, since that is the unit as shipped. A FIFO
    or a device where the file belongs must not hang the tick."""
    collector, full_scans, proc, page = _coverage_host(tmp_path, rmap_items=2000, mg_anon_kib=8192)
    (proc / "smaps").unlink()
    if smaps == "directory":
        (proc / "smaps").mkdir()
    elif smaps == "fifo":
        os.mkfifo(str(proc / "smaps"))
    elif smaps == "device":
        (proc / "smaps").symlink_to("/dev/zero")
    else:
        (proc / "smaps").write_text("x")
        (proc / "smaps").chmod(0)
        if os.geteuid() == 0:   # root reads a mode-0 file: make it a dangling link instead
            (proc / "smaps").unlink()
            (proc / "smaps").symlink_to(tmp_path / "nowhere")
    collector.collect(coverage_wanted=True)
    full_scans.write_text("11\n")
    r = collector.collect(coverage_wanted=True)
    assert r.coverage is not None and (r.coverage.processes, r.coverage.unreadable) == (0, 1) and r.errors == ()


def test_a_grown_process_that_exited_is_left_out(tmp_path):
    collector, full_scans, proc, page = _coverage_host(tmp_path, rmap_items=2000, mg_anon_kib=8192)
    collector.collect(coverage_wanted=True)
    full_scans.write_text("11\n")
    gone = collector.coverage.read({100: 4000 * page, 555: 9000 * page}, {})
    assert gone is not None and gone.processes == 1 and gone.unseen_pages == 8192 * 1024 // page - 2000


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_device_where_a_process_file_belongs_does_not_hang_a_tick(tmp_path, kind):
    """statm and ksm_stat are kept open and read every tick; a FIFO would block the open,
    /dev/zero would never end."""
    procs = {100: {"ksm_stat": KSM_STAT_NEW, "statm": "5000 1000 10 1 0 900 0\n"},
             101: {"ksm_stat": KSM_STAT_NEW}}
    proc_root = make_proc(tmp_path / "proc", processes=procs)
    for name in ("statm",):
        target = proc_root / "101" / name
        if kind == "fifo":
            os.mkfifo(str(target))
        else:
            target.symlink_to("/dev/zero")
    (proc_root / "102").mkdir()
    (proc_root / "102" / "ksm_stat").symlink_to("/dev/zero")
    p = ProcFs(str(proc_root))
    page = os.sysconf("SC_PAGE_SIZE")
    assert p.mergeable_anon() == {100: 990 * page, 101: 0}
    assert p.statm_bytes(101) is None and p.smaps(101) is None
