"""The typed snapshot of the host that one tick works on.

Collectors produce these; the policy decides on them; the exporter and the state file
show them. Frozen dataclasses, so a decision can be replayed from a recorded trace.
Sizes are bytes, CPU times seconds.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, FrozenSet, Optional, Tuple

# Every attribute of /sys/kernel/mm/ksm that ksmctl knows, in kernel documentation order.
# Older kernels lack some; those are reported as "not supported by this kernel".
KSM_COUNTERS = (
    "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
    "pages_scanned", "pages_skipped", "full_scans", "general_profit", "ksm_zero_pages",
    "stable_node_chains", "stable_node_dups",
)
KSM_TUNABLES = (
    "run", "pages_to_scan", "sleep_millisecs", "use_zero_pages", "merge_across_nodes",
    "max_page_sharing", "stable_node_chains_prune_millisecs", "smart_scan",
    "advisor_target_scan_time", "advisor_max_cpu", "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan",
)
KSM_ATTRIBUTES = KSM_TUNABLES + ("advisor_mode",) + KSM_COUNTERS


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


@dataclass(frozen=True)
class KsmStat:
    """/proc/<pid>/ksm_stat of one process (fields absent on older kernels are None)."""

    rmap_items: Optional[int] = None
    zero_pages: Optional[int] = None
    merging_pages: Optional[int] = None
    process_profit: Optional[int] = None
    merge_any: Optional[bool] = None
    mergeable: Optional[bool] = None


@dataclass(frozen=True)
class VmReading:
    """One running guest, tied to its QEMU process. Identity is the UUID; name is a label."""

    uuid: str
    name: str
    state: str = "running"
    pid: Optional[int] = None
    source: str = "libvirt"  # "libvirt" or "proc"
    balloon_current: Optional[int] = None  # bytes
    balloon_maximum: Optional[int] = None
    rss: Optional[int] = None
    guest_available: Optional[int] = None
    guest_usable: Optional[int] = None
    guest_unused: Optional[int] = None
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
    mergeable_rss: Optional[int] = None  # bytes: RSS of processes with mergeable memory
    estimate: Optional[EstimateSummary] = None  # the last periodic estimate, if enabled
    errors: Tuple[Tuple[str, str], ...] = ()  # (source, message)

    @property
    def committed_guest_bytes(self) -> Optional[int]:
        """Memory committed to guests: balloon current where libvirt gives it, else RSS."""
        if self.vms is None:
            return None
        total = 0
        for vm in self.vms:
            total += vm.balloon_current if vm.balloon_current is not None else (vm.rss or 0)
        return total

    @property
    def merge_potential(self) -> Optional[int]:
        """Bytes KSM could still save (achievable minus achieved), from the estimator."""
        return self.estimate.remaining if self.estimate is not None else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ksm"]["unsupported"] = sorted(self.ksm.unsupported)
        d["ksm"]["advisor_modes"] = list(self.ksm.advisor_modes)
        return d
