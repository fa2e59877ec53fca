"""Stale merges: the kernel counts a merge until ksmd looks at the page again, even after
the process wrote to it and copy-on-write gave it its own copy. `ksmctl doctor` tells
them from the `KSM:` lines of smaps (Linux 6.7+). On the real KSM: merged, then half
rewritten while ksmd is stopped, then ksmd's next look."""
from __future__ import annotations

import subprocess
import sys

import pytest

from ksmctl.collectors.memlayout import Mapping, parse_smaps, read_smaps
from ksmctl.collectors.procfs import ProcFs
from ksmctl.doctor.findings import Reason
from ksmctl.doctor.vm import VmFacts, vm_findings
from ksmctl.readings import KsmStat, VmReading
from tests.ksmlock import KSM, ksm_exclusive
from tests.mergeable import release
from tests.support import need, need_root, wait_for

PAGES, DISTINCT = 8192, 16

CHILD = r"""
import mmap, os, sys
P = mmap.PAGESIZE
n, distinct = int(sys.argv[1]), int(sys.argv[2])
m = mmap.mmap(-1, n * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(n):
    m[i * P:(i + 1) * P] = bytes([i % distinct + 1]) * P
m.madvise(mmap.MADV_MERGEABLE)
print("ready", os.getpid(), flush=True)
for line in sys.stdin:
    k = int(line)
    for i in range(k):   # a unique first word per page: nothing left to merge with
        m[i * P:i * P + 8] = (i + 1000003).to_bytes(8, "little")
    print("done", flush=True)
"""


def _map(ksm_kib, start=0x1000):
    return Mapping(start=start, end=start + (64 << 20), path="", rss=64 << 20, anon_huge=0, locked=0,
                   flags=("rd", "wr", "mg"), ksm=None if ksm_kib is None else ksm_kib * 1024)


def _facts(before, after, maps):
    vm = VmReading(uuid="u", name="g", pid=42, ksm=KsmStat(merging_pages=before))
    return VmFacts(vm=vm, mappings=maps, ksm_after=KsmStat(merging_pages=after), page_size=4096)


def _stale(facts):
    return [f for f in vm_findings(facts) if f.reason is Reason.STALE_MERGES]


def test_parse_smaps_reads_the_ksm_line_where_the_kernel_writes_it():
    text = ("7f00-7f10 rw-p 00000000 00:00 0\nRss:  64 kB\nKSM:  40 kB\nVmFlags: rd wr mg\n"
            "7f20-7f30 rw-p 00000000 00:00 0\nRss:  64 kB\nVmFlags: rd wr\n"
            "7f40-7f50 rw-p 00000000 00:00 0\nKSM:  nan kB\nSwap: \xff\nVmFlags: rd wr\n")
    a, b, c = parse_smaps(text)
    assert a.ksm == 40 * 1024 and b.ksm is None
    assert c.ksm is None and c.swap == 0     # garbled: unknown, so no stale-merge finding from it


def test_stale_merges_noted_from_the_lower_count_and_only_above_the_threshold():
    # 4096 counted, 1024 pages (4 MiB) mapped: 3072 stale
    found = _stale(_facts(4096, 5000, [_map(2048), _map(2048, 0x9000000)]))
    assert len(found) == 1 and found[0].cause.startswith("3072 of the 4096 pages"), found
    # merges made while smaps was walked are not stale: the lower count is taken
    assert _stale(_facts(5000, 4096, [_map(4096 * 4)])) == []
    assert _stale(_facts(4096, 4096, [_map((4096 - 255) * 4)])) == []      # under 256 pages
    assert _stale(_facts(100000, 100000, [_map((100000 - 900) * 4)])) == []  # under 1% of the merges
    assert _stale(_facts(4096, 4096, [_map(None)])) == []                  # before Linux 6.7: cannot tell
    assert _stale(_facts(4096, None, [_map(0)])) == []                     # ksm_stat gone: cannot tell


@pytest.mark.kernel
def test_doctor_tells_merges_a_rewrite_broke_until_ksmd_looks_again():
    need_root()
    need(KSM.is_dir(), "no /sys/kernel/mm/ksm")
    proc = ProcFs()

    def facts(pid):
        before = proc.ksm_stat(pid)
        maps = read_smaps("/proc", pid)
        vm = VmReading(uuid="u", name="stale-test", pid=pid, ksm=before)
        return VmFacts(vm=vm, mappings=maps, ksm_after=proc.ksm_stat(pid))

    with ksm_exclusive():
        if (KSM / "advisor_mode").exists():
            (KSM / "advisor_mode").write_text("none")
        (KSM / "pages_to_scan").write_text("5000")
        (KSM / "sleep_millisecs").write_text("10")
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(PAGES), str(DISTINCT)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        try:
            pid = int(child.stdout.readline().split()[1])
            need(any(m.ksm is not None for m in read_smaps("/proc", pid) or ()), "smaps has no KSM: line (< 6.7)")
            (KSM / "run").write_text("1")
            wait_for(lambda: (proc.ksm_stat(pid).merging_pages or 0) >= PAGES - DISTINCT, 120,
                     "the child's pages to merge")
            assert _stale(facts(pid)) == []              # merged, none rewritten
            (KSM / "run").write_text("0")                # ksmd stops: nothing looks at the pages
            child.stdin.write("%d\n" % (PAGES // 2))
            child.stdin.flush()
            assert child.stdout.readline().strip() == "done"
            found = _stale(facts(pid))
            assert len(found) == 1, vm_findings(facts(pid))
            stale = int(found[0].cause.split()[0])
            assert abs(stale - PAGES // 2) <= DISTINCT, found[0].cause
            # The kernel still counts them: that is what the finding is about.
            assert (proc.ksm_stat(pid).merging_pages or 0) >= PAGES - DISTINCT
            (KSM / "run").write_text("1")                # ksmd's next look drops them
            wait_for(lambda: _stale(facts(pid)) == [], 120, "ksmd's next pass to drop the stale merges")
            assert (proc.ksm_stat(pid).merging_pages or 0) <= PAGES - PAGES // 2
        finally:
            release([child])
