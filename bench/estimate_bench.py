"""Benchmark of `ksmctl estimate`: scan rate per core, memory per scanned page, accuracy.

    sudo .venv/bin/python bench/estimate_bench.py [--gib 2] [--procs 4] [--zero 0.10]

Child processes build mergeable memory with a known structure (shares of zero pages,
contents shared across processes, duplicates within a process, unique pages). The
estimator scans them; the benchmark prints CPU-time GiB/s (the scanning process's CPU,
not wall), wall GiB/s, bytes of estimator memory per scanned page (tracemalloc peak, a
second run), the estimate against the construction, and the ratio against the target of
2 GiB/s per core. Side by side, in the same run, it times the kernel's /proc/<pid>/mem
copy alone over the same memory (no hashing, no counting): the floor any reader of that
interface pays. Nothing is asserted: this prints numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ksmctl.estimate.discover import Target, parse_smaps_mergeable  # noqa: E402
from ksmctl.estimate.result import zero_saving  # noqa: E402
from ksmctl.estimate.scan import BUFFER_BYTES, Estimator  # noqa: E402

TARGET_GIB_PER_CORE = 2.0
PS = 4096

CHILD = r"""
import mmap, struct, sys
PS = 4096
pid_index, n, zero, shared, within, n_shared, n_within = sys.argv[1:8]
pid_index, n, n_shared, n_within = int(pid_index), int(n), int(n_shared), int(n_within)
zero, shared, within = float(zero), float(shared), float(within)
m = mmap.mmap(-1, n * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
base = bytes(range(256)) * (PS // 256)
nz, ns, nw = int(n * zero), int(n * shared), int(n * within)
i = 0
def put(tag, k):
    global i
    o = i * PS
    m[o:o + PS] = base
    m[o:o + 16] = struct.pack("<QQ", tag, k)
    i += 1
for j in range(nz):
    m[i * PS] = 0; i += 1
for j in range(ns):          # shared across processes: the same ids in every process
    put(1, j % n_shared)
for j in range(nw):          # duplicated within this process only
    put(2 + pid_index, j % n_within)
while i < n:                 # unique
    put(1000 + pid_index, i)
m.madvise(mmap.MADV_MERGEABLE)
sys.stdout.write("ready\n"); sys.stdout.flush()
sys.stdin.read()
"""


def expected(n: int, procs: int, zero: float, shared: float, within: float,
             n_shared: int, n_within: int, use_zero_pages: bool) -> int:
    nz, ns, nw = int(n * zero), int(n * shared), int(n * within)
    # shared: each id appears ns // n_shared (+1) times per process, procs times overall
    shared_pages = ns * procs
    shared_distinct = min(ns, n_shared)
    within_saving = procs * (nw - min(nw, n_within))
    return (shared_pages - shared_distinct) + within_saving + zero_saving(nz * procs, 0, use_zero_pages)


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=2.0, help="total memory to build and scan")
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--zero", type=float, default=0.10, help="share of zero pages")
    ap.add_argument("--shared", type=float, default=0.40, help="share of pages shared across processes")
    ap.add_argument("--within", type=float, default=0.20, help="share duplicated within a process")
    ap.add_argument("--runs", type=int, default=3, help="timed runs (best is reported)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (the estimator reads other processes' memory)", file=sys.stderr)
        return 3
    avail = _mem_available()
    total = int(args.gib * 2**30)
    if total > avail * 0.5:
        print("refusing: %.1f GiB is over half of MemAvailable (%.1f GiB)" % (args.gib, avail / 2**30),
              file=sys.stderr)
        return 4
    n = total // PS // args.procs
    n_shared, n_within = max(1, int(n * args.shared) // 3), max(1, int(n * args.within) // 4)

    from tests.ksmlock import ksm_exclusive   # mergeable children: keep other KSM users out
    from tests.mergeable import release
    with ksm_exclusive():
        children = []
        try:
            t0 = time.monotonic()
            for i in range(args.procs):
                children.append(subprocess.Popen(
                    [sys.executable, "-c", CHILD, str(i), str(n), str(args.zero), str(args.shared),
                     str(args.within), str(n_shared), str(n_within)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE))
            for c in children:
                assert c.stdout.readline() == b"ready\n"
            print("built %d x %.0f MiB in %.1fs (zero %.0f%%, shared %.0f%%, within %.0f%%, unique %.0f%%)" % (
                args.procs, n * PS / 2**20, time.monotonic() - t0, 100 * args.zero, 100 * args.shared,
                100 * args.within, 100 * (1 - args.zero - args.shared - args.within)))
            targets = [Target(c.pid, "bench%d" % i) for i, c in enumerate(children)]
            best = None
            for _ in range(args.runs):
                r = Estimator().run(targets)
                if best is None or r.cpu_s < best.cpu_s:
                    best = r
            copy_s = min(_copy_only(targets) for _ in range(args.runs))
            tracemalloc.start()
            r_mem = Estimator().run(targets)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        finally:
            release(children, timeout=60)
    r = best
    gib = r.bytes_read / 2**30
    per_core = gib / r.cpu_s if r.cpu_s else float("inf")
    exp = expected(n, args.procs, args.zero, args.shared, args.within, n_shared, n_within,
                   r.use_zero_pages)
    err = (r.achievable - exp) / exp if exp else 0.0
    print("scanned           %.2f GiB (%d pages) in %d processes" % (gib, r.scanned_pages, len(r.targets)))
    print("scan rate         %.2f GiB/s per core (CPU time %.2fs)" % (per_core, r.cpu_s))
    print("wall rate         %.2f GiB/s (%.2fs)" % (gib / r.elapsed_s, r.elapsed_s))
    print("target            %.1f GiB/s per core: ratio %.2f" % (TARGET_GIB_PER_CORE, per_core / TARGET_GIB_PER_CORE))
    copy_rate = gib / copy_s if copy_s else float("inf")
    print("/proc/pid/mem     %.2f GiB/s per core copying alone (CPU time %.2fs); the estimator "
          "runs at %.2f of it" % (copy_rate, copy_s, per_core / copy_rate))
    print("memory            %.1f bytes per scanned page (tracemalloc peak %.1f MiB, %d distinct contents)"
          % (peak / r_mem.scanned_pages, peak / 2**20, r_mem.distinct_nonzero))
    print("achievable        %d pages (%.2f GiB); constructed %d; error %+.4f%%"
          % (r.achievable, r.achievable * PS / 2**30, exp, 100 * err))
    print("json              %s" % json.dumps({
        "gib": round(gib, 3), "gib_per_core": round(per_core, 3), "wall_gib_s": round(gib / r.elapsed_s, 3),
        "target_ratio": round(per_core / TARGET_GIB_PER_CORE, 3),
        "copy_only_gib_per_core": round(copy_rate, 3),
        "bytes_per_page": round(peak / r_mem.scanned_pages, 1), "accuracy_error": err}))
    return 0


def _copy_only(targets: List[Target]) -> float:
    """CPU seconds to read the targets' mergeable memory through /proc/<pid>/mem, nothing else."""
    import mmap
    buf = mmap.mmap(-1, BUFFER_BYTES)
    view = memoryview(buf)
    c0 = time.process_time()
    for t in targets:
        regions = parse_smaps_mergeable(Path("/proc/%d/smaps" % t.pid).read_text())
        fd = os.open("/proc/%d/mem" % t.pid, os.O_RDONLY)
        try:
            for r in regions:
                for addr in range(r.start, r.end, BUFFER_BYTES):
                    os.preadv(fd, [view[:min(BUFFER_BYTES, r.end - addr)]], addr)
        finally:
            os.close(fd)
    spent = time.process_time() - c0
    view.release()
    buf.close()
    return spent


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    sys.exit(main())
