"""Generated /proc, /run and libvirt test-driver trees for the per-VM collector.

Files only, so the real readers (ProcFs, the pid-file check, the test driver's XML
parser) do the parsing; used by tests/test_vms_collector.py and bench/tick_bench.py."""
from __future__ import annotations

import uuid as uuidlib
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

KSM_STAT = ("ksm_rmap_items {rmap}\nksm_zero_pages {zero}\nksm_merging_pages {merging}\n"
            "ksm_process_profit {profit}\nksm_merge_any: no\nksm_mergeable: {mergeable}\n")


def qemu_argv(name: str, uuid: Optional[str], memory_mib: int = 256, merge_off: bool = False,
              binary: str = "/usr/bin/qemu-system-x86_64") -> List[str]:
    """A command line shaped like libvirt 9's."""
    machine = "pc-i440fx-7.2,usb=off,dump-guest-core=off%s,memory-backend=pc.ram" % (
        ",mem-merge=off" if merge_off else "")
    argv = [binary, "-name", "guest=%s,debug-threads=on" % name, "-S", "-machine", machine,
            "-accel", "tcg", "-m", str(memory_mib),
            '-object', '{"qom-type":"memory-backend-ram","id":"pc.ram","size":%d}' % (memory_mib << 20)]
    if uuid:
        argv += ["-uuid", uuid]
    return argv + ["-display", "none", "-no-user-config", "-nodefaults"]


def add_process(proc_root: Path, pid: int, argv: Sequence[str], merging: int = 0, zero: int = 0,
                rss_pages: int = 65536, mergeable: bool = True, ksm_stat: bool = True) -> None:
    d = proc_root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
    (d / "statm").write_text("%d %d 100 10 0 %d 0\n" % (rss_pages * 2, rss_pages, rss_pages))
    if ksm_stat:
        (d / "ksm_stat").write_text(KSM_STAT.format(
            rmap=merging + 10, zero=zero, merging=merging, profit=(merging + zero) * 4096 - (merging + 10) * 64,
            mergeable="yes" if mergeable else "no"))


def add_pidfile(run_root: Path, name: str, pid: object) -> None:
    d = run_root / "libvirt" / "qemu"
    d.mkdir(parents=True, exist_ok=True)
    (d / (name + ".pid")).write_text("%s\n" % pid)


def domain_xml(name: str, uuid: str, memory_kib: int = 262144, nosharepages: bool = False) -> str:
    backing = "<memoryBacking><nosharepages/></memoryBacking>" if nosharepages else ""
    return ("<domain type='test'><name>%s</name><uuid>%s</uuid><memory>%d</memory>"
            "<currentMemory>%d</currentMemory>%s<vcpu>1</vcpu><os><type>hvm</type></os>"
            "</domain>" % (name, uuid, memory_kib, memory_kib, backing))


def node_xml(path: Path, domains: Iterable[Tuple[str, str, bool]]) -> str:
    """A libvirt test-driver node file; open it as 'test://' + path. Domains: (name, uuid,
    nosharepages). Returns the URI."""
    body = "".join(domain_xml(n, u, nosharepages=ns) for n, u, ns in domains)
    path.write_text("<node>%s</node>\n" % body)
    return "test://" + str(path.resolve())


def host(root: Path, count: int, first_pid: int = 1000, others: int = 50) -> Tuple[str, Path, Path, List[Tuple[str, str, int]]]:
    """count QEMU guests: a test-driver node file, their pid files and their /proc entries,
    plus `others` non-QEMU processes. Returns (uri, proc_root, run_root, [(name, uuid, pid)])."""
    proc_root, run_root = root / "proc", root / "run"
    proc_root.mkdir(parents=True, exist_ok=True)
    guests = []
    for i in range(count):
        name, uuid, pid = "vm%04d" % i, str(uuidlib.UUID(int=i + 1)), first_pid + i
        add_process(proc_root, pid, qemu_argv(name, uuid, merge_off=(i % 50 == 7)), merging=1000 + i, zero=i % 3)
        add_pidfile(run_root, name, pid)
        guests.append((name, uuid, pid))
    for j in range(others):
        add_process(proc_root, first_pid + count + j, ["/usr/sbin/some-daemon", "--flag"], ksm_stat=False)
    (proc_root / "meminfo").write_text("MemTotal: 24683656 kB\nMemFree: 20000000 kB\nMemAvailable: 21000000 kB\n")
    uri = node_xml(root / "node.xml", ((n, u, i % 50 == 9) for i, (n, u, _p) in enumerate(guests)))
    return uri, proc_root, run_root, guests
