"""The scan engine: how much of the targets' mergeable memory KSM could share, and how
much of that it shares now.

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
  appended to a flat per-target buffer. Counting happens once, by a sort (count.py),
  not by a dict lookup per page. All-zero buffers are recognised with one memcmp
  (`bytes.startswith`) and never hashed.
- /proc/<pid>/mem, not process_vm_readv(2): the latter's read-only pin makes the kernel
  unshare every KSM page it reads, so the scan would undo the merging it measures.
- "Achieved" is measured on the same pages as "achievable": pagemap gives each present
  page's frame number (root only), so pages that already share a frame (a KSM page, or the
  kernel's zero page) are counted exactly, without trusting global counters that also
  include processes outside the targets. The kernel's counters are reported next to it.

The accounting rules are in result.py (EstimateResult.account). Estimator holds the settings; everything one
run() accumulates lives in a _ScanRun made by that run, so an Estimator can be reused.
"""
from __future__ import annotations

import errno
import mmap
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import xxhash

from ksmctl.collectors.procfs import ProcFs
from ksmctl.errors import ReadError
from ksmctl.estimate.caps import check_capabilities
from ksmctl.estimate.count import KeyTally
from ksmctl.estimate.discover import Region, Target, mergeable_regions
from ksmctl.estimate.pagemap import (C_EXCL, C_SHARED, FILE_RUN_RE, PFN_MASK, READ_RUN_RE, ZeroFrames,
                                     classify, probe_zero_frames)
from ksmctl.estimate.result import HASH_NAME, EstimateResult, Progress, Skipped, TargetEstimate
from ksmctl.estimate.schedule import TokenBucket
from ksmctl.kernel.sysfs import KsmSysfs

_hash = getattr(xxhash, HASH_NAME + "_digest")   # 16 bytes, appended to a flat buffer

BUFFER_BYTES = 256 * 1024     # per read: small enough to stay in L2 (1 MiB here) while it is hashed
WINDOW_PAGES = 4096           # pagemap entries read at once (16 MiB of address space)
# The kernel's counters shown next to the estimate ("host KSM now").
HOST_COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                 "ksm_zero_pages", "general_profit", "full_scans", "run")

ZeroProbe = Callable[[str, int], ZeroFrames]


class _Gone(Exception):
    """The target process exited (or exec'd) during the scan."""


class _TargetKeys:
    """What scanning one target accumulates: its pages' hashes (16 bytes each, appended in
    order) and the frame numbers of its pages that share a frame."""

    def __init__(self) -> None:
        self.digests = bytearray()
        self.frames: List[np.ndarray] = []
        self.huge_zero = 0   # pages mapping the huge zero page


@dataclass
class _ScanRun:
    """One run's buffer, zero-page frames, rate limiter and progress counters."""

    buffer: mmap.mmap
    view: memoryview
    pages: List[memoryview]     # one view per page of the buffer: slicing per page cost ~40%
    zeros: bytes
    zero_frames: ZeroFrames
    bucket: Optional[TokenBucket]
    total: int                  # mergeable Rss of all targets (progress estimate)
    started: float
    done: int = 0
    last_report: float = 0.0
    contents: KeyTally = field(default_factory=lambda: KeyTally(2))
    frames: KeyTally = field(default_factory=lambda: KeyTally(1))

    def close(self) -> None:
        for v in self.pages:
            v.release()
        self.view.release()
        try:
            self.buffer.close()
        except BufferError:   # a slice still referenced by an interrupted read: GC closes it
            pass


class Estimator:
    """Scans targets' mergeable memory and returns an EstimateResult. Needs root."""

    def __init__(self, proc_root: str = "/proc", page_size: int = os.sysconf("SC_PAGE_SIZE"),
                 rate_limit_bytes_per_s: Optional[float] = None,
                 progress: Optional[Callable[[Progress], None]] = None,
                 sys_root: str = "/sys", buffer_bytes: int = BUFFER_BYTES,
                 window_pages: int = WINDOW_PAGES, progress_interval_s: float = 0.25,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 zero_probe: ZeroProbe = probe_zero_frames) -> None:
        self.proc_root = proc_root
        self.procfs = ProcFs(proc_root)
        self.ksm = KsmSysfs(sys_root, page_size)
        self.ps = page_size
        self.buffer_bytes = max(page_size, buffer_bytes // page_size * page_size)
        self.window_pages = window_pages
        self.rate_limit = TokenBucket.check_rate(rate_limit_bytes_per_s) if rate_limit_bytes_per_s else None
        self.progress = progress
        self.progress_interval_s = progress_interval_s
        self.clock = clock
        self.sleep = sleep
        self.zero_probe = zero_probe
        self.zero_key = np.frombuffer(_hash(bytes(page_size)), dtype="<u8").copy()

    # -- host facts

    def _ksm_int(self, name: str, default: int) -> int:
        try:
            return self.ksm.read_int(name)
        except ReadError:
            return default

    def host_counters(self) -> Dict[str, int]:
        out = {}
        for name in HOST_COUNTERS:
            if self.ksm.has(name):
                try:
                    out[name] = self.ksm.read_int(name)
                except ReadError:
                    continue
        return out

    # -- scanning

    def _start(self, total: int) -> _ScanRun:
        # Page-aligned (an anonymous mmap, not a bytearray): the kernel's copy into a buffer
        # that starts 16 bytes into a page was measured up to 3x slower.
        buf = mmap.mmap(-1, self.buffer_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        view = memoryview(buf)
        bucket = TokenBucket(self.rate_limit, self.clock, self.sleep) if self.rate_limit else None
        return _ScanRun(buffer=buf, view=view,
                        pages=[view[i:i + self.ps] for i in range(0, self.buffer_bytes, self.ps)],
                        zeros=bytes(self.buffer_bytes), zero_frames=self.zero_probe(self.proc_root, self.ps),
                        bucket=bucket, total=total, started=self.clock())

    def run(self, targets: Sequence[Target]) -> EstimateResult:
        check_capabilities(self.proc_root)
        use_zero = bool(self._ksm_int("use_zero_pages", 0))
        mps = self._ksm_int("max_page_sharing", 256)
        result = EstimateResult(page_size=self.ps, use_zero_pages=use_zero, max_page_sharing=mps)
        plans: List[Tuple[Target, List[Region]]] = []
        for t in targets:
            try:
                plans.append((t, mergeable_regions(self.proc_root, t.pid)))
            except OSError as e:
                result.skipped.append(Skipped(t.pid, t.name, _why(e, "reading smaps")))
        run = self._start(sum(r.rss_bytes for _, rs in plans for r in rs))
        cpu0 = time.process_time()
        try:
            for t, regions in plans:
                te = TargetEstimate(t.pid, t.name, t.kind,
                                    mergeable_rss_bytes=sum(r.rss_bytes for r in regions))
                acc = _TargetKeys()
                try:
                    self._scan_target(run, t, regions, te, acc)
                except _Gone:
                    result.skipped.append(Skipped(t.pid, t.name, "exited during the scan"))
                    continue
                except PermissionError as e:
                    result.skipped.append(Skipped(t.pid, t.name, _why(e, "reading memory")))
                    continue
                except KeyboardInterrupt:
                    result.partial = True
                    self._commit(run, te, acc)
                    result.targets.append(te)
                    raise
                self._commit(run, te, acc)
                result.targets.append(te)
                self._report(run, t.name, force=True)
        except KeyboardInterrupt:
            result.partial = True
        finally:
            run.close()
        result.account(run.contents.finish(), run.frames.finish())
        result.bytes_read = run.done
        result.elapsed_s = self.clock() - run.started
        result.cpu_s = time.process_time() - cpu0
        result.host = self.host_counters()
        return result

    def _commit(self, run: _ScanRun, te: TargetEstimate, acc: _TargetKeys) -> None:
        """Hand one target's keys to the tallies, less zero pages (counted on their own)."""
        keys = np.frombuffer(acc.digests, dtype="<u8").reshape(-1, 2)
        acc.digests = bytearray()
        zero = (keys[:, 0] == self.zero_key[0]) & (keys[:, 1] == self.zero_key[1])
        nzero = int(np.count_nonzero(zero))
        te.zero_pages += nzero
        run.contents.add_target(keys[~zero] if nzero else keys)
        pfns = np.concatenate(acc.frames) if acc.frames else np.zeros(0, dtype=np.uint64)
        acc.frames = []
        on_zero = np.isin(pfns, np.array(run.zero_frames.pfns, dtype=np.uint64))
        te.zero_mapped_pages = int(np.count_nonzero(on_zero)) + acc.huge_zero
        run.frames.add_target(pfns[~on_zero])

    def _scan_target(self, run: _ScanRun, t: Target, regions: List[Region], te: TargetEstimate,
                     acc: _TargetKeys) -> None:
        base = os.path.join(self.proc_root, str(t.pid))
        try:
            pm_fd = os.open(os.path.join(base, "pagemap"), os.O_RDONLY)
        except FileNotFoundError:
            raise _Gone() from None
        try:
            mem_fd = os.open(os.path.join(base, "mem"), os.O_RDONLY)
        except FileNotFoundError:
            os.close(pm_fd)
            raise _Gone() from None
        except BaseException:
            os.close(pm_fd)
            raise
        try:
            te.ksm_stat = self.procfs.ksm_stat(t.pid)
            for r in regions:
                self._scan_region(run, t, pm_fd, mem_fd, r, te, acc)
            after = self.procfs.ksm_stat(t.pid)
            if after is not None:
                te.ksm_stat = after
        finally:
            os.close(pm_fd)
            os.close(mem_fd)

    def _scan_region(self, run: _ScanRun, t: Target, pm_fd: int, mem_fd: int, r: Region,
                     te: TargetEstimate, acc: _TargetKeys) -> None:
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
            cls = classify(pm)
            if b"F" in cls and run.zero_frames.huge_first is not None:
                cls = _huge_zero_runs(run.zero_frames, cls, pm, acc)
            if b"S" in cls:
                shared = np.frombuffer(cls, dtype=np.uint8) == C_SHARED[0]
                acc.frames.append(np.frombuffer(pm, dtype="<u8")[shared] & np.uint64(PFN_MASK))
            for m in READ_RUN_RE.finditer(cls):
                a, b = m.span()
                self._read_run(run, t, mem_fd, (vpn + a) * ps, b - a, te, acc)
            vpn += n

    def _read_run(self, run: _ScanRun, t: Target, mem_fd: int, addr: int, npages: int,
                  te: TargetEstimate, acc: _TargetKeys) -> None:
        ps = self.ps
        view, pages, zeros, bucket = run.view, run.pages, run.zeros, run.bucket
        per_buffer = len(pages)
        digests, join = acc.digests, b"".join
        left = npages * ps
        while left:
            want = min(self.buffer_bytes, left)
            if bucket is not None:
                bucket.consume(want)
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
            run.done += got
            if self.progress is not None:
                self._report(run, t.name)

    def _report(self, run: _ScanRun, name: str, force: bool = False) -> None:
        if self.progress is None:
            return
        now = self.clock()
        if not force and now - run.last_report < self.progress_interval_s:
            return
        run.last_report = now
        self.progress(Progress(run.done, max(run.total, run.done), now - run.started, name))


def _huge_zero_runs(zf: ZeroFrames, cls: bytes, pm: bytes, acc: _TargetKeys) -> bytes:
    """File-flagged pages that are the huge zero page count as zero-mapped; others skipped."""
    out = bytearray(cls)
    entries = memoryview(pm).cast("Q")
    for m in FILE_RUN_RE.finditer(cls):
        for i in range(m.start(), m.end()):
            if zf.is_huge_zero(entries[i] & PFN_MASK):
                out[i] = C_EXCL[0]   # read (content is zero) but do not count its frame
                acc.huge_zero += 1
    entries.release()
    return bytes(out)


def _why(e: OSError, doing: str) -> str:
    if isinstance(e, FileNotFoundError):
        return "exited before the scan"
    return "%s: %s" % (doing, e.strerror or e)
