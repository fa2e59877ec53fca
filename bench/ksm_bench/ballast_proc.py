"""The ballast process (see workload.py). Run by the benchmark, not imported.

argv: target_free_bytes floor_available_bytes [workers]
(with N workers regulating together, each takes 1/N of every correction)
stdin lines: 'hold' (keep free memory at the target), 'release' (free everything);
EOF exits. Memory is plain anonymous memory (never MADV_MERGEABLE), populated so it is
resident.
"""
import mmap
import select
import sys
import time

CHUNK = 64 * 1024 * 1024
BAND = 96 * 1024 * 1024
MADV_POPULATE_WRITE = 23
PS = mmap.PAGESIZE


def meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, rest = line.partition(":")
            out[k] = int(rest.split()[0]) * 1024
    return out


def populate(m) -> None:
    # No MADV_HUGEPAGE: once RAM is fragmented, compaction stalls make it slower than
    # 4 KiB pages (about 700 MiB/s here), and it would disturb other work on the host.
    try:
        m.madvise(MADV_POPULATE_WRITE)
    except (OSError, ValueError):
        for i in range(0, len(m), PS):
            m[i] = 1


def main() -> None:
    target, floor = int(sys.argv[1]), int(sys.argv[2])
    workers = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    chunks = []
    holding = False
    while True:
        r, _, _ = select.select([sys.stdin], [], [], 0.2)
        if r:
            line = sys.stdin.readline()
            if not line:
                break
            cmd = line.strip()
            if cmd == "hold":
                holding = True
            elif cmd == "release":
                holding = False
                for c in chunks:
                    c.close()
                chunks = []
        if not holding:
            continue
        mi = meminfo()
        free = mi["MemFree"] + mi.get("Buffers", 0) + mi.get("Cached", 0)
        avail = mi["MemAvailable"]
        if (avail < floor or free < target - BAND) and chunks:
            drop = max(1, int(max(target - free, floor - avail) // CHUNK // workers) + 1)
            for _ in range(min(drop, len(chunks))):
                chunks.pop().close()
        elif free > target + BAND and avail - CHUNK > floor:
            grow = min(64, int((free - target) // CHUNK // workers), int((avail - floor) // CHUNK // workers))
            t0 = time.monotonic()
            for _ in range(max(0, grow)):
                m = mmap.mmap(-1, CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                populate(m)
                chunks.append(m)
                if time.monotonic() - t0 > 1.0:
                    break


if __name__ == "__main__":
    main()
