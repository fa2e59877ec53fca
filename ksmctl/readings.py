"""The typed snapshot of the host that one tick works on.

Collectors produce these; the policy decides on them; the exporter and the state file
show them. Frozen dataclasses, so a decision can be replayed from a recorded trace.
Sizes are bytes, CPU times seconds.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple, Union

from ksmctl.errors import ErrorSource, StrEnum

# What a recorded reading may hold (the state file, a trace): no host has a page outside
# these sizes, and no clock wrote a wall time past 1e11 s (year ~5138; localtime() fails).
PAGE_SIZE_MIN, PAGE_SIZE_MAX = 512, 2 ** 30
MAX_WALL = 1e11

# The attributes of /sys/kernel/mm/ksm, their kinds and ranges: ksmctl/kernel/knobs.py.


@dataclass(frozen=True)
class KsmState:
    """What /sys/kernel/mm/ksm says. `values` holds the numeric attributes present;
    `unsupported` those this kernel lacks; `unreadable` those present but garbled."""

    values: Dict[str, int]
    advisor_mode: Optional[str] = None  # "none" or "scan-time"; None when unsupported
    advisor_modes: Tuple[str, ...] = ()
    unsupported: FrozenSet[str] = frozenset()
    unreadable: Dict[str, str] = field(default_factory=dict)  # attribute -> reason
    page_size: int = 4096

    def get(self, name: str, default: Optional[int] = None) -> Optional[int]:
        return self.values.get(name, default)

    def current(self, name: str) -> Optional[Union[int, str]]:
        """Any knob's value as read (advisor_mode's selected word), None when absent."""
        return self.advisor_mode if name == "advisor_mode" else self.values.get(name)

    @property
    def saved_pages(self) -> int:
        """Pages KSM saves now: every sharing page is a page not allocated, and zero
        pages mapped to the kernel's zero page (use_zero_pages) save one each."""
        return self.values.get("pages_sharing", 0) + self.values.get("ksm_zero_pages", 0)

    @property
    def saved_bytes(self) -> int:
        return self.saved_pages * self.page_size

    @property
    def running(self) -> bool:
        return self.values.get("run") == 1


@dataclass(frozen=True)
class MemInfo:
    """The /proc/meminfo fields the policies use, in bytes."""

    total: int
    available: int
    free: int
    buffers: int = 0
    cached: int = 0
    swap_total: int = 0
    swap_free: int = 0
    anon_pages: int = 0


@dataclass(frozen=True)
class Psi:
    """/proc/pressure/memory: percent of wall time stalled on memory."""

    some_avg10: float
    some_avg60: float
    full_avg10: float
    full_avg60: float


class VmState(StrEnum):
    """libvirt's domain states (virDomainState), by the names virsh shows; UNKNOWN for a
    number this libvirt does not define. /proc discovery sees only RUNNING guests."""

    NOSTATE = "nostate"
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"
    UNKNOWN = "unknown"

    @classmethod
    def parse(cls, name: object) -> "VmState":
        return cls.parse_or(name, cls.UNKNOWN)


class VmSource(StrEnum):
    """Where per-VM data came from: libvirt, or QEMU command lines found in /proc."""

    LIBVIRT = "libvirt"
    PROC = "proc"

    @classmethod
    def parse(cls, name: object) -> Optional["VmSource"]:
        """A recorded source (state file, trace); None when it is none of these."""
        try:
            return cls(name)
        except ValueError:
            return None


@dataclass(frozen=True)
class KsmStat:
    """/proc/<pid>/ksm_stat of one process (fields absent on older kernels are None)."""

    rmap_items: Optional[int] = None
    zero_pages: Optional[int] = None
    merging_pages: Optional[int] = None
    process_profit: Optional[int] = None
    merge_any: Optional[bool] = None
    mergeable: Optional[bool] = None

    def kernel_fields(self) -> Dict[str, object]:
        """The fields present, under the kernel's own names (ksm_rmap_items, ...), as
        `ksmctl estimate --json` shows them."""
        return {"ksm_" + name: value for name, value in vars(self).items() if value is not None}


@dataclass(frozen=True)
class VmReading:
    """One running guest, tied to its QEMU process. Identity is the UUID; name is a label."""

    uuid: str
    name: str
    state: VmState = VmState.RUNNING
    pid: Optional[int] = None
    source: VmSource = VmSource.LIBVIRT
    balloon_current: Optional[int] = None  # bytes
    balloon_maximum: Optional[int] = None
    rss: Optional[int] = None
    anon_rss: Optional[int] = None          # of rss, the private anonymous pages: all KSM can merge
    guest_available: Optional[int] = None
    guest_usable: Optional[int] = None
    guest_unused: Optional[int] = None
    guest_swap_in: Optional[int] = None     # bytes swapped in/out inside the guest (balloon stats)
    guest_swap_out: Optional[int] = None
    guest_major_faults: Optional[int] = None
    ksm: Optional[KsmStat] = None
    excluded: bool = False  # opted out of merging (nosharepages / mem-merge=off)


@dataclass(frozen=True)
class EstimateSummary:
    """The last periodic dedup-potential estimate (ksmctl/estimate.py), in bytes."""

    achievable: int
    achieved: int
    scanned: int
    finished_wall: float
    duration_seconds: float

    @property
    def remaining(self) -> int:
        return max(0, self.achievable - self.achieved)

    @property
    def efficiency(self) -> Optional[float]:
        return self.achieved / self.achievable if self.achievable > 0 else None


@dataclass(frozen=True)
class Coverage:
    """Has ksmd looked at the memory that grew? Read at a pass boundary when the policy asks
    (collectors/coverage.py), for the processes whose anonymous memory grew since the tick
    before the boundary before: the Anonymous pages of their mergeable mappings (smaps)
    against the rmap items ksmd holds for them (ksm_stat). The kernel does not say where its
    cursor is; this says whether the pass that ended went past the new memory."""

    processes: int        # processes read (smaps and ksm_stat)
    mergeable_pages: int  # Anonymous pages in their mergeable mappings
    rmap_items: int       # their ksm_rmap_items
    unseen_pages: int     # per process max(0, mergeable - rmap items), plus smaller growth not read
    unreadable: int = 0   # grown processes whose smaps could not be read (ptrace access)


@dataclass(frozen=True)
class Readings:
    """One tick's view of the host. Optional parts are None when their source failed
    this tick (the error is in `errors`); the policy treats a missing signal as unknown."""

    monotonic: float
    wall: float
    ksm: KsmState
    meminfo: Optional[MemInfo] = None
    psi: Optional[Psi] = None
    ksmd_cpu_seconds: Optional[float] = None
    vms: Optional[Tuple[VmReading, ...]] = None
    mergeable_rss: Optional[int] = None  # bytes: anonymous RSS of processes with mergeable memory
    estimate: Optional[EstimateSummary] = None  # the last periodic estimate, if enabled
    errors: Tuple[Tuple[ErrorSource, str], ...] = ()  # (source, message)
    vm_source: Optional[VmSource] = None  # where `vms` came from (None: no VM collector)
    coverage: Optional[Coverage] = None  # at a pass boundary, when the policy asked for it

    @property
    def merge_potential(self) -> Optional[int]:
        """Bytes KSM could still save (achievable minus achieved), from the estimator."""
        return self.estimate.remaining if self.estimate is not None else None

    def to_dict(self, vm_table: bool = False) -> Dict[str, Any]:
        """Plain data for the state file and traces. Written out by hand: dataclasses.asdict
        deep-copies every field, and cost most of a tick with 500 VMs. vm_table: the VMs as
        rows under one list of field names (the state file's form, see vms_table)."""
        k = self.ksm
        return {
            "monotonic": self.monotonic, "wall": self.wall,
            "ksm": {"values": dict(k.values), "advisor_mode": k.advisor_mode, "advisor_modes": list(k.advisor_modes),
                    "unsupported": sorted(k.unsupported), "unreadable": dict(k.unreadable), "page_size": k.page_size},
            "meminfo": dict(vars(self.meminfo)) if self.meminfo is not None else None,
            "psi": dict(vars(self.psi)) if self.psi is not None else None,
            "ksmd_cpu_seconds": self.ksmd_cpu_seconds,
            "vms": None if self.vms is None else (
                vms_table(self.vms) if vm_table else [_vm_dict(v) for v in self.vms]),
            "mergeable_rss": self.mergeable_rss,
            "estimate": dict(vars(self.estimate)) if self.estimate is not None else None,
            "errors": [list(e) for e in self.errors],
            "vm_source": self.vm_source,
            "coverage": dict(vars(self.coverage)) if self.coverage is not None else None,
        }


VM_FIELDS = tuple(f for f in VmReading.__dataclass_fields__ if f != "ksm")
KSM_FIELDS = tuple(KsmStat.__dataclass_fields__)
_vm_values = operator.attrgetter(*VM_FIELDS)
_ksm_values = operator.attrgetter(*KSM_FIELDS)


def vms_table(vms: Sequence[VmReading]) -> Dict[str, Any]:
    """VMs as {"fields", "ksm_fields", "rows"}: a row per VM instead of a dict repeats no
    key, so the state file at 500 VMs is 2.5x smaller and 3x faster to encode."""
    return {"fields": list(VM_FIELDS) + ["ksm"], "ksm_fields": list(KSM_FIELDS),
            "rows": [vm_row(v) for v in vms]}


def vm_row(v: VmReading) -> List[Any]:
    """One VM's row of vms_table: its VM_FIELDS, then its ksm cell."""
    return [*vm_head(v), ksm_cell(v.ksm)]


def vm_head(v: VmReading) -> Tuple[Any, ...]:
    """The cells of vm_row before the ksm cell."""
    return _vm_values(v)  # type: ignore[no-any-return]


def ksm_cell(k: Optional[KsmStat]) -> Optional[List[Any]]:
    """The last cell of vm_row: KSM_FIELDS' values, or None."""
    return list(_ksm_values(k)) if k is not None else None


def vm_dicts(value: Any) -> Optional[List[Dict[str, Any]]]:
    """VM dicts from either form a state file or trace holds (vms_table's, or a list of
    dicts); None when it is neither."""
    if isinstance(value, list):
        return [v for v in value if isinstance(v, dict)]
    if not isinstance(value, dict):
        return None
    fields, kfields, rows = value.get("fields"), value.get("ksm_fields"), value.get("rows")
    if not (isinstance(fields, list) and isinstance(kfields, list) and isinstance(rows, list)):
        return None
    out = []
    for row in rows:
        if not isinstance(row, list) or len(row) != len(fields):
            continue
        d = dict(zip(fields, row))
        ksm = d.get("ksm")
        d["ksm"] = dict(zip(kfields, ksm)) if isinstance(ksm, list) else None
        out.append(d)
    return out


def vm_from_dict(d: Dict[str, Any]) -> VmReading:
    """A VmReading from one of vm_dicts' dicts (a state file's or a trace's); unknown keys
    are ignored, an unknown state is UNKNOWN, a missing name is the UUID."""
    fields = VmReading.__dataclass_fields__
    kw = {k: v for k, v in d.items() if k in fields and k not in ("ksm", "state", "source")}
    ksm = d.get("ksm")
    if isinstance(ksm, dict):
        kw["ksm"] = KsmStat(**{k: v for k, v in ksm.items() if k in KSM_FIELDS})
    if "state" in d:
        kw["state"] = VmState.parse(d["state"])
    if "source" in d:
        kw["source"] = VmSource.parse(d["source"]) or VmSource.LIBVIRT
    kw.setdefault("uuid", "")
    kw.setdefault("name", kw["uuid"])
    return VmReading(**kw)


def _vm_dict(vm: VmReading) -> Dict[str, Any]:
    d = dict(vars(vm))
    d["ksm"] = dict(vars(vm.ksm)) if vm.ksm is not None else None
    return d


def _committed(vm: VmReading) -> int:
    return vm.balloon_current if vm.balloon_current is not None else (vm.rss or 0)


def vm_signals(vms: Optional[Sequence[VmReading]], meminfo: Optional[MemInfo]) -> Dict[str, Any]:
    """Signals for policies. None values mean unknown (no VM data, or no guest reports).

    committed_current_bytes: balloon current per guest (RSS where there is no balloon).
    committed_maximum_bytes: balloon maximum per guest (else current, else RSS): what the
      guests may grow to. The ratios divide these by MemTotal.
    running_vms: active guests (running or paused: both hold their memory).
    guest_free_bytes: what guests report free (usable, else unused) over the guests that
      report it; guest_free_vms says how many did.
    """
    if vms is None:
        return {"running_vms": None, "excluded_vms": None, "committed_current_bytes": None,
                "committed_maximum_bytes": None, "committed_current_ratio": None,
                "committed_maximum_ratio": None, "guest_free_bytes": None, "guest_free_vms": 0}
    current = sum(_committed(vm) for vm in vms)
    maximum = sum(vm.balloon_maximum if vm.balloon_maximum is not None else _committed(vm) for vm in vms)
    free = 0
    reporting = 0
    for vm in vms:
        value = vm.guest_usable if vm.guest_usable is not None else vm.guest_unused
        if value is not None:
            free += value
            reporting += 1
    total = meminfo.total if meminfo is not None and meminfo.total > 0 else None
    return {
        "running_vms": len(vms),
        "excluded_vms": sum(1 for vm in vms if vm.excluded),
        "committed_current_bytes": current,
        "committed_maximum_bytes": maximum,
        "committed_current_ratio": current / total if total else None,
        "committed_maximum_ratio": maximum / total if total else None,
        "guest_free_bytes": free if reporting else None,
        "guest_free_vms": reporting,
    }
