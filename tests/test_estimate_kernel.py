"""The estimator against ground truth and against the kernel's own KSM.

Child processes build mergeable memory (MAP_PRIVATE|MAP_ANONYMOUS + MADV_MERGEABLE) with a
known duplicate structure. Their content is derived from a per-run random seed, so no page
of theirs (except the zero page) can match memory of any other process on the host.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from ksmctl.collectors.procfs import parse_ksm_stat
from ksmctl.estimate.discover import Target, discover_mergeable, parse_smaps_mergeable
from ksmctl.estimate.result import zero_saving
from ksmctl.estimate.scan import Estimator
from ksmctl.readings import KsmStat
from tests.ksmlock import KSM, ksm_exclusive
from tests.mergeable import release
from tests.support import need, need_root, need_tool, wait_for

pytestmark = pytest.mark.kernel

PS = 4096

# The child: builds its pages from a JSON list of [kind, count, content-id] blocks, marks the
# mapping mergeable, says "ready" and waits for stdin to close.
CHILD = r"""
import hashlib, json, mmap, sys
PS = 4096
seed = sys.argv[1].encode()
blocks = json.loads(sys.argv[2])
n = sum(b[1] for b in blocks)
m = mmap.mmap(-1, n * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
i = 0
for kind, count, cid in blocks:
    for j in range(count):
        if kind == "c":      # content cid
            m[i * PS:(i + 1) * PS] = hashlib.blake2b(seed + b"%d" % cid).digest() * (PS // 64)
        elif kind == "u":    # unique content
            m[i * PS:(i + 1) * PS] = hashlib.blake2b(seed + b"u%d-%d" % (cid, j)).digest() * (PS // 64)
        elif kind == "z":    # zero content in a frame of its own
            m[i * PS] = 0
        elif kind == "r":    # read, never written: maps the kernel's zero page
            m[i * PS]
        # "n": never touched, not present
        i += 1
m.madvise(mmap.MADV_MERGEABLE)
sys.stdout.write("ready\n")
sys.stdout.flush()
sys.stdin.read()
"""

# Two processes (ids of shared contents are global: 'c' blocks with the same id are copies).
# A: 20 contents x 50 copies; 500 contents shared with B; 600 written zero pages; 200 pages
#    that map the zero page; 1500 unique pages; 1000 untouched pages.
# B: those 500 contents twice each; one content 300 times (above max_page_sharing=256);
#    400 zero pages; 2000 unique pages; 1000 untouched pages.
STRUCTURE: Dict[str, List[Tuple[str, int, int]]] = {
    "A": ([("c", 50, k) for k in range(20)] + [("c", 1, 100 + k) for k in range(500)]
          + [("z", 600, 0), ("r", 200, 0), ("u", 1500, 1), ("n", 1000, 0)]),
    "B": ([("c", 2, 100 + k) for k in range(500)] + [("c", 300, 9999)]
          + [("z", 400, 0), ("u", 2000, 2), ("n", 1000, 0)]),
}


def constructed(use_zero_pages: bool) -> Dict[str, int]:
    """The achievable saving by construction (ideal: no max_page_sharing cap)."""
    counts: collections.Counter = collections.Counter()
    zero = zero_mapped = scanned = 0
    for blocks in STRUCTURE.values():
        for kind, count, cid in blocks:
            if kind == "c":
                counts[cid] += count
            if kind in ("z", "r"):
                zero += count
            if kind == "r":
                zero_mapped += count
            if kind != "n":
                scanned += count
    nonzero = sum(c - 1 for c in counts.values())
    zs = zero_saving(zero, zero_mapped, use_zero_pages)
    return {"nonzero": nonzero, "zero": zero, "zero_mapped": zero_mapped, "zero_saving": zs,
            "achievable": nonzero + zs, "scanned": scanned}


class Children:
    def __init__(self) -> None:
        self.procs: Dict[str, subprocess.Popen] = {}

    def start(self) -> Dict[str, int]:
        seed = os.urandom(16).hex()
        for name, blocks in STRUCTURE.items():
            p = subprocess.Popen([sys.executable, "-c", CHILD, seed, json.dumps(blocks)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            self.procs[name] = p
        for name, p in self.procs.items():
            line = p.stdout.readline()   # type: ignore[union-attr]
            assert line == b"ready\n", "child %s failed to start: %r" % (name, line)
        return {name: p.pid for name, p in self.procs.items()}

    def stop(self) -> None:
        release(self.procs.values())


@pytest.fixture
def children():
    c = Children()
    try:
        yield c
    finally:
        c.stop()


def _rss_kb(pid: int) -> int:
    """Resident memory of the mergeable mappings (the interpreter's own may move a little)."""
    regions = parse_smaps_mergeable(Path("/proc/%d/smaps" % pid).read_text())
    return sum(r.rss_bytes for r in regions) // 1024


def _ksm(name: str) -> int:
    return int((KSM / name).read_text().split()[0])


def _set(name: str, value: object) -> None:
    (KSM / name).write_text(str(value))


def _targets(pids: Dict[str, int]) -> List[Target]:
    return [Target(pid, name) for name, pid in pids.items()]


def test_estimate_matches_constructed_structure(children):
    """Accuracy: the estimate equals the construction (the issue asks for 1%), and reading
    does not fault anything in: the children's RSS is the same before and after."""
    need_root()
    need(KSM.is_dir(), "no /sys/kernel/mm/ksm")
    with ksm_exclusive():   # the children are mergeable: keep them away from other KSM tests
        pids = children.start()
        rss_before = {n: _rss_kb(p) for n, p in pids.items()}
        r = Estimator().run(_targets(pids))
        rss_after = {n: _rss_kb(p) for n, p in pids.items()}
    exp = constructed(r.use_zero_pages)
    assert not r.partial and not r.skipped
    assert rss_after == rss_before, "the scan faulted pages in"
    assert rss_before["A"] == (20 * 50 + 500 + 600 + 1500) * PS // 1024
    assert r.scanned_pages == exp["scanned"]
    assert r.zero_pages == exp["zero"]
    assert r.zero_mapped_pages == exp["zero_mapped"]
    assert abs(r.achievable - exp["achievable"]) <= 0.01 * exp["achievable"]
    assert r.achievable_nonzero == exp["nonzero"]
    assert r.zero_saving == exp["zero_saving"]
    by = {t.name: t for t in r.targets}
    # A alone: 20*49 + zero; B alone: 500*1 + 299 + zero; across: the 500 shared contents.
    assert by["A"].achievable_alone == 20 * 49 + zero_saving(800, 200, r.use_zero_pages)
    assert by["B"].achievable_alone == 500 + 299 + zero_saving(400, 0, r.use_zero_pages)
    assert r.cross_target == r.achievable - by["A"].achievable_alone - by["B"].achievable_alone
    assert r.cross_target >= 500


@pytest.mark.parametrize("use_zero_pages", [1, 0])
def test_estimate_bounds_what_ksm_achieves(children, use_zero_pages):
    """Run real KSM to convergence on the same processes: what it saves never exceeds the
    estimate and comes within 5% of it; a second estimate then sees it as achieved.

    KSM's saving for these processes is taken from the kernel: the pages it reports merged
    (ksm_stat ksm_merging_pages) minus the distinct KSM frames they map (pagemap frame
    numbers, flagged KSM in /proc/kpageflags), plus ksm_zero_pages. That equals their
    part of pages_sharing and stays exact when other mergeable processes (lab guests)
    run; when there are none, the global pages_sharing is checked as well.
    """
    need_root()
    need(KSM.is_dir(), "no /sys/kernel/mm/ksm")
    with ksm_exclusive():
        if (KSM / "advisor_mode").exists():
            _set("advisor_mode", "none")
        _set("pages_to_scan", 5000)
        _set("sleep_millisecs", 10)
        _set("use_zero_pages", use_zero_pages)
        pids = children.start()
        before = Estimator().run(_targets(pids))
        others = [t for t in discover_mergeable(exclude=list(pids.values()) + [os.getpid()])]
        sharing0 = _ksm("pages_sharing") + _ksm("ksm_zero_pages")
        _set("run", 1)
        _wait_merged(pids)
        kernel = _kernel_saving(pids)
        sharing1 = _ksm("pages_sharing") + _ksm("ksm_zero_pages")
        after = Estimator().run(_targets(pids))
        kernel_after_scan = _kernel_saving(pids)
        again = Estimator().run(_targets(pids))
    exp = constructed(bool(use_zero_pages))
    # Reading must not break merges. (process_vm_readv would: its read-only FOLL_PIN makes
    # the kernel unshare every KSM page it touches; measured here, it took `achieved` from
    # 3478 pages to 1200 in one scan. /proc/<pid>/mem's plain get_user_pages does not.)
    assert kernel_after_scan == kernel
    assert again.achieved == after.achieved
    assert before.achievable == exp["achievable"]
    # Pages that already mapped the zero page were never KSM's doing; add them to its figure.
    kernel_saved = kernel + exp["zero_mapped"]
    print("use_zero_pages=%d estimate=%d kernel=%d achieved-after=%d efficiency=%.4f"
          % (use_zero_pages, before.achievable, kernel_saved, after.achieved, after.efficiency or 0))
    assert kernel_saved <= before.achievable, (kernel_saved, before.achievable)
    assert kernel_saved >= 0.95 * before.achievable, (kernel_saved, before.achievable)
    if not others and sharing0 == 0:
        global_saved = sharing1 + exp["zero_mapped"]
        assert global_saved <= before.achievable, (global_saved, before.achievable)
        assert global_saved >= 0.95 * before.achievable, (global_saved, before.achievable)
    # After convergence the estimator measures, by frame numbers, what KSM achieved.
    assert after.achievable == before.achievable
    assert after.efficiency is not None and after.efficiency >= 0.95
    assert abs(after.achieved - kernel_saved) <= 0.01 * kernel_saved


def _ksm_stat(pid: int) -> KsmStat:
    return parse_ksm_stat(Path("/proc/%d/ksm_stat" % pid).read_text())


def _merged(pids: Dict[str, int]) -> int:
    return sum((s.merging_pages or 0) + (s.zero_pages or 0) for s in map(_ksm_stat, pids.values()))


def _wait_merged(pids: Dict[str, int]) -> None:
    """Until the children's merged pages stay the same over a full scan (after two scans)."""
    start = _ksm("full_scans")
    state = {"scan": start, "value": _merged(pids)}

    def settled():
        scans = _ksm("full_scans")
        if scans == state["scan"]:
            return None
        value = _merged(pids)
        stable = value == state["value"] and value > 0
        state["scan"], state["value"] = scans, value
        return stable and scans - start >= 3

    wait_for(settled, 180, "KSM to converge on the test processes", interval=0.1)


KPF_KSM = 1 << 21


def _kernel_saving(pids: Dict[str, int]) -> int:
    """The children's part of pages_sharing (+ ksm_zero_pages), from the kernel's own data."""
    frames: collections.Counter = collections.Counter()
    with open("/proc/kpageflags", "rb") as kpf:
        for pid in pids.values():
            regions = parse_smaps_mergeable(Path("/proc/%d/smaps" % pid).read_text())
            with open("/proc/%d/pagemap" % pid, "rb") as pm:
                for r in regions:
                    pm.seek(r.start // PS * 8)
                    raw = pm.read((r.end - r.start) // PS * 8)
                    for i in range(0, len(raw), 8):
                        e = int.from_bytes(raw[i:i + 8], "little")
                        if e >> 63:
                            frames[e & ((1 << 55) - 1)] += 1
        ksm_pages = ksm_frames = 0
        for pfn, n in frames.items():
            kpf.seek(pfn * 8)
            if int.from_bytes(kpf.read(8), "little") & KPF_KSM:
                ksm_pages += n
                ksm_frames += 1
    stats = [_ksm_stat(p) for p in pids.values()]
    merging = sum(s.merging_pages or 0 for s in stats)
    assert merging == ksm_pages, "ksm_stat and the page tables disagree: %d vs %d" % (merging, ksm_pages)
    return merging - ksm_frames + sum(s.zero_pages or 0 for s in stats)


def test_process_exiting_mid_scan_is_skipped(children):
    """The target is killed and reaped between two pagemap windows: its /proc/<pid>/mem
    then reads nothing, and its partial counts must not leak into the result."""
    need_root()
    with ksm_exclusive():
        pids = children.start()
        victim = children.procs["B"]
        state = {"killed": False}

        def progress(p) -> None:
            if p.target == "B" and not state["killed"]:
                victim.kill()
                victim.wait()
                state["killed"] = True

        r = Estimator(window_pages=64, buffer_bytes=PS,
                      progress=progress, progress_interval_s=0).run(_targets(pids))
    assert state["killed"]
    assert [t.name for t in r.targets] == ["A"]
    assert [(s.name, s.reason) for s in r.skipped] == [("B", "exited during the scan")]


MDWE_THEN_EXEC = r"""
import ctypes, os, sys
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit("prctl(PR_SET_MDWE): %s" % os.strerror(ctypes.get_errno()))
os.execv(sys.executable, [sys.executable] + sys.argv[1:])
"""


def test_estimate_works_under_memory_deny_write_execute(children):
    """The unit sets MemoryDenyWriteExecute=yes; the estimator (ctypes for its zero-page
    probe, numpy) must still run. The kernel's own MDWE (prctl, inherited across exec)
    enforces the same rule."""
    need_root()
    with ksm_exclusive():
        pids = children.start()
        p = subprocess.run([sys.executable, "-c", MDWE_THEN_EXEC, "-m", "ksmctl", "estimate", "--json",
                            "--no-progress", "--pid", str(pids["A"])],
                           capture_output=True, text=True, timeout=120)
    if "PR_SET_MDWE" in p.stderr and "Invalid argument" in p.stderr:
        need(False, "this kernel has no PR_SET_MDWE (Linux >= 6.3)")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert data["total"]["zero_mapped"]["pages"] == 200   # the zero-page probe worked
    assert data["targets"][0]["scanned"]["pages"] == sum(c for k, c, _ in STRUCTURE["A"] if k != "n")


def test_missing_capabilities_are_named(children):
    """Root without CAP_SYS_PTRACE/CAP_SYS_ADMIN (the shipped unit's bounding set) gets a
    message naming both and the drop-in that grants them, not a half-empty estimate."""
    need_root()
    need_tool("setpriv")
    pids = children.start()
    p = subprocess.run(["setpriv", "--bounding-set", "-sys_ptrace,-sys_admin", "--inh-caps",
                        "-sys_ptrace,-sys_admin", sys.executable, "-m", "ksmctl", "estimate",
                        "--no-progress", "--pid", str(pids["A"])],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, (p.returncode, p.stderr)
    assert "CAP_SYS_PTRACE" in p.stderr and "CAP_SYS_ADMIN" in p.stderr
    assert "CapabilityBoundingSet=CAP_SYS_PTRACE CAP_SYS_ADMIN" in p.stderr
    assert "Traceback" not in p.stderr
