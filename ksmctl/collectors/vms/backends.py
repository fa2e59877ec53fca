"""A guest's RAM as its QEMU command line declares it: memory backend objects, the
machine's memory-backend and mem-merge options, memory locking.

Why a guest's memory can or cannot merge is mostly written here: KSM merges only private
anonymous pages, so a hugetlbfs or file backend, or share=on (vhost-user, virtiofs),
takes the RAM out of its reach whatever madvise says; merge=off / mem-merge=off make
QEMU skip MADV_MERGEABLE. libvirt writes -object as JSON (7.x and later) or as
key=value lists; both are read. The backend ids are what QMP's qom-set addresses.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from .qemu import _opts, is_qemu_binary

_OFF = ("off", "no", "false", False)
_ON = ("on", "yes", "true", True)


@dataclass(frozen=True)
class Backend:
    id: str
    qom_type: str                 # memory-backend-ram | -file | -memfd | -epc ...
    share: bool = False
    merge: Optional[bool] = None  # None: QEMU's default (the machine's mem-merge)
    mem_path: Optional[str] = None
    hugetlb: bool = False         # memfd with hugetlb=on
    size: Optional[int] = None

    @property
    def on_hugetlbfs(self) -> bool:
        return self.hugetlb or bool(self.mem_path and "huge" in self.mem_path)


@dataclass(frozen=True)
class GuestRam:
    backends: Tuple[Backend, ...] = ()
    machine_backend: Optional[str] = None   # -machine memory-backend=ID
    mem_merge: Optional[bool] = None        # -machine mem-merge=on|off (None: default on)
    mem_path: Optional[str] = None          # legacy -mem-path (no backend object)
    mem_lock: bool = False                  # -overcommit mem-lock=on, -realtime mlock=on

    @property
    def ram_backends(self) -> Tuple[Backend, ...]:
        """The backends that hold guest RAM: the machine's own, and any other memory
        backend (NUMA nodes, DIMMs)."""
        return tuple(b for b in self.backends if b.qom_type.startswith("memory-backend"))

    @property
    def merge_off(self) -> Tuple[Backend, ...]:
        return tuple(b for b in self.ram_backends if b.merge is False)

    @property
    def hugetlb(self) -> Tuple[Backend, ...]:
        return tuple(b for b in self.ram_backends if b.on_hugetlbfs)

    @property
    def legacy_hugetlb(self) -> bool:
        return self.mem_path is not None and "huge" in self.mem_path

    @property
    def shared(self) -> Tuple[Backend, ...]:
        return tuple(b for b in self.ram_backends if b.share)

    @property
    def private_files(self) -> Tuple[Backend, ...]:
        return tuple(b for b in self.ram_backends
                     if b.qom_type == "memory-backend-file" and not b.on_hugetlbfs and not b.share)


class GuestRamCache:
    """Each running guest's GuestRam, parsed once per QEMU process (the command line of a
    running process does not change), for the daemon's per-tick view."""

    def __init__(self, cmdline: Callable[[int], Optional[Sequence[str]]]) -> None:
        self._cmdline = cmdline
        self._known: Dict[Tuple[str, int], Optional[GuestRam]] = {}

    def current(self, guests: Sequence[Tuple[str, int]]) -> Dict[Tuple[str, int], Optional[GuestRam]]:
        """(uuid, pid) -> GuestRam for these guests; forgets every other."""
        out = {}
        for key in guests:
            if key not in self._known:
                argv = self._cmdline(key[1])
                self._known[key] = parse_guest_ram(argv) if argv else None
            out[key] = self._known[key]
        self._known = dict(out)
        return out


def _flag(v: Any) -> Optional[bool]:
    if v in _ON:
        return True
    if v in _OFF:
        return False
    return None


def _size(v: Any) -> Optional[int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    return None


def _backend(val: str) -> Optional[Backend]:
    data: Dict[str, Any]
    if val.startswith("{"):
        try:
            obj = json.loads(val)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        data = obj
    else:
        data = dict(_opts(val, "qom-type"))
    qom = str(data.get("qom-type", ""))
    if not qom.startswith("memory-backend"):
        return None
    mem_path = data.get("mem-path")
    return Backend(id=str(data.get("id", "")), qom_type=qom, share=_flag(data.get("share")) is True,
                   merge=_flag(data.get("merge")), mem_path=str(mem_path) if mem_path else None,
                   hugetlb=_flag(data.get("hugetlb")) is True, size=_size(data.get("size")))


def parse_guest_ram(argv: Sequence[str]) -> Optional[GuestRam]:
    """None unless argv is a QEMU process."""
    if not argv or not is_qemu_binary(argv[0]):
        return None
    backends = []
    machine_backend = mem_path = None
    mem_merge: Optional[bool] = None
    mem_lock = False
    i = 1
    while i < len(argv):
        opt = argv[i][1:] if argv[i].startswith("--") else argv[i]
        val = argv[i + 1] if i + 1 < len(argv) else ""
        if opt == "-object":
            b = _backend(val)
            if b is not None:
                backends.append(b)
        elif opt in ("-machine", "-M"):
            o = _opts(val, "type")
            machine_backend = o.get("memory-backend", machine_backend)
            if "mem-merge" in o:
                mem_merge = _flag(o["mem-merge"])
        elif opt == "-mem-path":
            mem_path = val
        elif opt == "-overcommit":
            mem_lock = mem_lock or _flag(_opts(val, "mem-lock").get("mem-lock")) is True
        elif opt == "-realtime":
            mem_lock = mem_lock or _flag(_opts(val, "mlock").get("mlock")) is True
        else:
            i += 1
            continue
        i += 2
    return GuestRam(tuple(backends), machine_backend, mem_merge, mem_path, mem_lock)
