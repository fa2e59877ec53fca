"""The one reader of /proc: meminfo, memory PSI, ksmd's CPU time, and every per-process
file ksmctl looks at (the process list, cmdline, comm, stat, statm, ksm_stat, smaps).
The VM collectors, the coexistence check and the estimator all read processes here."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Container, Dict, Iterator, NamedTuple, Optional, Tuple, Union

from ksmctl.collectors.pidfiles import (FileBudget, KeptFiles, default_kept_files, is_procfs, read_proc_bytes,
                                        read_proc_identified, read_proc_to_eof)
from ksmctl.errors import ReadError
from ksmctl.readings import KsmStat, MemInfo, Psi

_MEMINFO_FIELDS = {
    "MemTotal": "total", "MemAvailable": "available", "MemFree": "free",
    "Buffers": "buffers", "Cached": "cached", "SwapTotal": "swap_total",
    "SwapFree": "swap_free", "AnonPages": "anon_pages",
}
_REQUIRED_MEMINFO = ("MemTotal", "MemFree")


def parse_meminfo(text: str, where: str = "/proc/meminfo") -> MemInfo:
    found: Dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key not in _MEMINFO_FIELDS:
            continue
        parts = rest.split()
        try:
            value = int(parts[0])
        except (IndexError, ValueError):
            raise ReadError("%s: %s: expected '<number> kB', found %r" % (where, key, rest.strip()[:40])) from None
        unit = parts[1] if len(parts) > 1 else ""
        found[_MEMINFO_FIELDS[key]] = value * 1024 if unit == "kB" else value
    for key in _REQUIRED_MEMINFO:
        if _MEMINFO_FIELDS[key] not in found:
            raise ReadError("%s: %s is missing" % (where, key))
    if "available" not in found:  # kernels before 3.14: approximate as ksmtuned does
        found["available"] = found["free"] + found.get("buffers", 0) + found.get("cached", 0)
    return MemInfo(**found)


def parse_psi(text: str, where: str = "/proc/pressure/memory") -> Psi:
    vals: Dict[str, float] = {}
    for line in text.splitlines():
        words = line.split()
        if not words or words[0] not in ("some", "full"):
            continue
        for word in words[1:]:
            k, _, v = word.partition("=")
            if k in ("avg10", "avg60"):
                try:
                    vals["%s_%s" % (words[0], k)] = float(v)
                except ValueError:
                    raise ReadError("%s: %s %s: expected a number, found %r" % (where, words[0], k, v)) from None
    if "some_avg10" not in vals or "some_avg60" not in vals:
        raise ReadError("%s: no 'some avg10=.. avg60=..' line" % where)
    # 'full' is absent for memory on very old PSI kernels: treat as no full stall seen.
    return Psi(some_avg10=vals["some_avg10"], some_avg60=vals["some_avg60"],
               full_avg10=vals.get("full_avg10", 0.0), full_avg60=vals.get("full_avg60", 0.0))


_KSM_STAT_NAMES = {"ksm_rmap_items": "rmap_items", "ksm_zero_pages": "zero_pages",
                   "ksm_merging_pages": "merging_pages", "ksm_process_profit": "process_profit",
                   "ksm_merge_any": "merge_any", "ksm_mergeable": "mergeable"}
_KSM_STAT_FLAGS = ("merge_any", "mergeable")


def parse_ksm_stat(text: str) -> KsmStat:
    """Both line formats, 'ksm_rmap_items 12' (numbers) and 'ksm_mergeable: yes' (flags),
    in one pass with no intermediate dict: it runs for every guest every tick. A value of
    the wrong kind makes the field unknown; an unparsable one or a future field is skipped,
    not fatal. tests/test_collectors.py holds it to a plain reference parser."""
    kw: Dict[str, Union[int, bool]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        key, value = parts
        name = _KSM_STAT_NAMES.get(key.rstrip(":"))
        if name is None:
            continue
        if value == "yes" or value == "no":
            if name in _KSM_STAT_FLAGS:
                kw[name] = value == "yes"
            else:
                kw.pop(name, None)   # a flag where a number belongs: the field is unknown
            continue
        try:
            number = int(value)
        except ValueError:
            continue
        if name in _KSM_STAT_FLAGS:
            kw.pop(name, None)
        else:
            kw[name] = number
    return KsmStat(**kw)  # type: ignore[arg-type]


def parse_ksm_stat_fields(text: str) -> Dict[str, object]:
    """Deprecated: parse_ksm_stat(text).kernel_fields(). Kept only until the estimator
    stops importing it; it no longer reports fields ksmctl does not know."""
    return parse_ksm_stat(text).kernel_fields()


def split_cmdline(raw: bytes) -> Tuple[str, ...]:
    """/proc/<pid>/cmdline's NUL-separated arguments (empty for kernel threads)."""
    return tuple(a.decode("utf-8", "replace") for a in raw.split(b"\0") if a)


_MERGEABLE_MARKS = (b"ksm_mergeable: yes", b"ksm_merge_any: yes")


def is_mergeable(ksm_stat: bytes) -> bool:
    """From raw ksm_stat: 'ksm_mergeable: yes' (kernels from 2025 on) or prctl merge-any; on kernels
    without those fields, any rmap item means ksmd has seen mergeable memory."""
    if any(m in ksm_stat for m in _MERGEABLE_MARKS):
        return True
    if b"ksm_mergeable" in ksm_stat or b"ksm_merge_any" in ksm_stat:
        return False
    for line in ksm_stat.splitlines():
        if line.startswith(b"ksm_rmap_items"):
            return line.split()[-1] not in (b"0", b"0:")
    return False


class Process(NamedTuple):
    """A user-space process as `ps` would show it (kernel threads have no command line)."""

    pid: int
    argv: Tuple[str, ...]
    comm: str


class Statm(NamedTuple):
    """A process's resident memory, in bytes. KSM merges only private anonymous pages, so
    `anon` (resident less file and shmem pages: RssAnon) is what it can reach; `resident`
    also counts a guest's shared-memfd RAM (vhost-user, virtiofs) and QEMU's own files."""

    resident: int
    anon: int


class ProcFs:
    """The one reader of /proc; `proc_root` lets tests point it at a fixture tree.

    Per-process reads return None when the process is gone (or hides the file from us):
    processes exit between the listing and the read all the time, that is no error."""

    def __init__(self, proc_root: str = "/proc", kept_files: Optional[int] = None,
                 link_check: Optional[bool] = None) -> None:
        """link_check: whether kept files check their link count (KeptFiles); None: only
        where the root is not this namespace's procfs. False suits only a tree whose
        processes never go away (bench/tick_bench.py), to cost what the real /proc does."""
        self.root = Path(proc_root)
        self._root = str(self.root)  # per-process paths are formatted, not joined: hot path
        self._budget = FileBudget(default_kept_files() if kept_files is None else kept_files)
        self._link_check = link_check
        self._ksmd_pid: Optional[int] = None
        self.clock_ticks = os.sysconf("SC_CLK_TCK")
        self.page_size = os.sysconf("SC_PAGE_SIZE")

    def _read(self, rel: str) -> str:
        path = self.root / rel
        try:
            return path.read_text()
        except OSError as e:
            raise ReadError("cannot read %s: %s" % (path, e.strerror or e)) from None

    def _pid_bytes(self, pid: int, name: str) -> Optional[bytes]:
        return read_proc_bytes("%s/%d/%s" % (self._root, pid, name))

    def meminfo(self) -> MemInfo:
        return parse_meminfo(self._read("meminfo"), str(self.root / "meminfo"))

    def has_psi(self) -> bool:
        return (self.root / "pressure/memory").exists()

    def psi(self) -> Optional[Psi]:
        """None when the kernel has no PSI (CONFIG_PSI off or psi=0): not an error."""
        if not self.has_psi():
            return None
        return parse_psi(self._read("pressure/memory"), str(self.root / "pressure/memory"))

    # ---- processes -------------------------------------------------------------------
    def pids(self) -> Iterator[int]:
        """Every pid, ascending (a stable order for reports)."""
        try:
            names = os.listdir(self._root)
        except OSError as e:
            raise ReadError("cannot list %s: %s" % (self.root, e.strerror or e)) from None
        yield from sorted(int(name) for name in names if name.isdigit())

    def processes(self) -> Iterator[Process]:
        """User-space processes with their command line and comm; kernel threads,
        zombies and processes that exit meanwhile are left out."""
        for pid in self.pids():
            argv = self.cmdline(pid)
            comm = self.comm(pid) if argv else None
            if argv and comm is not None:
                yield Process(pid, argv, comm)

    def comm(self, pid: int) -> Optional[str]:
        raw = self._pid_bytes(pid, "comm")
        return None if raw is None else raw.decode("utf-8", "replace").strip()

    def cmdline_bytes(self, pid: int) -> Optional[bytes]:
        """The raw command line: comparing bytes is how a verified process is re-checked."""
        return self._pid_bytes(pid, "cmdline")

    def cmdline(self, pid: int) -> Optional[Tuple[str, ...]]:
        raw = self.cmdline_bytes(pid)
        return None if raw is None else split_cmdline(raw)

    def ksmd_pid(self) -> Optional[int]:
        """The ksmd kernel thread (kthread: comm 'ksmd', empty cmdline). Cached, re-checked."""
        if self._ksmd_pid is not None and self.comm(self._ksmd_pid) == "ksmd":
            return self._ksmd_pid
        self._ksmd_pid = None
        for pid in self.pids():
            if self.comm(pid) == "ksmd":
                self._ksmd_pid = pid
                break
        return self._ksmd_pid

    def cpu_seconds(self, pid: int) -> float:
        """utime+stime of a process from /proc/<pid>/stat (comm may hold spaces)."""
        text = self._read("%d/stat" % pid)
        try:
            fields = text[text.rindex(")") + 2:].split()
            return (int(fields[11]) + int(fields[12])) / self.clock_ticks
        except (ValueError, IndexError):
            raise ReadError("%s: unexpected format" % (self.root / str(pid) / "stat")) from None

    def ksmd_cpu_seconds(self) -> Optional[float]:
        pid = self.ksmd_pid()
        if pid is None:
            return None
        return self.cpu_seconds(pid)

    def ksm_stat_bytes(self, pid: int) -> Optional[bytes]:
        return self._pid_bytes(pid, "ksm_stat")

    def ksm_stat_identified(self, pid: int) -> Optional[Tuple[bytes, Tuple[int, int]]]:
        """ksm_stat's bytes and the file's identity: see read_proc_identified."""
        return read_proc_identified("%s/%d/ksm_stat" % (self._root, pid))

    def ksm_stat(self, pid: int) -> Optional[KsmStat]:
        """None when the process is gone or the kernel has no ksm_stat (before 6.1)."""
        raw = self.ksm_stat_bytes(pid)
        return None if raw is None else parse_ksm_stat(raw.decode("ascii", "replace"))

    def kept_files(self) -> KeptFiles:
        """A new set of kept-open per-process files, for one collector (it releases the
        pids it stops tracking); all of a ProcFs's share one budget."""
        if self._link_check is None:
            self._link_check = not is_procfs(self._root)
        return KeptFiles(self._root, self._budget, check_links=self._link_check)

    def statm_bytes(self, pid: int) -> Optional[Statm]:
        """/proc/<pid>/statm in bytes; None when gone or garbled."""
        return self.statm(self._pid_bytes(pid, "statm"))

    def statm(self, raw: Optional[bytes]) -> Optional[Statm]:
        """statm's text (fields in pages: size resident shared ...); None when garbled."""
        if raw is None:
            return None
        try:
            f = raw.split()
            resident, shared = int(f[1]) * self.page_size, int(f[2]) * self.page_size
        except (ValueError, IndexError):
            return None
        return Statm(resident, max(0, resident - shared))

    def smaps(self, pid: int) -> Optional[str]:
        """/proc/<pid>/smaps (walks the page tables: costly, read it only when needed)."""
        raw = read_proc_to_eof("%s/%d/smaps" % (self._root, pid))
        return None if raw is None else raw.decode("utf-8", "replace")

    def mergeable_rss(self, skip: Container[int] = ()) -> int:
        """Anonymous RSS (Statm.anon) of every process that has mergeable memory (ksm_stat
        says mergeable), except the `skip` pids (guests whose figures the VM collector read).

        Growth of this sum is how the policy notices new mergeable memory (a guest
        started) without waiting for ksmd to scan it. Kernel threads have no ksm_stat."""
        return sum(self.mergeable_anon(skip).values())

    def mergeable_anon(self, skip: Container[int] = ()) -> Dict[int, int]:
        """mergeable_rss by pid (collectors/coverage.py asks which processes grew)."""
        out: Dict[int, int] = {}
        for pid in self.pids():
            if pid in skip:
                continue
            raw = self.ksm_stat_bytes(pid)
            if raw and is_mergeable(raw):
                m = self.statm_bytes(pid)
                out[pid] = m.anon if m is not None else 0
        return out
