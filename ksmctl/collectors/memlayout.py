"""How memory is laid out, for `ksmctl doctor`: the host's transparent-huge-page and NUMA
settings, and one process's mappings (which are mergeable, huge, shared, locked).

Read on demand, not every tick: smaps walks the page tables of a whole guest. Every
reader takes the /sys or /proc root, so tests use fixture trees.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ksmctl.collectors.pidfiles import read_proc_to_eof

_SELECTED = re.compile(r"\[([^\]]+)\]")


def _read(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20).decode("utf-8", "replace")
    except OSError:
        return None


def selected(text: Optional[str]) -> Optional[str]:
    """'always [madvise] never' -> 'madvise'."""
    if text is None:
        return None
    m = _SELECTED.search(text)
    return m.group(1) if m else text.strip() or None


@dataclass(frozen=True)
class Thp:
    """/sys/kernel/mm/transparent_hugepage: None where the kernel has no such file."""

    enabled: Optional[str]
    defrag: Optional[str]
    khugepaged_defrag: Optional[str]
    khugepaged_pages_to_scan: Optional[int]
    path: str


def read_thp(sys_root: str = "/sys") -> Optional[Thp]:
    base = os.path.join(sys_root, "kernel/mm/transparent_hugepage")
    enabled = selected(_read(os.path.join(base, "enabled")))
    if enabled is None:
        return None
    kd = _read(os.path.join(base, "khugepaged/defrag"))
    pts = _read(os.path.join(base, "khugepaged/pages_to_scan"))
    return Thp(enabled=enabled, defrag=selected(_read(os.path.join(base, "defrag"))),
               khugepaged_defrag=kd.strip() if kd is not None else None,
               khugepaged_pages_to_scan=int(pts) if pts is not None and pts.strip().isdigit() else None,
               path=base)


def numa_nodes_with_memory(sys_root: str = "/sys") -> Optional[Tuple[int, ...]]:
    """Nodes that hold memory (has_memory, else online), or None without NUMA sysfs."""
    base = os.path.join(sys_root, "devices/system/node")
    for name in ("has_memory", "online"):
        text = _read(os.path.join(base, name))
        if text is not None:
            return parse_cpu_list(text)
    return None


def parse_cpu_list(text: str) -> Tuple[int, ...]:
    """The kernel's list format: '0-1,4' -> (0, 1, 4)."""
    out: List[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            continue
    return tuple(out)


@dataclass(frozen=True)
class Mapping:
    """One VMA of a process, from /proc/<pid>/smaps."""

    start: int
    end: int
    path: str
    rss: int                  # bytes
    anon_huge: int            # bytes of AnonHugePages
    locked: int               # bytes
    flags: Tuple[str, ...]    # VmFlags: mg mergeable, ht hugetlb, sh shared, lo locked, hg/nh THP advice
    ksm: Optional[int] = None  # bytes mapping a KSM page now (Linux 6.7+; None: no such line)
    swap: int = 0              # bytes swapped out
    anon: int = 0              # bytes of anonymous pages resident (what ksmd can scan)

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def mergeable(self) -> bool:
        return "mg" in self.flags

    @property
    def hugetlb(self) -> bool:
        return "ht" in self.flags

    @property
    def shared(self) -> bool:
        return "sh" in self.flags


_SMAPS_KEYS = {"Rss:": "rss", "AnonHugePages:": "anon_huge", "Locked:": "locked", "KSM:": "ksm",
               "Swap:": "swap", "Anonymous:": "anon"}


def parse_smaps(text: str) -> List[Mapping]:
    out: List[Mapping] = []
    cur: Optional[Dict[str, object]] = None
    for line in text.splitlines():
        head = line.split(None, 1)
        if not head:
            continue
        key = head[0]
        if not key.endswith(":"):
            lo, sep, hi = key.partition("-")
            if not sep:
                continue
            try:
                start, end = int(lo, 16), int(hi, 16)
            except ValueError:
                continue
            parts = line.split(None, 5)
            cur = {"start": start, "end": end, "path": parts[5].strip() if len(parts) > 5 else "",
                   "rss": 0, "anon_huge": 0, "locked": 0, "ksm": None, "swap": 0, "anon": 0}
        elif cur is not None and key in _SMAPS_KEYS:
            try:
                cur[_SMAPS_KEYS[key]] = int(head[1].split()[0]) * 1024
            except (IndexError, ValueError):
                pass
        elif cur is not None and key == "VmFlags:":
            out.append(Mapping(flags=tuple(head[1].split()) if len(head) > 1 else (), **cur))  # type: ignore[arg-type]
            cur = None
    return out


def read_smaps(proc_root: str, pid: int) -> Optional[List[Mapping]]:
    raw = read_proc_to_eof(os.path.join(proc_root, str(pid), "smaps"))
    return None if raw is None else parse_smaps(raw.decode("utf-8", "replace"))


def guest_ram(mappings: List[Mapping], memory: Optional[int]) -> List[Mapping]:
    """The mappings that hold a guest's RAM: those at least a quarter of its memory size
    (or, without a size, the largest). QEMU maps each RAM block as one VMA."""
    if not mappings:
        return []
    if memory:
        big = [m for m in mappings if m.size >= memory // 4]
        if big:
            return big
    return [max(mappings, key=lambda m: m.size)]
