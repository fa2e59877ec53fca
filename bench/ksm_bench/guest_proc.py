"""One guest-like process (see workload.py). Run by the benchmark; imported by its tests.

argv: index family nonce zero os app within within_pool churn unique churn_rate
      trickle_start trickle trickle_per_s fill fill_mod fill_per_s scatter
Prints 'ready <pid> <address of its memory in hex> <monotonic clock of its rewrites>' once
its memory is filled and mergeable; rewrites churn pages (new contents) and trickle pages
(the contents they hold) until stdin closes, and turns its first `fill` unique pages into
copies of os contents (fill_os_id), fill_per_s of them per second from that clock
(filled_pages), then keeps them so. scatter 1: the plan's pages are spread through the
mapping (Layout), not laid out kind after kind.
"""
import ctypes
import math
import mmap
import os
import select
import struct
import sys
import time
from typing import Dict, Optional, Tuple

PS = mmap.PAGESIZE
BASE = bytes((i * 7 + 3) % 256 for i in range(PS))
HEADER = struct.Struct("<QQQ")
OS, APP, WITHIN, CHURN, UNIQUE, CHURNED = 1, 2, 3, 4, 5, 6   # a page's first word: its kind


def os_header(j: int) -> Tuple[int, int, int]:
    """The header of os content j: the same in every guest (the rest of the page is BASE)."""
    return (OS, 0, j)


def scatter_stride(n: int) -> int:
    """A stride for scattering n pages (Layout): the first number from n / golden ratio on
    that shares no factor with n. Multiples of it modulo n spread any run of consecutive
    plan pages most evenly (Fibonacci hashing: the three-gap theorem)."""
    s = max(1, int(n * 0.6180339887498949))
    while math.gcd(s, n) != 1:
        s += 1
    return s


class Layout:
    """Where page i of a guest's plan lives in its memory: at page i (stride 1: kind after
    kind), or at page (i * stride) % n (stride coprime with n: every kind, and every run of
    consecutive plan pages, spread evenly through the whole mapping, as a guest's page cache
    is through its RAM)."""

    def __init__(self, n: int, stride: int = 1) -> None:
        if n > 0 and math.gcd(stride, n) != 1:
            raise ValueError("stride %d shares a factor with %d pages" % (stride, n))
        self.n, self.stride = n, stride

    def offset(self, i: int) -> int:
        """The byte offset of plan page i."""
        return (i * self.stride) % self.n * PS if self.stride != 1 else i * PS


def fill(m: mmap.mmap, index: int, family: int, nonce: int, zero: int, osn: int, app: int, within: int,
         pool: int, churn: int, unique: int, layout: Optional[Layout] = None) -> Dict[str, int]:
    """Writes the plan into m, kind after kind in plan order (placed by `layout`; default:
    page i at page i); the first plan page of each kind."""
    pack = HEADER.pack_into
    view = memoryview(m)
    at = (layout or Layout(len(m) // PS)).offset
    i = 0
    first: Dict[str, int] = {}

    def put(kind: int, a1: int, a2: int) -> None:
        nonlocal i
        o = at(i)
        view[o:o + PS] = BASE
        pack(m, o, kind, a1, a2)
        i += 1

    first["zero"] = i
    for _ in range(zero):
        m[at(i)] = 0  # a write fault: a real, zero-filled page
        i += 1
    first["os"] = i
    for j in range(osn):
        put(*os_header(j))
    first["app"] = i
    for j in range(app):
        put(APP, family, j)
    first["within"] = i
    for j in range(within):
        put(WITHIN, index, j % max(1, pool))
    first["churn"] = i
    for j in range(churn):
        put(CHURN, (nonce << 16) | index, j)
    first["unique"] = i
    for j in range(unique):
        put(UNIQUE, (nonce << 16) | index, j)
    return first


class Trickle:
    """Rewrites os pages trickle_start .. trickle_start + count - 1 with the header they
    hold, per_s pages per second in turn: the contents stay as they were, but the write
    breaks a merge (copy-on-write), and ksmd's next look merges the page again."""

    def __init__(self, m: mmap.mmap, os_first: int, start: int, count: int, per_s: float,
                 t0: Optional[float] = None, layout: Optional[Layout] = None) -> None:
        self.m, self.os_first, self.start, self.count, self.per_s = m, os_first, start, count, per_s
        self.t0 = time.monotonic() if t0 is None else t0
        self.at = (layout or Layout(len(m) // PS)).offset
        self.done = 0   # pages rewritten so far
        self.pos = 0

    def rewrite(self, n: int) -> None:
        for _ in range(n):
            j = self.start + self.pos
            HEADER.pack_into(self.m, self.at(self.os_first + j), *os_header(j))
            self.pos = (self.pos + 1) % self.count
        self.done += n

    def tick(self, now: float) -> None:
        """Catches up with per_s pages per second since the start."""
        if self.count and self.per_s > 0:
            self.rewrite(max(0, int((now - self.t0) * self.per_s) - self.done))


def fill_os_id(k: int, mod: int) -> int:
    """The os content the k-th filled page of a guest becomes: os contents 0 .. mod - 1 in
    turn (WorkloadSpec.fill_mod: every initial guest holds them, so each already has a KSM
    page once merged, and a filled page merges at ksmd's first look at it)."""
    return k % mod


def filled_pages(elapsed: float, per_s: float, cap: int) -> int:
    """How many pages a guest has filled `elapsed` seconds after its clock started: the
    plan, which the guest keeps to (Fill.tick) and the achievable saving is computed from
    (workload.AchievableCurve)."""
    if elapsed <= 0 or per_s <= 0:
        return 0
    return min(cap, int(elapsed * per_s))


class Fill:
    """Turns unique pages unique_first .. unique_first + count - 1, in order, into copies of
    os contents (fill_os_id): per_s pages per second from t0 until all `count` are, as a
    guest does that reads more of the OS image into its page cache. A unique page never
    merges; a filled one saves a page once ksmd looks at it."""

    def __init__(self, m: mmap.mmap, unique_first: int, count: int, mod: int, per_s: float, t0: float,
                 layout: Optional[Layout] = None) -> None:
        self.m, self.unique_first, self.count, self.mod, self.per_s, self.t0 = m, unique_first, count, mod, per_s, t0
        self.at = (layout or Layout(len(m) // PS)).offset
        self.done = 0   # pages filled so far

    def tick(self, now: float) -> None:
        """Catches up with the plan (filled_pages) at `now`."""
        want = filled_pages(now - self.t0, self.per_s, self.count)
        for k in range(self.done, want):
            HEADER.pack_into(self.m, self.at(self.unique_first + k), *os_header(fill_os_id(k, self.mod)))
        self.done = max(self.done, want)


def main() -> None:
    a = sys.argv[1:]
    index, family, nonce = int(a[0]), int(a[1]), int(a[2])
    zero, osn, app, within, pool, churn, unique = (int(x) for x in a[3:10])
    churn_rate = float(a[10])
    trickle_start, trickle, trickle_per_s = int(a[11]), int(a[12]), float(a[13])
    fill_n, fill_mod, fill_per_s = int(a[14]), int(a[15]), float(a[16])
    scatter = a[17] == "1"
    if fill_n > unique:
        raise SystemExit("fill %d is more than the unique pages (%d)" % (fill_n, unique))
    n = zero + osn + app + within + churn + unique
    m = mmap.mmap(-1, n * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    layout = Layout(n, scatter_stride(n) if scatter else 1)
    first = fill(m, index, family, nonce, zero, osn, app, within, pool, churn, unique, layout)
    m.madvise(mmap.MADV_MERGEABLE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(m))
    t0 = time.monotonic()   # the rewrites' clock (the same clock in every process)
    sys.stdout.write("ready %d %x %r\n" % (os.getpid(), address, t0))
    sys.stdout.flush()

    # Churn: rewrite churn pages with never-repeating contents, ~churn_rate of them per second.
    gen = 0
    per_tick = max(1, int(churn * churn_rate / 10)) if churn else 0
    pos = 0
    churn_start = first["churn"]
    rewrites = Trickle(m, first["os"], trickle_start, trickle, trickle_per_s, t0, layout)
    fills = Fill(m, first["unique"], fill_n, max(1, fill_mod), fill_per_s, t0, layout)
    while True:
        r, _, _ = select.select([sys.stdin], [], [], 0.1)
        if r and not sys.stdin.readline():
            break
        now = time.monotonic()
        rewrites.tick(now)
        fills.tick(now)
        if not per_tick:
            continue
        gen += 1
        for _ in range(per_tick):
            o = layout.offset(churn_start + pos)
            HEADER.pack_into(m, o + 64, CHURNED, gen, (nonce << 16) | index)
            pos = (pos + 1) % churn
        time.sleep(0)


if __name__ == "__main__":
    main()
