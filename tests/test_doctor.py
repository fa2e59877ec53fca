"""`ksmctl doctor` on fixture trees: hosts of every shape that matters (two NUMA nodes, a
kernel without use_zero_pages/smart_scan, a vendor knob, THP always/madvise/never, KSM
missing) and guests configured each way that keeps memory from merging, each named with
its evidence. The real libvirt guests are in tests/test_doctor_lab.py."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from click.testing import CliRunner

from ksmctl.cli import cli
from ksmctl.collectors.memlayout import parse_cpu_list, parse_smaps, selected
from ksmctl.collectors.vms.backends import parse_guest_ram
from ksmctl.doctor.report import EXIT_PROBLEM
from ksmctl.units import format_bytes

from .fixtures import KSM_STAT_NEW, OLD_KERNEL_DROPS, make_proc, make_sys

GIB = 1 << 30
RAM_START = 0x7f0000000000


def _smaps(size: int, flags: str, path: str = "", rss: Optional[int] = None, anon_huge: int = 0,
           locked: int = 0) -> str:
    rss = size if rss is None else rss
    return ("%x-%x rw-p 00000000 00:00 0          %s\nSize: %d kB\nRss: %d kB\nAnonHugePages: %d kB\n"
            "Locked: %d kB\nVmFlags: %s\n" % (RAM_START, RAM_START + size, path, size // 1024, rss // 1024,
                                              anon_huge // 1024, locked // 1024, flags)
            + "55d000000000-55d000001000 r-xp 00000000 fd:00 1 /usr/bin/qemu-system-x86_64\n"
              "Size: 4 kB\nRss: 4 kB\nAnonHugePages: 0 kB\nLocked: 0 kB\nVmFlags: rd ex mr mw me\n")


def _qemu(name: str, extra: List[str], smaps: str, ksm_stat: str = KSM_STAT_NEW) -> Dict[str, str]:
    argv = ["/usr/bin/qemu-system-x86_64", "-name", "guest=%s,debug-threads=on" % name,
            "-uuid", "00000000-0000-4000-8000-%012d" % abs(hash(name) % 10 ** 12), "-m", "1024"] + extra
    return {"cmdline": "\0".join(argv) + "\0", "comm": "qemu-system-x86\n", "ksm_stat": ksm_stat,
            "statm": "262144 131072 0 0 0 0 0\n", "smaps": smaps,
            "stat": "1 (qemu-system-x86) S 1 1 1 0 -1 0 0 0 0 0 10 10 0 0 20 0 1 0 1 0 0\n"}


RAM_JSON = '{"qom-type":"memory-backend-ram","id":"pc.ram","size":1073741824}'
GUESTS = {
    2001: _qemu("plain", ["-machine", "pc,memory-backend=pc.ram", "-object", RAM_JSON],
                _smaps(GIB, "rd wr mr mw me ac mg")),
    2002: _qemu("noshare", ["-machine", "pc,mem-merge=off,memory-backend=pc.ram", "-object", RAM_JSON],
                _smaps(GIB, "rd wr mr mw me ac"),
                ksm_stat="ksm_rmap_items 0\nksm_zero_pages 0\nksm_merging_pages 0\nksm_process_profit 0\n"
                         "ksm_merge_any: no\nksm_mergeable: no\n"),
    2003: _qemu("huge", ["-machine", "pc,memory-backend=pc.ram", "-object",
                         '{"qom-type":"memory-backend-file","id":"pc.ram","mem-path":"/dev/hugepages/libvirt/'
                         'qemu/3-huge","prealloc":true,"size":1073741824}'],
                _smaps(GIB, "rd wr mr mw me de ht", path="/dev/hugepages/libvirt/qemu/3-huge/qemu_back_mem")),
    2004: _qemu("vhost", ["-machine", "pc,memory-backend=pc.ram", "-object",
                          '{"qom-type":"memory-backend-memfd","id":"pc.ram","share":true,"size":1073741824}'],
                _smaps(GIB, "rd wr sh mr mw me ms", path="/memfd:pc.ram (deleted)")),
}


def _host(tmp_path: Path, ksm: Optional[Dict[str, str]] = None, drop=(), thp: Optional[str] = "always [madvise] never",
          nodes: Optional[str] = "0", processes: Optional[Dict[int, Dict[str, str]]] = None,
          extra_ksm_files: Optional[Dict[str, str]] = None, no_ksm: bool = False) -> List[str]:
    sys_root = tmp_path / "sys"
    if no_ksm:
        sys_root.mkdir()
    else:
        make_sys(sys_root, ksm, drop)
        for name, value in (extra_ksm_files or {}).items():
            (sys_root / "kernel/mm/ksm" / name).write_text(value + "\n")
    if thp is not None:
        t = sys_root / "kernel/mm/transparent_hugepage"
        (t / "khugepaged").mkdir(parents=True)
        (t / "enabled").write_text(thp + "\n")
        (t / "defrag").write_text("always defer defer+madvise [madvise] never\n")
        (t / "khugepaged/defrag").write_text("1\n")
    if nodes is not None:
        n = sys_root / "devices/system/node"
        n.mkdir(parents=True)
        (n / "has_memory").write_text(nodes + "\n")
    proc = make_proc(tmp_path / "proc", processes=processes or {})
    cfg = tmp_path / "config.yaml"
    cfg.write_text("libvirt: false\nstate_file: %s\nstate_dir: %s\nrun_root: %s\n"
                   % (tmp_path / "state.json", tmp_path / "lib", tmp_path / "run"))
    return ["--sys-root", str(sys_root), "--proc-root", str(proc), "--config", str(cfg)]


def _doctor(args: List[str], *extra: str):
    r = CliRunner().invoke(cli, args + ["doctor", "--json", "--cpu-window", "0", *extra])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    return r, (json.loads(r.output) if r.output.startswith("{") else None)


def _reasons(doc, vm: Optional[str] = None) -> Dict[str, dict]:
    return {f["reason"]: f for f in doc["findings"] if f["vm"] == vm}


def test_guests_that_cannot_merge_are_named_with_their_evidence(tmp_path):
    r, doc = _doctor(_host(tmp_path, processes=GUESTS))
    assert r.exit_code == 0, r.output   # deliberate opt-outs and backends are not "problems"
    vms = {v["name"]: v for v in doc["vms"]}
    assert vms["plain"]["can_merge"] and vms["plain"]["unmergeable"] == []
    assert vms["noshare"]["unmergeable"] == ["mem_merge_off"]
    assert vms["huge"]["unmergeable"] == ["hugetlbfs"]
    assert vms["vhost"]["unmergeable"] == ["shared_memory"]
    plain = _reasons(doc, "plain")
    assert plain["merging"]["severity"] == "ok" and "1500" in plain["merging"]["cause"]
    huge = _reasons(doc, "huge")["hugetlbfs"]
    sources = {e["source"] for e in huge["evidence"]}
    assert "QEMU command line (/proc/2003/cmdline)" in sources and "/proc/2003/smaps" in sources
    assert "<hugepages/>" in huge["remedy"]
    vhost = _reasons(doc, "vhost")["shared_memory"]
    assert any(e["what"] == "-object pc.ram share" for e in vhost["evidence"])
    off = _reasons(doc, "noshare")["mem_merge_off"]
    assert off["evidence"][0] == {"what": "-machine mem-merge", "value": "off",
                                  "source": "QEMU command line (/proc/2002/cmdline)"}
    # a guest that cannot merge gets no "merging"/"not merged yet" line
    assert "merging" not in _reasons(doc, "huge") and "not_merged_yet" not in _reasons(doc, "noshare")


def test_stale_merges_compare_ksm_stat_with_the_ksm_lines_of_smaps(tmp_path):
    """ksm_merging_pages 1500 (KSM_STAT_NEW), 250 pages mapping a KSM page: 1250 stale. The
    same guest on a kernel before 6.7 (no KSM: lines) gets no such finding: nothing to tell."""
    smaps = _smaps(GIB, "rd wr mr mw me ac mg")
    guests = {2030: _qemu("rewrote", [], smaps.replace("Locked:", "KSM: 500 kB\nLocked:")),
              2031: _qemu("old-kernel", [], smaps)}
    r, doc = _doctor(_host(tmp_path, processes=guests))
    assert r.exit_code == 0, r.output
    f = _reasons(doc, "rewrote")["stale_merges"]
    assert f["severity"] == "info" and f["cause"].startswith("1250 of the 1500 pages"), f
    assert {"what": "KSM (sum over its mappings)", "value": format_bytes(1000 * 1024),
            "source": "/proc/2030/smaps"} in f["evidence"]
    assert "stale_merges" not in _reasons(doc, "old-kernel") and "merging" in _reasons(doc, "old-kernel")
    assert "swapped out" not in f["cause"]
    swapping = {2032: _qemu("swapping", [], smaps.replace("Locked:", "KSM: 500 kB\nSwap: 8192 kB\nLocked:"))}
    r, doc = _doctor(_host(tmp_path / "swap", processes=swapping))
    f = _reasons(doc, "swapping")["stale_merges"]
    assert f["cause"].endswith("or they are swapped out (%s of its memory is)" % format_bytes(16384 * 1024)), f


def test_unexplained_unmergeable_guest_is_a_problem_and_sets_the_exit_code(tmp_path):
    stat = "ksm_rmap_items 0\nksm_merging_pages 0\nksm_mergeable: no\n"
    guests = {2010: _qemu("odd", [], _smaps(GIB, "rd wr mr mw me ac"), ksm_stat=stat)}
    r, doc = _doctor(_host(tmp_path, processes=guests))
    assert r.exit_code == EXIT_PROBLEM, r.output
    f = _reasons(doc, "odd")["not_mergeable"]
    assert f["severity"] == "problem" and doc["problems"] == 1 and doc["worst"] == "problem"
    assert {"what": "ksm_mergeable", "value": "no", "source": "/proc/2010/ksm_stat"} in f["evidence"]


def test_one_guest_by_name_and_an_unknown_name(tmp_path):
    args = _host(tmp_path, processes=GUESTS)
    r, doc = _doctor(args, "huge")
    assert r.exit_code == 0 and [v["name"] for v in doc["vms"]] == ["huge"]
    r = CliRunner().invoke(cli, args + ["doctor", "nosuch"])
    assert r.exit_code == 2 and "no running guest named 'nosuch'" in r.output and "huge" in r.output


def test_guest_in_huge_pages_and_locked(tmp_path):
    guests = {2020: _qemu("thp", ["-overcommit", "mem-lock=on"],
                          _smaps(GIB, "rd wr mr mw me ac hg mg lo", anon_huge=GIB // 4 * 3, locked=GIB))}
    _r, doc = _doctor(_host(tmp_path, processes=guests))
    f = _reasons(doc, "thp")
    assert "75%" in f["guest_thp"]["cause"] and f["locked"]["severity"] == "info"
    assert doc["vms"][0]["can_merge"]


@pytest.mark.parametrize("mode,severity", [("[always] madvise never", "warning"),
                                           ("always [madvise] never", "info"), ("always madvise [never]", None)])
def test_thp_modes(tmp_path, mode, severity):
    _r, doc = _doctor(_host(tmp_path, thp=mode))
    f = _reasons(doc).get("thp")
    assert (f["severity"] if f else None) == severity
    if f:
        assert f["evidence"][0]["source"].endswith("transparent_hugepage/enabled") and "TLB" in f["cause"]


def test_two_numa_nodes(tmp_path):
    _r, doc = _doctor(_host(tmp_path, ksm={"merge_across_nodes": "0"}, nodes="0-1"))
    f = _reasons(doc)["numa_separate"]
    assert "2 NUMA nodes" in f["cause"] and "merge_across_nodes" in f["remedy"]
    _r, doc = _doctor(_host(tmp_path / "b", ksm={"merge_across_nodes": "1"}, nodes="0-1"))
    assert "numa_across" in _reasons(doc)
    _r, doc = _doctor(_host(tmp_path / "c", ksm={"merge_across_nodes": "0"}, nodes="0"))
    assert not {"numa_across", "numa_separate"} & set(_reasons(doc))


def test_old_kernel_and_a_vendor_knob(tmp_path):
    args = _host(tmp_path, ksm={"use_zero_pages": "1"}, drop=OLD_KERNEL_DROPS + ("use_zero_pages",),
                 extra_ksm_files={"zero_pages_only": "1"})
    r, doc = _doctor(args)
    assert r.exit_code == 0, r.output
    found = _reasons(doc)
    assert "use_zero_pages" not in found and "smart_scan" not in found
    v = found["vendor_knob"]
    assert v["evidence"][0]["what"] == "zero_pages_only" and v["evidence"][0]["value"] == "1"
    assert "never writes it" in v["cause"]


def test_zero_pages_sharing_cap_and_negative_profit(tmp_path):
    args = _host(tmp_path, ksm={"use_zero_pages": "1", "stable_node_chains": "12", "stable_node_dups": "40",
                                "general_profit": "-4096000"})
    _r, doc = _doctor(args)
    f = _reasons(doc)
    assert "ksm_zero_pages" in f["use_zero_pages"]["cause"]
    assert f["page_sharing_cap"]["severity"] == "warning" and "max_page_sharing=256" in f["page_sharing_cap"]["cause"]
    assert f["profit_negative"]["severity"] == "warning"


def test_ksm_off_with_mergeable_memory_and_no_daemon_is_a_problem(tmp_path):
    r, doc = _doctor(_host(tmp_path, ksm={"run": "0"}, processes=GUESTS))
    f = _reasons(doc)["ksm_off"]
    assert f["severity"] == "problem" and r.exit_code == EXIT_PROBLEM
    assert _reasons(doc, "plain")["merging"]   # its pages stay merged while KSM is off


def test_no_ksm_in_this_kernel(tmp_path):
    r, doc = _doctor(_host(tmp_path, no_ksm=True))
    assert r.exit_code == EXIT_PROBLEM and doc["findings"][0]["reason"] == "ksm_unavailable"


def test_text_output_names_each_vm_and_the_exit_code_is_documented(tmp_path):
    r = CliRunner().invoke(cli, _host(tmp_path, processes=GUESTS) + ["doctor", "--cpu-window", "0"])
    assert r.exit_code == 0
    assert "VM huge (" in r.output and "cannot merge (hugetlbfs)" in r.output and "VM plain (" in r.output
    assert "problems, worst finding" in r.output
    help_text = CliRunner().invoke(cli, ["doctor", "--help"]).output
    assert "5 when" in help_text


def test_parsers():
    assert parse_cpu_list("0-2,5\n") == (0, 1, 2, 5) and selected("always [madvise] never") == "madvise"
    maps = parse_smaps(_smaps(GIB, "rd wr mg ht", anon_huge=GIB // 2))
    assert maps[0].size == GIB and maps[0].mergeable and maps[0].hugetlb and maps[0].anon_huge == GIB // 2
    ram = parse_guest_ram(["qemu-kvm", "-machine", "q35,mem-merge=off", "-object",
                           "memory-backend-file,id=ram0,mem-path=/dev/hugepages,share=on,merge=off",
                           "-realtime", "mlock=on"])
    assert ram is not None and ram.mem_merge is False and ram.mem_lock
    b = ram.ram_backends[0]
    assert (b.id, b.share, b.merge, b.on_hugetlbfs) == ("ram0", True, False, True)
    assert parse_guest_ram(["/bin/bash"]) is None


def test_docs_list_exactly_the_reasons():
    from ksmctl.doctor.findings import Reason
    text = (Path(__file__).resolve().parent.parent / "docs" / "doctor.md").read_text()
    documented = set(__import__("re").findall(r"^\| `(\w+)` \| (?:host|VM) \|", text, __import__("re").M))
    assert documented == {r.value for r in Reason}


def test_the_daemon_exports_why_guests_cannot_merge(tmp_path):
    """ksmctl_vm_unmergeable{domain,uuid,reason}: the doctor's reasons for each guest, from
    its QEMU command line (parsed once per process) and ksm_stat, every tick."""
    from ksmctl.collectors.host import HostCollector
    from ksmctl.collectors.procfs import ProcFs
    from ksmctl.collectors.vms import VmCollector
    from ksmctl.config import Config
    from ksmctl.export.metrics import MetricsCollector, render_text
    from ksmctl.kernel.sysfs import KsmSysfs
    from ksmctl.kernel.writer import KsmWriter
    from ksmctl.policy.loader import LoadedPolicy, parse_policy
    from ksmctl.service.daemon import Daemon
    sys_root = make_sys(tmp_path / "sys")
    proc = ProcFs(str(make_proc(tmp_path / "proc", processes=GUESTS)))
    collector = HostCollector(KsmSysfs(str(sys_root)), proc, vms=VmCollector(uri=None, proc=proc, events=False))
    metrics = MetricsCollector()
    lp = LoadedPolicy(parse_policy("name: x\nrun: {mode: always}\n", "x.yaml"), "x.yaml", "3" * 64)
    d = Daemon(Config(state_file=str(tmp_path / "state.json")), lp, collector, KsmWriter(collector.sysfs, dry_run=True),
               observers=[metrics.observe])
    d.tick()
    lines = [l for l in render_text(metrics).decode().splitlines() if l.startswith("ksmctl_vm_unmergeable{")]
    got = {(l.split('domain="')[1].split('"')[0], l.split('reason="')[1].split('"')[0]) for l in lines}
    assert got == {("noshare", "mem_merge_off"), ("huge", "hugetlbfs"), ("vhost", "shared_memory")}, lines
    assert all(l.endswith(" 1.0") for l in lines)
    metrics_off = MetricsCollector(per_vm=False)
    metrics_off.observe(d.last)
    assert "ksmctl_vm_unmergeable" not in render_text(metrics_off).decode()


def test_live_reasons_parse_once_per_process_and_follow_changed_inputs():
    from ksmctl.doctor.vm import LiveReasons
    from ksmctl.readings import KsmStat, VmReading
    calls = []
    argv = ["/usr/bin/qemu-system-x86_64", "-machine", "pc,memory-backend=pc.ram", "-object", RAM_JSON]
    live = LiveReasons(lambda pid: calls.append(pid) or argv)
    vm = VmReading(uuid="u1", name="g1", pid=10, ksm=KsmStat(mergeable=True))
    assert live.current([vm]) == {"u1": ()} and live.current([vm]) == {"u1": ()} and calls == [10]
    odd = VmReading(uuid="u1", name="g1", pid=10, ksm=KsmStat(mergeable=False))
    assert [r.value for r in live.current([odd])["u1"]] == ["not_mergeable"] and calls == [10]
    restarted = VmReading(uuid="u1", name="g1", pid=11, ksm=KsmStat(mergeable=True), excluded=True)
    assert [r.value for r in live.current([restarted])["u1"]] == ["nosharepages"] and calls == [10, 11]
    # A new reading whose other figures changed (rss) keeps the reasons without a parse;
    # a guest gone is forgotten.
    grown = VmReading(uuid="u1", name="g1", pid=11, ksm=KsmStat(mergeable=True), excluded=True, rss=5 << 20)
    assert [r.value for r in live.current([grown])["u1"]] == ["nosharepages"] and calls == [10, 11]
    assert live.current([]) == {} and live._known == {}


def test_a_ksmd_that_scans_nothing_is_parked_by_the_daemon_or_a_warning():
    from ksmctl.doctor.host import HostFacts, host_findings
    from ksmctl.readings import KsmState
    ksm = KsmState(values={"run": 1, "pages_to_scan": 0, "sleep_millisecs": 1000, "full_scans": 12})
    parked = {"pid": 4242, "policy": {"name": "default"}, "decision": {"scan_rule": "park", "reasons": ["parked"]}}
    for daemon, severity, text in ((parked, "ok", "KSM is on and parked: the ksmctl daemon (pid 4242, policy default)"),
                                   (None, "warning", "and no daemon parked it"),
                                   ({**parked, "decision": {"scan_rule": "idle"}}, "warning", "nothing new merges")):
        f = [x for x in host_findings(HostFacts(ksm=ksm, ksm_dir="/sys/kernel/mm/ksm", daemon=daemon))
             if x.reason.value == "ksm_running"][0]
        assert f.severity.name.lower() == severity and text in f.cause, f.cause
