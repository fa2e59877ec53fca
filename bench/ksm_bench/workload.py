"""The workload: guest-like processes with a known duplicate structure, and a ballast.

Each guest maps anonymous memory, fills it page by page from a plan, marks it
MADV_MERGEABLE and then rewrites its churn pages with fresh unique contents, and its
trickle pages with the contents they already hold, at a steady rate until its stdin
closes. The plan's page kinds:

- zero: pages written with zeros (allocated, not the shared zero page);
- os: contents shared by every guest (an OS image): id j in each guest that has > j;
- app: contents shared by the guests of one family (guest index % families);
- within: contents duplicated inside one guest only (a pool of `within_pool` ids);
- churn: rewritten continuously with unique contents: never mergeable;
- unique: everything else.

Trickle pages are not a kind: they are some of a guest's os pages (`trickle_ranges`), and
rewriting them leaves their contents, hence the achievable saving, as they were.

Fill pages are not a kind either: they are a guest's first unique pages, turned one by one
after it is ready into copies of os contents (guest_proc.fill_os_id, at the rate of
guest_proc.filled_pages), so the achievable saving grows by one page per page filled
(AchievableCurve, which checks that it does).

Because every content is known, the achievable saving is exact: a content present in
c pages saves c - ceil(c / max_page_sharing) pages (KSM chains a content into stable
nodes of at most max_page_sharing sharers); zero pages with use_zero_pages=1 map to the
kernel's zero page and save one page each.

The ballast is one process of plain (non-mergeable) anonymous memory, populated so it
is really resident. While it holds, it keeps "free" memory (MemFree + Buffers + Cached,
ksmtuned's measure) at a target by growing or shrinking in 64 MiB chunks, and never
lets MemAvailable fall below a floor (other work on the host keeps its memory). Memory
that KSM frees is taken up by the ballast again: the pressure is sustained, as on a
host whose demand exceeds RAM, and ksmtuned keeps seeing free memory below its threshold.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from tests.mergeable import release  # the repo root is on sys.path (run_ksm_bench.py, pytest)

from .guest_proc import fill_os_id, filled_pages

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class GuestSpec:
    """One guest: size and the share of each page kind (fractions of its pages)."""

    mib: int
    zero: float = 0.10
    os: float = 0.35
    app: float = 0.10
    within: float = 0.10
    within_pool: int = 512        # distinct contents of the within-guest duplicates
    churn: float = 0.02
    churn_rate: float = 0.5       # share of the churn pages rewritten per second
    trickle: float = 0.0          # share of its pages (taken from its os pages) rewritten with their own contents
    trickle_rate: float = 0.05    # share of the trickle pages rewritten per second
    fill: float = 0.0             # share of its pages (taken from its unique pages) turned into os copies over time
    fill_rate: float = 0.0        # share of its pages turned per second, from when it is ready, until `fill`
    scatter: bool = False         # its plan's pages spread through its memory (guest_proc.Layout), not kind after kind

    @property
    def pages(self) -> int:
        return self.mib * MIB // PAGE

    @property
    def fill_pages(self) -> int:
        return int(self.pages * self.fill)

    @property
    def fill_per_s(self) -> float:
        """Unique pages turned into os copies per second (until fill_pages are)."""
        return self.pages * self.fill_rate if self.fill_pages else 0.0

    @property
    def trickle_pages(self) -> int:
        return int(self.pages * self.trickle)

    @property
    def trickle_per_s(self) -> float:
        """Trickle pages rewritten per second."""
        return self.trickle_pages * self.trickle_rate

    def counts(self) -> Dict[str, int]:
        n = self.pages
        c = {k: int(n * getattr(self, k)) for k in ("zero", "os", "app", "within", "churn")}
        c["unique"] = n - sum(c.values())
        if c["unique"] < 0:
            raise ValueError("guest shares add up to more than 1: %r" % (self,))
        if self.fill_pages > c["unique"]:
            raise ValueError("fill pages %d are more than the unique pages of %r" % (self.fill_pages, self))
        return c


@dataclass(frozen=True)
class WorkloadSpec:
    guests: List[GuestSpec]
    growth: List[GuestSpec] = field(default_factory=list)   # started during pressure
    families: int = 2

    def to_dict(self) -> dict:
        return asdict(self)

    def trickle_ranges(self) -> List[Tuple[int, int]]:
        """(first os content id, count) of the os pages each guest rewrites with their own
        contents, for the guests and then the growth guests (their start order). The ranges
        follow one another, so no content has all its copies rewritten: its KSM page always
        keeps a mapping, and ksmd's next look at a rewritten page merges it again."""
        out, start = [], 0
        for g in self.guests + self.growth:
            n = g.trickle_pages
            if n and start + n > g.counts()["os"]:
                raise ValueError("trickle pages %d..%d are beyond the os pages of %r" % (start, start + n, g))
            out.append((start if n else 0, n))
            start += n
        return out

    def trickle_per_s(self, growth: bool = True) -> float:
        """Pages rewritten with their own contents per second, by the initial guests (and the growth guests)."""
        return sum(g.trickle_per_s for g in self.guests + (self.growth if growth else []))

    def fill_mod(self) -> int:
        """How many os contents the filled pages cycle through (guest_proc.fill_os_id): those
        every initial guest holds, so each has copies to merge with from the start."""
        return min(g.counts()["os"] for g in self.guests) if self.guests else 0

    def fill_per_s(self, growth: bool = True) -> float:
        """Unique pages turned into os copies per second, by the initial guests (and the growth
        guests), while none has reached its fill_pages."""
        return sum(g.fill_per_s for g in self.guests + (self.growth if growth else []))


def default_workload() -> WorkloadSpec:
    """About 4.3 GiB of guests, then 1.1 GiB more during pressure; shares vary per guest."""
    return WorkloadSpec(
        guests=[
            GuestSpec(1024, zero=0.15, os=0.40, app=0.10, within=0.05, within_pool=256, churn=0.02),
            GuestSpec(768, zero=0.05, os=0.35, app=0.15, within=0.10, within_pool=1024, churn=0.01),
            GuestSpec(512, zero=0.20, os=0.30, app=0.05, within=0.15, within_pool=64, churn=0.03),
            GuestSpec(1024, zero=0.10, os=0.45, app=0.10, within=0.05, within_pool=2048, churn=0.02),
            GuestSpec(640, zero=0.08, os=0.25, app=0.20, within=0.10, within_pool=512, churn=0.04),
            GuestSpec(448, zero=0.25, os=0.35, app=0.00, within=0.20, within_pool=128, churn=0.01),
        ],
        growth=[
            GuestSpec(640, zero=0.12, os=0.40, app=0.10, within=0.08, within_pool=300, churn=0.02),
            GuestSpec(512, zero=0.10, os=0.30, app=0.15, within=0.10, within_pool=700, churn=0.02),
        ],
    )


def quick_workload() -> WorkloadSpec:
    """About 400 MiB, for the test suite and for iterating."""
    return WorkloadSpec(
        guests=[GuestSpec(128, zero=0.10, os=0.40, within=0.10, within_pool=64),
                GuestSpec(96, zero=0.20, os=0.30, app=0.10, within=0.05, within_pool=32, churn=0.03),
                GuestSpec(96, zero=0.05, os=0.45, app=0.10, within=0.10, within_pool=128)],
        growth=[GuestSpec(96, zero=0.10, os=0.35, app=0.10, within=0.10, within_pool=50)],
    )


def churn_workload(base: Optional[WorkloadSpec] = None) -> WorkloadSpec:
    """`base` (the default workload) with guests that rewrite a sizable share of their
    memory continuously: a fifth of every guest's pages (taken from its unique pages, so
    the achievable saving is unchanged) is rewritten at churn_rate per second. ksmd sees
    those pages change between passes: pages_volatile stays well above zero."""
    base = base or default_workload()

    def churned(g: GuestSpec) -> GuestSpec:
        extra = max(0.0, 0.20 - g.churn)
        return replace(g, churn=g.churn + extra)
    return replace(base, guests=[churned(g) for g in base.guests], growth=[churned(g) for g in base.growth])


TRICKLE, TRICKLE_RATE = 0.02, 0.05


def trickle_workload(base: Optional[WorkloadSpec] = None) -> WorkloadSpec:
    """`base` (the default workload) with guests that keep rewriting part of their mergeable
    memory with the contents it already holds, as a guest does that reads the same file
    into page cache again: TRICKLE of every guest's pages (taken from its os pages, so the
    achievable saving is unchanged), TRICKLE_RATE of them per second (WorkloadSpec.trickle_per_s;
    the report states it). A write to a merged page breaks the merge (copy-on-write), and ksmd's next look at the
    page merges it again. The kernel goes on counting a broken merge until that look
    (pages_sharing does not dip; the run samples the guests' mapped KSM pages to show it)."""
    base = base or default_workload()

    def trickled(g: GuestSpec) -> GuestSpec:
        return replace(g, trickle=TRICKLE, trickle_rate=TRICKLE_RATE)
    return replace(base, guests=[trickled(g) for g in base.guests], growth=[trickled(g) for g in base.growth])


# A check after the passes finds about 1000 x rate x (the time since ksmd last saw the stretch
# it checks: about one pass) new merges per 1000 pages; idle_yield (1) comes first, then
# min_pass_yield (5% of the phase's saving per CPU-second when these were sized: about 3 per
# 1000 on the full workload, 7 on the quick one; the default policy has asked 20% since).
# Passes take about 3 s on the full workload, 2 s on the quick one: so a larger share per
# second in --quick (bench/README.md: the runs that sized them).
FILL, FILL_RATE, FILL_RATE_QUICK = 0.18, 7e-4, 1.5e-3


def fill_workload(base: Optional[WorkloadSpec] = None, rate: float = FILL_RATE) -> WorkloadSpec:
    """`base` (the default workload) with guests whose achievable saving keeps growing, as
    guests do that keep reading more of the same OS image into page cache: from when it is
    ready, each guest turns `rate` of its pages per second, taken from its unique pages
    (never mergeable), into copies of os contents that every initial guest holds, until
    FILL of its pages are. Each page filled adds one page to the achievable saving
    (AchievableCurve), and merges at ksmd's first look at it (its content has a KSM page
    already): a trickle of genuinely new merges (WorkloadSpec.fill_per_s; the report states
    it). The guests' pages are scattered (guest_proc.Layout), as page cache is through a
    guest's RAM: laid out kind after kind, the fill's pages would sit in the unique pages
    at the end of each guest, and the 2 s check after a pass, which scans the start of
    ksmd's list (the first guest's zero and os pages), would never see one."""
    base = base or default_workload()

    def filled(g: GuestSpec) -> GuestSpec:
        return replace(g, fill=FILL, fill_rate=rate, scatter=True)
    return replace(base, guests=[filled(g) for g in base.guests], growth=[filled(g) for g in base.growth])


WORKLOADS = {"default": (default_workload, quick_workload),
             "churn": (lambda: churn_workload(default_workload()), lambda: churn_workload(quick_workload())),
             "trickle": (lambda: trickle_workload(default_workload()), lambda: trickle_workload(quick_workload())),
             "fill": (lambda: fill_workload(default_workload()),
                      lambda: fill_workload(quick_workload(), FILL_RATE_QUICK))}


def _saving(copies: int, max_page_sharing: int) -> int:
    return copies - int(math.ceil(copies / max_page_sharing)) if copies > 0 else 0


def content_copies(guests: Iterable[GuestSpec], families: int, filled: Sequence[int] = (),
                   fill_mod: int = 1) -> Counter:
    """How many pages hold each mergeable content (zero pages under key 'zero'); filled[g]:
    how many of guest g's unique pages have become os copies (guest_proc.fill_os_id)."""
    copies: Counter = Counter()
    guests = list(guests)
    for g, n in enumerate(filled):
        if n > guests[g].fill_pages:
            raise ValueError("guest %d fills at most %d pages, not %d" % (g, guests[g].fill_pages, n))
        for k in range(n):
            copies[("os", fill_os_id(k, fill_mod))] += 1
    for g, spec in enumerate(guests):
        c = spec.counts()
        copies["zero"] += c["zero"]
        for j in range(c["os"]):
            copies[("os", j)] += 1
        for j in range(c["app"]):
            copies[("app", g % families, j)] += 1
        pool = max(1, spec.within_pool)
        for j in range(c["within"]):
            copies[("within", g, j % pool)] += 1
    return copies


def achievable_pages(guests: Iterable[GuestSpec], families: int = 2, use_zero_pages: bool = False,
                     max_page_sharing: int = 256, filled: Sequence[int] = (), fill_mod: int = 1) -> int:
    """The saving (pages) that merging everything mergeable in these guests gives (with
    filled[g] of guest g's pages filled, see content_copies)."""
    copies = content_copies(guests, families, filled, fill_mod)
    zero = copies.pop("zero", 0)
    total = sum(_saving(c, max_page_sharing) for c in copies.values())
    total += zero if use_zero_pages else _saving(zero, max_page_sharing)
    return total


@dataclass(frozen=True)
class AchievableCurve:
    """The achievable saving of some guests as a function of time, when they fill pages
    (fill_workload): the saving with nothing filled, plus one page per page filled, which
    `of` checks once for every guest filled to its cap (every increment of a content's
    saving c - ceil(c / max_page_sharing) is 0 or 1, so if the whole fill adds one page per
    page, every part of it does). Without fill pages it is the constant achievable_pages."""

    base: int
    per_s: Tuple[float, ...]   # pages filled per second, per guest
    caps: Tuple[int, ...]      # pages filled at most, per guest

    @classmethod
    def of(cls, guests: Sequence[GuestSpec], fill_mod: int, families: int = 2, use_zero_pages: bool = False,
           max_page_sharing: int = 256) -> "AchievableCurve":
        guests = list(guests)
        base = achievable_pages(guests, families, use_zero_pages, max_page_sharing)
        caps = tuple(g.fill_pages for g in guests)
        if any(caps):
            full = achievable_pages(guests, families, use_zero_pages, max_page_sharing, caps, fill_mod)
            if full != base + sum(caps):
                raise ValueError("filling %d pages adds %d to the achievable saving, not one page each"
                                 % (sum(caps), full - base))
        return cls(base, tuple(g.fill_per_s for g in guests), caps)

    def filled(self, t: float, starts: Sequence[Optional[float]]) -> int:
        """Pages filled by time t, when guest g's fill clock started at starts[g] (None: not
        started, e.g. a growth guest before it is ready)."""
        return sum(filled_pages(t - s, r, c) for s, r, c in zip(starts, self.per_s, self.caps) if s is not None)

    def at(self, t: float, starts: Sequence[Optional[float]]) -> int:
        """The achievable saving (pages) at time t (the same clock as starts)."""
        return self.base + self.filled(t, starts)


# -- the guest process --------------------------------------------------------------------

GUEST_CHILD = HERE / "guest_proc.py"
BALLAST_CHILD = HERE / "ballast_proc.py"


class Guest:
    def __init__(self, index: int, spec: GuestSpec, families: int, nonce: int,
                 trickle: Tuple[int, int] = (0, 0), fill_mod: int = 1) -> None:
        self.index, self.spec = index, spec
        c = spec.counts()
        self.argv = [sys.executable, str(GUEST_CHILD), str(index), str(index % families), str(nonce),
                     str(c["zero"]), str(c["os"]), str(c["app"]), str(c["within"]), str(spec.within_pool),
                     str(c["churn"]), str(c["unique"]), "%g" % spec.churn_rate,
                     str(trickle[0]), str(trickle[1]), "%r" % spec.trickle_per_s,
                     str(spec.fill_pages), str(fill_mod), "%r" % spec.fill_per_s, "1" if spec.scatter else "0"]
        self.proc: Optional[subprocess.Popen] = None
        self.address: Optional[int] = None   # of its memory, once ready
        self.clock: Optional[float] = None   # time.monotonic() when its rewrites and fill began

    def start(self) -> "Guest":
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError("guest %d did not start: %r" % (self.index, line))
        self.address = int(line.split()[2], 16)
        self.clock = float(line.split()[3])

    def stop(self) -> None:
        if self.proc is not None:
            release([self.proc])


def start_guests(spec: WorkloadSpec, growth: bool, nonce: int) -> List[Guest]:
    """The initial guests (growth=False) or the growth guests, started and filled."""
    first = len(spec.guests) if growth else 0
    specs = spec.growth if growth else spec.guests
    ranges = spec.trickle_ranges()[first:first + len(specs)]
    mod = spec.fill_mod()
    guests = [Guest(first + i, s, spec.families, nonce, r, mod).start() for i, (s, r) in enumerate(zip(specs, ranges))]
    for g in guests:
        g.wait_ready()
    return guests


# -- the ballast ---------------------------------------------------------------------------

class Ballast:
    """Controls the ballast children: hold free memory at `target_free` bytes (never
    letting MemAvailable fall below `floor`), or release everything. `workers` processes
    populate in parallel (page faults run at about 700 MiB/s per core here)."""

    def __init__(self, target_free: int, floor: int, workers: int = 1) -> None:
        self.target_free, self.floor, self.workers = target_free, floor, workers
        self.procs: List[subprocess.Popen] = []

    def start(self) -> "Ballast":
        self.procs = [subprocess.Popen([sys.executable, str(BALLAST_CHILD), str(self.target_free), str(self.floor),
                                        str(self.workers)], stdin=subprocess.PIPE, text=True)
                      for _ in range(self.workers)]
        return self

    @property
    def pids(self) -> List[int]:
        return [p.pid for p in self.procs]

    def _send(self, cmd: str) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(cmd + "\n")
            p.stdin.flush()

    def hold(self) -> None:
        self._send("hold")

    def release(self) -> None:
        self._send("release")

    def rss(self) -> int:
        total = 0
        for p in self.procs:
            try:
                total += int(Path("/proc/%d/statm" % p.pid).read_text().split()[1]) * PAGE
            except (OSError, ValueError, IndexError):
                pass
        return total

    def stop(self) -> None:
        release(self.procs, timeout=20)
        self.procs = []


def meminfo() -> Dict[str, int]:
    out: Dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, rest = line.partition(":")
            out[k] = int(rest.split()[0]) * 1024
    return out


def ksm_pages(pid: int) -> Tuple[Optional[int], Optional[int]]:
    """(counted, mapped) for one process: the merges the kernel counts for it (ksm_stat's
    ksm_merging_pages, which, like pages_sharing, changes only when ksmd looks at a page)
    and its pages that map a KSM page now (smaps_rollup's KSM: a write broke each merge
    counted but no longer mapped). None where this kernel does not say. smaps_rollup walks
    the page tables: about 15 ms of CPU per GiB here."""
    counted = mapped = None
    try:
        for line in Path("/proc/%d/ksm_stat" % pid).read_text().splitlines():
            if line.startswith("ksm_merging_pages "):
                counted = int(line.split()[1])
        for line in Path("/proc/%d/smaps_rollup" % pid).read_text().splitlines():
            if line.startswith("KSM:"):
                mapped = int(line.split()[1]) * 1024 // PAGE
    except (OSError, ValueError, IndexError):
        pass
    return counted, mapped


def wait_until(cond, timeout: float, step: float = 0.2) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())
