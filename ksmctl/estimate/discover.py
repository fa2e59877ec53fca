"""Which processes to scan, and which of their memory: the mergeable VMAs from smaps.

Names come from the shared /proc layer (ProcFs) and QEMU command-line parser, so a guest
is called here what the VM collector and `ksmctl vms` call it.
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from ksmctl.collectors.memlayout import parse_smaps
from ksmctl.collectors.procfs import ProcFs
from ksmctl.collectors.vms.qemu import parse_qemu_cmdline
from ksmctl.errors import UsageError


class TargetKind(str, enum.Enum):
    """A str enum: the JSON and the table show the value ("vm", "process")."""

    VM = "vm"
    PROCESS = "process"


@dataclass(frozen=True)
class Target:
    """A process to scan; for a QEMU guest (kind VM) the name is the guest's."""

    pid: int
    name: str
    kind: TargetKind = TargetKind.PROCESS


@dataclass(frozen=True)
class Region:
    start: int
    end: int
    rss_bytes: int


def parse_smaps_mergeable(text: str) -> List[Region]:
    """VMAs whose VmFlags contain `mg` (MADV_MERGEABLE or prctl merge-any), with their Rss."""
    return [Region(m.start, m.end, m.rss) for m in parse_smaps(text) if m.mergeable]


def mergeable_regions(proc_root: str, pid: int) -> List[Region]:
    """The mergeable VMAs of a process. OSError when it is gone (or a kernel thread)."""
    return parse_smaps_mergeable((Path(proc_root) / str(pid) / "smaps").read_text())


def _guest_name(procfs: ProcFs, pid: int) -> Optional[str]:
    argv = procfs.cmdline(pid)
    qemu = parse_qemu_cmdline(argv) if argv else None
    return qemu.name if qemu else None


def find_qemu_guests(proc_root: str = "/proc") -> Dict[str, int]:
    """Running QEMU guests by name -> pid (the lowest pid for a name seen twice)."""
    procfs = ProcFs(proc_root)
    guests: Dict[str, int] = {}
    for pid in sorted(procfs.pids()):
        name = _guest_name(procfs, pid)
        if name is not None:
            guests.setdefault(name, pid)
    return guests


def describe_pid(pid: int, proc_root: str = "/proc") -> Target:
    """A Target for a pid, named after its guest if it is QEMU, else `comm[pid]`."""
    procfs = ProcFs(proc_root)
    name = _guest_name(procfs, pid)
    if name is not None:
        return Target(pid, name, TargetKind.VM)
    return Target(pid, "%s[%d]" % (procfs.comm(pid) or "?", pid), TargetKind.PROCESS)


def discover_mergeable(proc_root: str = "/proc", exclude: Iterable[int] = ()) -> List[Target]:
    """Every process with at least one mergeable VMA.

    ksm_stat's `ksm_mergeable` (kernels from 2025 on) is a cheap pre-filter; smaps, which walks page
    tables, is only read for processes that pass it (or on kernels without the field).
    """
    procfs = ProcFs(proc_root)
    skip = set(exclude)
    found: List[Target] = []
    for pid in sorted(procfs.pids()):
        if pid in skip:
            continue
        stat = procfs.ksm_stat(pid)
        if stat is not None and stat.mergeable is False:
            continue
        try:
            regions = mergeable_regions(proc_root, pid)
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
        targets.extend(Target(guests[v], v, TargetKind.VM) for v in vms)
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
