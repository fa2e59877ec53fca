"""Why two passes can miss pairs: writes to pages while they sit in ksmd's unstable tree.

    sudo .venv/bin/python bench/unstable_tree_probe.py [--pairs 40000] [--unique 120000]
                                                      [--rate 1000] [--repeats 2]

ksmd merges a content held by exactly two pages only through its unstable tree: in the
second pass, the first page is inserted (sorted by its bytes, memcmp), and the second finds
it there. The tree's pages are not write-protected; a page whose leading bytes change
while it is in the tree sits where its old bytes belonged, so a search that meets it may
turn the wrong way and miss what it looks for (the kernel's "unstable" tree; mm/ksm.c
rebuilds it every pass, and the next pass finds what this one missed). Contents with three
or more copies survive a wrong turn (the second copy is inserted where the search ended,
and the third follows the same path); pairs do not.

Two processes hold `pairs` contents one page each, and `unique` pages each of their own,
laid out like the KSM benchmark's guests (bench/ksm_bench/guest_proc.py: a 24-byte header,
kind first, on a common body). KSM runs at full speed from a fresh start for exactly two
passes. Meanwhile process A rewrites `rate` of its unique pages per second, in one of three
ways: not at all; the last bytes of the page (its place in the tree does not move: the
header decides every comparison); or the last bytes and the header, which it sets to one
among the pairs' headers (as the benchmark's fill workload turns unique pages into copies
of OS content), so the page now sorts among the pairs while it sits among the unique pages. It prints, per way, the
pairs merged after the two passes (process B's pages that map a KSM page: its others are
unique) out of `pairs`.

Needs root, writes /sys/kernel/mm/ksm and puts back the run, pages_to_scan and
sleep_millisecs it found; takes the KSM test lock. Each run starts from run=2 (unmerge),
which it refuses when the pages KSM saves would not fit in half of MemAvailable.
Informational: nothing is asserted.
"""
from __future__ import annotations

import argparse
import mmap
import os
import random
import select
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KSM = Path("/sys/kernel/mm/ksm")
PS = mmap.PAGESIZE
HEADER = struct.Struct("<QQQ")
BODY = bytes((i * 7 + 3) % 256 for i in range(PS))
PAIR_OS, PAIR_APP, UNIQUE = 1, 2, 5   # kinds, as in guest_proc.py: the page's first word
WAYS = ("none", "tail", "head")


def child(side: int, pairs: int, unique: int, rate: float, way: str, seed: int) -> None:
    """One process: its pages, then 'ready', then rewrites (side 0 only) until stdin closes."""
    n = pairs + unique
    m = mmap.mmap(-1, n * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    rnd = random.Random(seed)
    order = list(range(n))
    rnd.shuffle(order)  # scattered, as the fill workload's guests are
    for i, page in enumerate(order):
        o = page * PS
        m[o:o + PS] = BODY
        if i < pairs:   # half the pairs of one kind, half of another: two key ranges
            HEADER.pack_into(m, o, PAIR_OS if i % 2 else PAIR_APP, 0, i)
        else:
            HEADER.pack_into(m, o, UNIQUE, side, i)
    m.madvise(mmap.MADV_MERGEABLE)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    targets = order[pairs:] if side == 0 and way != "none" else []
    rnd.shuffle(targets)
    t0, done, gen = time.monotonic(), 0, 0
    while True:
        r, _, _ = select.select([sys.stdin], [], [], 0.01)
        if r and not sys.stdin.readline():
            return
        want = min(len(targets), int((time.monotonic() - t0) * rate))
        for k in range(done, want):
            o = targets[k] * PS
            gen += 1
            struct.pack_into("<Q", m, o + PS - 8, gen)  # its own content: it merges with nothing
            if way == "head":  # and a header among the pairs' (which hold odd ids of this kind)
                HEADER.pack_into(m, o, PAIR_OS, 0, 2 * rnd.randrange(pairs // 2))
        done = want


def ksm(name: str) -> str:
    return (KSM / name).read_text().strip()


def ksm_set(name: str, value: str) -> None:
    (KSM / name).write_text(value)


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def reset() -> None:
    """Unmerge everything (run=2) for a fresh start, only when the host can take the
    pages back: what pages_sharing saves must fit in half of MemAvailable."""
    sharing = int(ksm("pages_sharing")) + int(ksm("ksm_zero_pages") if (KSM / "ksm_zero_pages").exists() else 0)
    if sharing * PS > mem_available() // 2:
        raise SystemExit("not unmerging: KSM saves %d MiB here, more than half of MemAvailable (%d MiB)"
                         % (sharing * PS >> 20, mem_available() >> 20))
    ksm_set("run", "2")
    end = time.monotonic() + 120
    while int(ksm("pages_shared")) or int(ksm("pages_sharing")):
        if time.monotonic() > end:
            raise SystemExit("pages_shared did not drain after run=2")
        time.sleep(0.1)
    ksm_set("run", "0")


def merged_pairs(quiet_pid: int) -> int:
    """Pairs merged: the pages of process B (which rewrites nothing, and whose other pages
    are unique) that map a KSM page. Not pages_shared, which also counts the merges of any
    other mergeable process on the host (a lab guest that a test session keeps up)."""
    from ksmctl.collectors.procfs import ProcFs
    stat = ProcFs().ksm_stat(quiet_pid)
    if stat is None or stat.merging_pages is None:
        raise SystemExit("no ksm_merging_pages in /proc/%d/ksm_stat (Linux 6.1+ needed)" % quiet_pid)
    return stat.merging_pages


def one(args: argparse.Namespace, way: str, seed: int) -> Dict[str, float]:
    procs: List[subprocess.Popen] = []
    try:
        for side in (0, 1):
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--child", "%d:%s:%d" % (side, way, seed), "--pairs", str(args.pairs),
                 "--unique", str(args.unique), "--rate", str(args.rate)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise SystemExit("a probe process did not start")
        reset()
        ksm_set("pages_to_scan", "100000")
        ksm_set("sleep_millisecs", "10")
        start = int(ksm("full_scans"))
        t0 = time.monotonic()
        ksm_set("run", "1")
        end = t0 + 600
        while int(ksm("full_scans")) < start + 2:
            if time.monotonic() > end:
                raise SystemExit("two passes took more than 600 s")
            time.sleep(0.02)
        ksm_set("run", "0")
        return {"merged": merged_pairs(procs[1].pid), "seconds": time.monotonic() - t0}
    finally:
        for p in procs:
            try:
                if p.stdin is not None:
                    p.stdin.close()
                p.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                p.kill()
                p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=40000, help="contents held by one page in each process")
    ap.add_argument("--unique", type=int, default=120000, help="unique pages per process")
    ap.add_argument("--rate", type=float, default=1000.0, help="pages process A rewrites per second")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        side, way, seed = args.child.split(":")
        child(int(side), args.pairs, args.unique, args.rate, way, int(seed))
        return
    if os.geteuid() != 0:
        sys.exit("needs root (writes /sys/kernel/mm/ksm)")
    from tests.ksmlock import ksm_exclusive
    names = ("run", "pages_to_scan", "sleep_millisecs")
    with ksm_exclusive():
        found = {k: ksm(k) for k in names}
        smart = ksm("smart_scan") if (KSM / "smart_scan").exists() else None
        try:
            print("%d pairs, %d unique pages per process, %g rewrites/s in one of them; two passes at full "
                  "speed from a fresh start" % (args.pairs, args.unique, args.rate), flush=True)
            rows = []
            for r in range(args.repeats):
                for way in WAYS:
                    got = one(args, way, 1000 + r)
                    rows.append((way, got))
                    print("  %-4s run %d: %d of %d pairs merged (%.1f%% missed), passes took %.1f s"
                          % (way, r + 1, got["merged"], args.pairs, 100.0 * (1 - got["merged"] / args.pairs),
                             got["seconds"]), flush=True)
            print("\nrewrites  | pairs missed after two passes (each run)")
            for way in WAYS:
                print("%-9s | %s" % (way, ", ".join("%.1f%%" % (100.0 * (1 - g["merged"] / args.pairs))
                                                   for w, g in rows if w == way)))
        finally:
            reset()
            for k in ("pages_to_scan", "sleep_millisecs", "run"):
                ksm_set(k, found[k])
            if smart is not None:
                ksm_set("smart_scan", smart)


if __name__ == "__main__":
    main()
