"""One guest-like process (see workload.py). Run by the benchmark, not imported.

argv: index family nonce zero os app within within_pool churn unique churn_rate
Prints 'ready <pid>' once its memory is filled and mergeable; rewrites churn pages
until stdin closes.
"""
import mmap
import os
import select
import struct
import sys
import time

PS = mmap.PAGESIZE


def main() -> None:
    a = sys.argv[1:]
    index, family, nonce = int(a[0]), int(a[1]), int(a[2])
    zero, osn, app, within, pool, churn, unique = (int(x) for x in a[3:10])
    churn_rate = float(a[10])
    n = zero + osn + app + within + churn + unique
    m = mmap.mmap(-1, n * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = bytes((i * 7 + 3) % 256 for i in range(PS))
    pack = struct.Struct("<QQQ").pack_into
    view = memoryview(m)
    i = 0

    def put(kind: int, a1: int, a2: int) -> None:
        nonlocal i
        o = i * PS
        view[o:o + PS] = base
        pack(m, o, kind, a1, a2)
        i += 1

    for _ in range(zero):
        m[i * PS] = 0  # a write fault: a real, zero-filled page
        i += 1
    for j in range(osn):
        put(1, 0, j)
    for j in range(app):
        put(2, family, j)
    for j in range(within):
        put(3, index, j % max(1, pool))
    churn_start = i
    for j in range(churn):
        put(4, (nonce << 16) | index, j)
    for j in range(unique):
        put(5, (nonce << 16) | index, j)
    m.madvise(mmap.MADV_MERGEABLE)
    sys.stdout.write("ready %d\n" % os.getpid())
    sys.stdout.flush()

    # Churn: rewrite churn pages with never-repeating contents, ~churn_rate of them per second.
    gen = 0
    per_tick = max(1, int(churn * churn_rate / 10)) if churn else 0
    pos = 0
    while True:
        r, _, _ = select.select([sys.stdin], [], [], 0.1)
        if r and not sys.stdin.readline():
            break
        if not per_tick:
            continue
        gen += 1
        for _ in range(per_tick):
            o = (churn_start + pos) * PS
            pack(m, o + 64, 6, gen, (nonce << 16) | index)
            pos = (pos + 1) % churn
        time.sleep(0)


if __name__ == "__main__":
    main()
