"""Dedup-potential estimator: how much of the targets' mergeable memory KSM could share,
and how much of that it shares now.

Why this shape:
- Only pages that /proc/<pid>/pagemap reports present are read, run by run, through
  /proc/<pid>/mem. Reading a non-present page would fault it in (swap-in, or allocate
  an untouched page), which is exactly the disturbance an estimator must not cause.
  Pagemap is read in windows just before the pages, to keep that race window short.
- Each 4 KiB page is hashed with XXH3-128 (the `xxhash` package). 128 bits makes
  byte-confirmation unnecessary: for n distinct pages the chance that any two collide is
  below n^2 / 2^129 (2^-73 for a whole TiB of distinct pages), and a collision would
  misreport one page. So no page content is ever kept, only hashes, and only in memory.
- The per-page work is all in C: a reused, page-aligned 256 KiB buffer (it stays in L2
  while hashed; a bytearray's 16-byte offset made the kernel's copy up to 3x slower),
  one memoryview per page made once, and `b"".join(map(xxh3_128_digest, pages))`
  appended to a flat per-target buffer. Counting happens once, by a sort
  (estimate_count.py), not by a dict lookup per page. All-zero buffers are recognised
  with one memcmp (`bytes.startswith`) and never hashed.
- /proc/<pid>/mem, not process_vm_readv(2): the latter's read-only pin makes the kernel
  unshare every KSM page it reads, so the scan would undo the merging it measures.
- "Achieved" is measured on the same pages as "achievable": pagemap gives each present
  page's frame number (root only), so pages that already share a frame (a KSM page, or the
  kernel's zero page) are counted exactly, without trusting global counters that also
  include processes outside the targets. The kernel's counters are reported next to it.

Accounting (pages; see docs/estimate.md):
- A content present c >= 2 times can save c - 1 pages (one frame kept).
- Zero pages are reported separately. With use_zero_pages=1 KSM maps each one to the
  kernel's zero page, saving all Z of them; otherwise they merge like any content (Z - 1).
  Pages already mapping the zero page (read before ever written) already cost nothing.
- Across targets, a content held once by A and once by B saves one page globally. Each
  target gets its standalone figure (as if scanned alone) and a share of the global figure:
  each of its pages of a content held c times globally carries (c - 1) / c.
"""
from __future__ import annotations

import errno
import mmap
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import xxhash

from ksmctl.collectors.procfs import parse_ksm_stat_fields as parse_ksm_stat
from ksmctl.errors import PermissionDenied, ReadError, UsageError
from ksmctl.estimate.count import KeyTally

HASH_NAME = "xxh3_128"
_hash = xxhash.xxh3_128_digest   # 16 bytes, appended to a flat buffer and counted by one sort

PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_FILE = 1 << 61
PM_EXCLUSIVE = 1 << 56
PFN_MASK = (1 << 55) - 1

# Classes of a page from the top byte of its pagemap entry (bits 56..63).
_C_SKIP, _C_EXCL, _C_SHARED, _C_FILE = b".", b"P", b"S", b"F"


def _class_table() -> bytes:
    table = bytearray(256)
    for top in range(256):
        if not top & 0x80:          # bit 63: not present (untouched, or swapped: bit 62)
            table[top] = _C_SKIP[0]
        elif top & 0x20:            # bit 61: file page or shared anon; the huge zero page too
            table[top] = _C_FILE[0]
        elif top & 0x01:            # bit 56: mapped exactly once: cannot be sharing a frame
            table[top] = _C_EXCL[0]
        else:
            table[top] = _C_SHARED[0]
    return bytes(table)


_CLASS = _class_table()
_RUN_RE = re.compile(rb"[PS]+")
_SHARED_RE = re.compile(rb"S+")
_FILE_RE = re.compile(rb"F+")

BUFFER_BYTES = 256 * 1024     # per read: small enough to stay in L2 (1 MiB here) while it is hashed
WINDOW_PAGES = 4096           # pagemap entries read at once (16 MiB of address space)
_QEMU_NAME_RE = re.compile(r"(?:^|,)guest=((?:[^,]|,,)+)")


# ---------------------------------------------------------------------------- targets

@dataclass(frozen=True)
class Target:
    """A process to scan. kind is 'vm' for a QEMU guest (name = guest name)."""

    pid: int
    name: str
    kind: str = "process"


@dataclass(frozen=True)
class Region:
    start: int
    end: int
    rss_bytes: int


def parse_smaps_mergeable(text: str) -> List[Region]:
    """VMAs whose VmFlags contain `mg` (MADV_MERGEABLE or prctl merge-any), with their Rss."""
    regions: List[Region] = []
    start = end = rss = 0
    in_vma = False
    for line in text.splitlines():
        head = line.split(None, 1)
        if not head:
            continue
        key = head[0]
        if not key.endswith(":"):
            # A VMA header: "start-end perms offset dev inode [path]".
            lo, sep, hi = key.partition("-")
            if not sep:
                continue
            try:
                start, end = int(lo, 16), int(hi, 16)
            except ValueError:
                continue
            rss, in_vma = 0, True
        elif key == "Rss:" and in_vma:
            try:
                rss = int(head[1].split()[0]) * 1024
            except (IndexError, ValueError):
                rss = 0
        elif key == "VmFlags:" and in_vma:
            flags = head[1].split() if len(head) > 1 else []
            if "mg" in flags:
                regions.append(Region(start, end, rss))
            in_vma = False
    return regions


def qemu_guest_name(argv: Sequence[str]) -> Optional[str]:
    """Guest name of a QEMU command line (`-name guest=NAME,...` or `-name NAME`), else None."""
    if not argv or not os.path.basename(argv[0]).startswith(("qemu-system", "qemu-kvm")):
        return None
    for i, arg in enumerate(argv[:-1]):
        if arg in ("-name", "--name"):
            value = argv[i + 1]
            m = _QEMU_NAME_RE.search(value)
            if m:
                return m.group(1).replace(",,", ",")
            if "=" not in value.split(",", 1)[0]:
                return value.split(",", 1)[0].replace(",,", ",") or None
    return None


def _pids(proc: Path) -> List[int]:
    try:
        return sorted(int(e) for e in os.listdir(proc) if e.isdigit())
    except OSError as e:
        raise ReadError("%s: cannot list processes: %s" % (proc, e.strerror)) from None


def _cmdline(proc: Path, pid: int) -> Optional[List[str]]:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a] or None


def find_qemu_guests(proc_root: str = "/proc") -> Dict[str, int]:
    """Running QEMU guests by name -> pid, from /proc/*/cmdline."""
    proc = Path(proc_root)
    guests: Dict[str, int] = {}
    for pid in _pids(proc):
        argv = _cmdline(proc, pid)
        name = qemu_guest_name(argv) if argv else None
        if name is not None:
            guests.setdefault(name, pid)
    return guests


def describe_pid(pid: int, proc_root: str = "/proc") -> Target:
    """A Target for a pid, named after its guest if it is QEMU, else after its comm."""
    proc = Path(proc_root)
    argv = _cmdline(proc, pid)
    name = qemu_guest_name(argv) if argv else None
    if name is not None:
        return Target(pid, name, "vm")
    try:
        comm = (proc / str(pid) / "comm").read_text().strip()
    except OSError:
        comm = "?"
    return Target(pid, "%s[%d]" % (comm, pid), "process")


def discover_mergeable(proc_root: str = "/proc", exclude: Iterable[int] = ()) -> List[Target]:
    """Every process with at least one mergeable VMA.

    ksm_stat's `ksm_mergeable` (6.10+) is a cheap pre-filter; smaps, which walks page
    tables, is only read for processes that pass it (or on kernels without the field).
    """
    proc = Path(proc_root)
    skip = set(exclude)
    found: List[Target] = []
    for pid in _pids(proc):
        if pid in skip:
            continue
        try:
            stat = parse_ksm_stat((proc / str(pid) / "ksm_stat").read_text())
        except OSError:
            stat = {}
        if stat.get("ksm_mergeable") is False:
            continue
        try:
            regions = parse_smaps_mergeable((proc / str(pid) / "smaps").read_text())
        except OSError:
            continue   # gone, or a kernel thread
        if regions:
            found.append(describe_pid(pid, proc_root))
    return found


def resolve_targets(vms: Sequence[str] = (), pids: Sequence[int] = (),
                    proc_root: str = "/proc") -> List[Target]:
    """Targets for --vm/--pid; every mergeable process (except this one) when both are empty."""
    if not vms and not pids:
        return discover_mergeable(proc_root, exclude=(os.getpid(),))
    targets: List[Target] = []
    if vms:
        guests = find_qemu_guests(proc_root)
        missing = [v for v in vms if v not in guests]
        if missing:
            known = ", ".join(sorted(guests)) or "none running"
            raise UsageError("no running QEMU guest named %s (guests: %s)"
                             % (", ".join(repr(m) for m in missing), known))
        targets.extend(Target(guests[v], v, "vm") for v in vms)
    for pid in pids:
        if not (Path(proc_root) / str(pid)).is_dir():
            raise UsageError("no process with pid %d" % pid)
        targets.append(describe_pid(pid, proc_root))
    seen = set()
    unique = []
    for t in targets:
        if t.pid not in seen:
            seen.add(t.pid)
            unique.append(t)
    return unique


# ---------------------------------------------------------------------------- results

@dataclass
class Progress:
    """Handed to the progress callback; total is the mergeable Rss from smaps (an estimate)."""

    done_bytes: int
    total_bytes: int
    elapsed_s: float
    target: str

    @property
    def rate_bytes_per_s(self) -> float:
        return self.done_bytes / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> Optional[float]:
        rate = self.rate_bytes_per_s
        if rate <= 0 or self.total_bytes <= self.done_bytes:
            return None if rate <= 0 else 0.0
        return (self.total_bytes - self.done_bytes) / rate


@dataclass
class TargetEstimate:
    pid: int
    name: str
    kind: str
    scanned_pages: int = 0
    zero_pages: int = 0             # pages whose content is all zeros (incl. zero_mapped)
    zero_mapped_pages: int = 0      # of those, already mapping the kernel's zero page
    distinct_nonzero: int = 0       # distinct non-zero contents within this target
    duplicate_pages: int = 0        # non-zero pages whose content occurs >= 2 times here
    achievable_alone: int = 0       # pages KSM could save if this target were alone
    achieved_alone: int = 0         # pages already sharing a frame within this target
    achievable_share: float = 0.0   # this target's part of the global achievable figure
    achieved_share: float = 0.0
    unreadable_pages: int = 0       # present in pagemap, but /proc/<pid>/mem said EIO
    mergeable_rss_bytes: int = 0
    ksm_stat: Dict[str, object] = field(default_factory=dict)

    @property
    def efficiency(self) -> Optional[float]:
        return _ratio(self.achieved_share, self.achievable_share)

    @property
    def remaining_share(self) -> float:
        return max(0.0, self.achievable_share - self.achieved_share)


@dataclass
class Skipped:
    pid: int
    name: str
    reason: str


@dataclass
class EstimateResult:
    page_size: int
    use_zero_pages: bool
    max_page_sharing: int
    targets: List[TargetEstimate] = field(default_factory=list)
    skipped: List[Skipped] = field(default_factory=list)
    partial: bool = False
    scanned_pages: int = 0
    zero_pages: int = 0
    zero_mapped_pages: int = 0
    distinct_nonzero: int = 0
    duplicate_pages: int = 0        # non-zero pages whose content occurs >= 2 times overall
    achievable_nonzero: int = 0     # sum over non-zero contents of (count - 1)
    zero_saving: int = 0            # what the zero pages can save (see module doc)
    achievable_capped: int = 0      # achievable, limited by max_page_sharing per frame
    achieved: int = 0               # pages already sharing a frame (or the zero page)
    unreadable_pages: int = 0
    bytes_read: int = 0
    elapsed_s: float = 0.0
    cpu_s: float = 0.0
    host: Dict[str, int] = field(default_factory=dict)

    @property
    def achievable(self) -> int:
        return self.achievable_nonzero + self.zero_saving

    @property
    def remaining(self) -> int:
        return max(0, self.achievable - self.achieved)

    @property
    def efficiency(self) -> Optional[float]:
        return _ratio(self.achieved, self.achievable)

    @property
    def cross_target(self) -> int:
        """What sharing between targets adds over each target deduplicated on its own."""
        return self.achievable - sum(t.achievable_alone for t in self.targets)

    def to_dict(self) -> Dict[str, object]:
        ps = self.page_size

        def pages(n: float) -> Dict[str, object]:
            return {"pages": round(n, 2) if isinstance(n, float) else n, "bytes": int(round(n * ps))}

        return {
            "partial": self.partial,
            "page_size": ps,
            "hash": HASH_NAME,
            "use_zero_pages": self.use_zero_pages,
            "max_page_sharing": self.max_page_sharing,
            "total": {
                "scanned": pages(self.scanned_pages),
                "zero": pages(self.zero_pages),
                "zero_mapped": pages(self.zero_mapped_pages),
                "distinct_nonzero": self.distinct_nonzero,
                "duplicate": pages(self.duplicate_pages),
                "achievable": pages(self.achievable),
                "achievable_nonzero": pages(self.achievable_nonzero),
                "zero_saving": pages(self.zero_saving),
                "achievable_capped": pages(self.achievable_capped),
                "cross_target": pages(self.cross_target),
                "achieved": pages(self.achieved),
                "remaining": pages(self.remaining),
                "efficiency": self.efficiency,
                "unreadable": pages(self.unreadable_pages),
            },
            "targets": [{
                "pid": t.pid, "name": t.name, "kind": t.kind,
                "scanned": pages(t.scanned_pages),
                "zero": pages(t.zero_pages),
                "zero_mapped": pages(t.zero_mapped_pages),
                "distinct_nonzero": t.distinct_nonzero,
                "duplicate": pages(t.duplicate_pages),
                "achievable_alone": pages(t.achievable_alone),
                "achieved_alone": pages(t.achieved_alone),
                "achievable_share": pages(t.achievable_share),
                "achieved_share": pages(t.achieved_share),
                "remaining_share": pages(t.remaining_share),
                "efficiency": t.efficiency,
                "unreadable": pages(t.unreadable_pages),
                "ksm_stat": t.ksm_stat,
            } for t in self.targets],
            "skipped": [{"pid": s.pid, "name": s.name, "reason": s.reason} for s in self.skipped],
            "host": self.host,
            "scan": {"bytes_read": self.bytes_read, "elapsed_s": round(self.elapsed_s, 3),
                     "cpu_s": round(self.cpu_s, 3)},
        }


def _ratio(a: float, b: float) -> Optional[float]:
    return None if b <= 0 else min(1.0, a / b)


def zero_saving(zero: int, zero_mapped: int, use_zero_pages: bool,
                max_page_sharing: Optional[int] = None) -> int:
    """Pages `zero` all-zero pages can save; `zero_mapped` of them already map the zero page."""
    own = zero - zero_mapped
    if own <= 0 or use_zero_pages:
        return zero
    if max_page_sharing:
        return zero_mapped + own - -(-own // max_page_sharing)
    return zero - 1


# ---------------------------------------------------------------------------- counting

class _TargetKeys:
    """What scanning one target accumulates: its pages' hashes (16 bytes each, appended in
    order) and the frame numbers of its pages that share a frame."""

    def __init__(self) -> None:
        self.digests = bytearray()
        self.frames: List[np.ndarray] = []
        self.huge_zero = 0   # pages mapping the huge zero page


class TokenBucket:
    """Limits the bytes read per second; a burst of 1/10 s keeps sleeps coarse."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise UsageError("rate limit must be positive, got %r" % rate)
        self.rate = float(rate)
        self.burst_s = 0.1
        self._clock = clock
        self._sleep = sleep
        self._due = clock() - self.burst_s   # start with a full burst

    def consume(self, n: int) -> None:
        now = self._clock()
        self._due = max(self._due, now - self.burst_s) + n / self.rate
        if self._due > now:
            self._sleep(self._due - now)


class _Gone(Exception):
    """The target process exited (or exec'd) during the scan."""


CAP_SYS_PTRACE, CAP_SYS_ADMIN = 19, 21
_NEEDED_CAPS = ((CAP_SYS_PTRACE, "CAP_SYS_PTRACE", "to read other users' process memory"),
                (CAP_SYS_ADMIN, "CAP_SYS_ADMIN", "for page frame numbers in pagemap"))


def missing_capabilities(status_text: str) -> List[str]:
    """Capabilities the scan needs that CapEff in /proc/self/status lacks (root can lack them
    too, e.g. under the shipped unit's CapabilityBoundingSet)."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            try:
                eff = int(line.split()[1], 16)
            except (IndexError, ValueError):
                return []
            return ["%s (%s)" % (name, why) for bit, name, why in _NEEDED_CAPS if not eff >> bit & 1]
    return []


# ---------------------------------------------------------------------------- engine

class Estimator:
    """Scans targets' mergeable memory and returns an EstimateResult. Needs root."""

    def __init__(self, proc_root: str = "/proc", page_size: int = os.sysconf("SC_PAGE_SIZE"),
                 rate_limit_bytes_per_s: Optional[float] = None,
                 progress: Optional[Callable[[Progress], None]] = None,
                 sys_root: str = "/sys", buffer_bytes: int = BUFFER_BYTES,
                 window_pages: int = WINDOW_PAGES, progress_interval_s: float = 0.25,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.proc = Path(proc_root)
        self.ksm_dir = Path(sys_root) / "kernel" / "mm" / "ksm"
        self.ps = page_size
        self.buffer_bytes = max(page_size, buffer_bytes // page_size * page_size)
        self.window_pages = window_pages
        self.bucket = TokenBucket(rate_limit_bytes_per_s, clock, sleep) if rate_limit_bytes_per_s else None
        self.progress = progress
        self.progress_interval_s = progress_interval_s
        self.clock = clock
        self.zero_key = np.frombuffer(_hash(bytes(page_size)), dtype="<u8").copy()
        self._zero_pfns: Tuple[int, ...] = ()
        self._huge_zero: Optional[int] = None   # first pfn of the huge zero page, if any

    # -- host facts

    def _ksm_int(self, name: str, default: int) -> int:
        try:
            return int((self.ksm_dir / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return default

    def host_counters(self) -> Dict[str, int]:
        names = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                 "ksm_zero_pages", "general_profit", "full_scans", "run")
        out = {}
        for n in names:
            v = self._ksm_int(n, -1)
            if v >= 0:
                out[n] = v
        return out

    def _probe_zero_pfns(self) -> None:
        """Learn the zero page's frame number(s) by reading untouched memory of our own.

        Pages mapping it already cost nothing; the huge zero page (THP) shows as 512
        consecutive frames flagged as file pages, so its first frame is kept too.
        """
        pfns = []
        try:
            fd = os.open(self.proc / "self" / "pagemap", os.O_RDONLY)
        except OSError:
            return
        try:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
            small = mmap.mmap(-1, self.ps, flags=flags)
            huge_len = 4 << 20
            big = mmap.mmap(-1, huge_len, flags=flags)
            try:
                if hasattr(mmap, "MADV_HUGEPAGE"):
                    try:
                        big.madvise(mmap.MADV_HUGEPAGE)
                    except OSError:
                        pass
                for m, off in ((small, 0), (big, None)):
                    base = _buffer_address(m)
                    if off is None:   # a 2 MiB aligned address inside `big`
                        off = (-base) % (2 << 20)
                    _ = m[off]        # read fault: maps the (huge) zero page
                    raw = os.pread(fd, 8, (base + off) // self.ps * 8)
                    if len(raw) == 8:
                        e = int.from_bytes(raw, "little")
                        if e & PM_PRESENT and e & PFN_MASK:
                            pfns.append((e & PFN_MASK, bool(e & PM_FILE)))
            finally:
                small.close()
                big.close()
        except (OSError, ValueError):
            pass
        finally:
            os.close(fd)
        for pfn, is_file in pfns:
            if is_file:
                self._huge_zero = pfn
            else:
                self._zero_pfns = (pfn,)

    # -- scanning

    def _check_capabilities(self) -> None:
        if os.geteuid() != 0:
            raise PermissionDenied(
                "ksmctl estimate needs root: it reads other processes' memory and their "
                "frame numbers through /proc/<pid>/pagemap")
        try:
            status = (self.proc / "self" / "status").read_text()
        except OSError:
            return   # a fixture /proc tree has no `self`
        missing = missing_capabilities(status)
        if missing:
            raise PermissionDenied(
                "the estimate runs as root but without %s. Under the shipped systemd unit, "
                "grant them with a drop-in (systemctl edit ksmctl): [Service] "
                "CapabilityBoundingSet=CAP_SYS_PTRACE CAP_SYS_ADMIN" % " and ".join(missing))

    def run(self, targets: Sequence[Target]) -> EstimateResult:
        self._check_capabilities()
        use_zero = bool(self._ksm_int("use_zero_pages", 0))
        mps = self._ksm_int("max_page_sharing", 256)
        result = EstimateResult(page_size=self.ps, use_zero_pages=use_zero, max_page_sharing=mps)
        self._probe_zero_pfns()
        contents, frames = KeyTally(2), KeyTally(1)
        # Page-aligned (an anonymous mmap, not a bytearray): the kernel's copy into a buffer
        # that starts 16 bytes into a page was measured up to 3x slower.
        buf = mmap.mmap(-1, self.buffer_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._view = memoryview(buf)
        self._zeros = bytes(self.buffer_bytes)
        # One memoryview per page of the buffer, made once: slicing per page cost ~40% of hashing.
        self._pages = [self._view[i:i + self.ps] for i in range(0, self.buffer_bytes, self.ps)]
        plans = []
        for t in targets:
            try:
                regions = parse_smaps_mergeable((self.proc / str(t.pid) / "smaps").read_text())
            except OSError as e:
                result.skipped.append(Skipped(t.pid, t.name, _why(e, "reading smaps")))
                continue
            plans.append((t, regions))
        self._total = sum(r.rss_bytes for _, rs in plans for r in rs)
        self._done = 0
        self._started = self.clock()
        self._last_report = 0.0
        cpu0 = time.process_time()
        try:
            for t, regions in plans:
                te = TargetEstimate(t.pid, t.name, t.kind,
                                    mergeable_rss_bytes=sum(r.rss_bytes for r in regions))
                acc = _TargetKeys()
                try:
                    self._scan_target(t, regions, te, acc)
                except _Gone:
                    result.skipped.append(Skipped(t.pid, t.name, "exited during the scan"))
                    continue
                except PermissionError as e:
                    result.skipped.append(Skipped(t.pid, t.name, _why(e, "reading memory")))
                    continue
                except KeyboardInterrupt:
                    result.partial = True
                    self._commit(te, acc, contents, frames)
                    result.targets.append(te)
                    raise
                self._commit(te, acc, contents, frames)
                result.targets.append(te)
                self._report(t.name, force=True)
        except KeyboardInterrupt:
            result.partial = True
        finally:
            for v in self._pages:
                v.release()
            self._view.release()
            try:
                buf.close()
            except BufferError:   # a slice still referenced by an interrupted read: GC closes it
                pass
        self._finish(result, contents, frames, use_zero, mps)
        result.bytes_read = self._done
        result.elapsed_s = self.clock() - self._started
        result.cpu_s = time.process_time() - cpu0
        result.host = self.host_counters()
        return result

    def _commit(self, te: TargetEstimate, acc: _TargetKeys, contents: KeyTally,
                frames: KeyTally) -> None:
        """Hand one target's keys to the tallies, less zero pages (counted on their own)."""
        keys = np.frombuffer(acc.digests, dtype="<u8").reshape(-1, 2)
        acc.digests = bytearray()
        zero = (keys[:, 0] == self.zero_key[0]) & (keys[:, 1] == self.zero_key[1])
        nzero = int(np.count_nonzero(zero))
        te.zero_pages += nzero
        contents.add_target(keys[~zero] if nzero else keys)
        pfns = np.concatenate(acc.frames) if acc.frames else np.zeros(0, dtype=np.uint64)
        acc.frames = []
        on_zero = np.isin(pfns, np.array(self._zero_pfns, dtype=np.uint64))
        te.zero_mapped_pages = int(np.count_nonzero(on_zero)) + acc.huge_zero
        frames.add_target(pfns[~on_zero])

    def _finish(self, result: EstimateResult, contents: KeyTally, frames: KeyTally,
                use_zero: bool, mps: int) -> None:
        ts = result.targets
        result.scanned_pages = sum(t.scanned_pages for t in ts)
        result.unreadable_pages = sum(t.unreadable_pages for t in ts)
        result.zero_pages = z = sum(t.zero_pages for t in ts)
        result.zero_mapped_pages = zm = sum(t.zero_mapped_pages for t in ts)
        c = contents.finish()
        result.distinct_nonzero = c.distinct
        result.duplicate_pages = c.duplicate_pages
        result.achievable_nonzero = c.saving
        result.zero_saving = zero_saving(z, zm, use_zero)
        result.achievable_capped = (c.saving - c.capped_excess(mps)
                                    + zero_saving(z, zm, use_zero, mps if mps > 0 else None))
        f = frames.finish()
        result.achieved = f.saving + zm
        for t, tcnt, fcnt in zip(ts, c.targets, f.targets):
            t.distinct_nonzero = tcnt.distinct
            t.duplicate_pages = tcnt.pages - tcnt.singles
            t.achievable_alone = (tcnt.pages - tcnt.distinct) + zero_saving(
                t.zero_pages, t.zero_mapped_pages, use_zero)
            t.achieved_alone = (fcnt.pages - fcnt.distinct) + t.zero_mapped_pages
            if len(ts) == 1:
                t.achievable_share, t.achieved_share = float(t.achievable_alone), float(t.achieved_alone)
            else:
                zshare = result.zero_saving * t.zero_pages / z if z else 0.0
                t.achievable_share = tcnt.share + zshare
                t.achieved_share = fcnt.share + t.zero_mapped_pages

    def _scan_target(self, t: Target, regions: List[Region], te: TargetEstimate,
                     acc: _TargetKeys) -> None:
        base = self.proc / str(t.pid)
        try:
            pm_fd = os.open(base / "pagemap", os.O_RDONLY)
        except FileNotFoundError:
            raise _Gone() from None
        try:
            mem_fd = os.open(base / "mem", os.O_RDONLY)
        except FileNotFoundError:
            os.close(pm_fd)
            raise _Gone() from None
        except BaseException:
            os.close(pm_fd)
            raise
        try:
            te.ksm_stat = self._ksm_stat(base)
            for r in regions:
                self._scan_region(t, pm_fd, mem_fd, r, te, acc)
            after = self._ksm_stat(base)
            if after:
                te.ksm_stat = after
        finally:
            os.close(pm_fd)
            os.close(mem_fd)

    @staticmethod
    def _ksm_stat(base: Path) -> Dict[str, object]:
        try:
            return parse_ksm_stat((base / "ksm_stat").read_text())
        except OSError:
            return {}

    def _scan_region(self, t: Target, pm_fd: int, mem_fd: int, r: Region, te: TargetEstimate,
                     acc: _TargetKeys) -> None:
        ps = self.ps
        vpn, end_vpn = r.start // ps, r.end // ps
        while vpn < end_vpn:
            want = min(self.window_pages, end_vpn - vpn)
            try:
                pm = os.pread(pm_fd, want * 8, vpn * 8)
            except OSError as e:
                if e.errno in (errno.ESRCH, errno.ENOENT):
                    raise _Gone() from None
                raise
            if not pm:
                # pagemap reads nothing once the mm is gone; an unmapped range reads as holes.
                raise _Gone()
            n = len(pm) // 8
            cls = pm[7::8].translate(_CLASS)
            if b"F" in cls and self._huge_zero is not None:
                cls = self._huge_zero_runs(cls, pm, acc)
            if b"S" in cls:
                shared = np.frombuffer(cls, dtype=np.uint8) == _C_SHARED[0]
                acc.frames.append(np.frombuffer(pm, dtype="<u8")[shared] & np.uint64(PFN_MASK))
            for m in _RUN_RE.finditer(cls):
                a, b = m.span()
                self._read_run(t, mem_fd, (vpn + a) * ps, b - a, te, acc)
            vpn += n

    def _huge_zero_runs(self, cls: bytes, pm: bytes, acc: _TargetKeys) -> bytes:
        """File-flagged pages that are the huge zero page count as zero-mapped; others skipped."""
        lo = self._huge_zero
        hi = lo + 512
        out = bytearray(cls)
        entries = memoryview(pm).cast("Q")
        for m in _FILE_RE.finditer(cls):
            for i in range(m.start(), m.end()):
                if lo <= entries[i] & PFN_MASK < hi:
                    out[i] = _C_EXCL[0]   # read (content is zero) but do not count its frame
                    acc.huge_zero += 1
        entries.release()
        return bytes(out)

    def _read_run(self, t: Target, mem_fd: int, addr: int, npages: int, te: TargetEstimate,
                  acc: _TargetKeys) -> None:
        ps = self.ps
        view, pages, zeros = self._view, self._pages, self._zeros
        per_buffer = len(pages)
        digests, join = acc.digests, b"".join
        left = npages * ps
        while left:
            want = min(self.buffer_bytes, left)
            if self.bucket is not None:
                self.bucket.consume(want)
            try:
                got = os.preadv(mem_fd, [view[:want]], addr)
            except OSError as e:
                if e.errno == errno.EIO:   # unmapped or unreadable since pagemap was read
                    te.unreadable_pages += 1
                    addr += ps
                    left -= ps
                    continue
                if e.errno in (errno.ESRCH, errno.ENOENT):
                    raise _Gone() from None
                raise
            if got <= 0:
                raise _Gone()
            k = got // ps
            if not k:
                te.unreadable_pages += 1
                addr += ps
                left -= ps
                continue
            got = k * ps
            if zeros.startswith(view[:got]):
                te.zero_pages += k
            else:
                digests += join(map(_hash, pages if k == per_buffer else pages[:k]))
            te.scanned_pages += k
            addr += got
            left -= got
            self._done += got
            if self.progress is not None:
                self._report(t.name)

    def _report(self, name: str, force: bool = False) -> None:
        if self.progress is None:
            return
        now = self.clock()
        if not force and now - self._last_report < self.progress_interval_s:
            return
        self._last_report = now
        self.progress(Progress(self._done, max(self._total, self._done), now - self._started, name))


def _why(e: OSError, doing: str) -> str:
    if isinstance(e, FileNotFoundError):
        return "exited before the scan"
    return "%s: %s" % (doing, e.strerror or e)


def _buffer_address(m: mmap.mmap) -> int:
    import ctypes
    obj = ctypes.c_char.from_buffer(m)
    try:
        return ctypes.addressof(obj)
    finally:
        del obj
