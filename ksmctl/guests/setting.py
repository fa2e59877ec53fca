"""A guest's merge setting as data: where it comes from (MergeSource), what one tick found
(GuestMerge, MergeReport), what the guest was started with, and the unmerge guard.

Denying a merging guest unmerges its pages, which allocates up to its ksm_merging_pages
(less what it only shared with itself, which ksm_stat cannot tell): refused or deferred
unless MemAvailable absorbs that plus the margin `ksmctl unmerge` keeps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from ksmctl.collectors.vms.backends import GuestRam
from ksmctl.errors import ErrorSource, StrEnum
from ksmctl.kernel.writer import unmerge_margin
from ksmctl.policy.vms import GuestIdentity, MergeMode
from ksmctl.readings import MemInfo
from ksmctl.units import format_bytes


class MergeSource(StrEnum):
    """Where a guest's merge setting comes from (the `source` label of ksmctl_vm_merge)."""

    DOMAIN_XML = "domain_xml"      # <memoryBacking><nosharepages/>
    QEMU_CMDLINE = "qemu_cmdline"  # -machine mem-merge=, -object memory-backend-*,merge=, or QEMU's default
    RUNTIME = "runtime"            # `ksmctl merge on|off`
    POLICY = "policy"              # a vms rule or the vms default
    ISOLATION = "isolation"        # trust-domain isolation (isolation: per_domain)


MANAGED = (MergeSource.RUNTIME, MergeSource.POLICY, MergeSource.ISOLATION)


@dataclass(frozen=True)
class GuestMerge:
    """One guest's merge control this tick."""

    uuid: str
    name: str
    pid: Optional[int]
    setting: MergeMode
    source: MergeSource
    why: str = ""                       # the rule, the command, the XML element
    backends: Tuple[str, ...] = ()      # RAM backend ids (QEMU command line; confirmed by qom-list when managed)
    controllable: bool = False
    not_controllable: str = ""          # why not
    merging_pages: Optional[int] = None
    cost_bytes: int = 0                 # what denying it unmerges now (deny, still merging)
    pending: str = ""                   # why the setting is not in effect yet (guard, QMP error)
    violation: str = ""                 # why it breaks its deny (audit)

    def to_dict(self) -> Dict[str, Any]:
        return {"uuid": self.uuid, "name": self.name, "pid": self.pid, "merge": self.setting.value,
                "source": str(self.source), "why": self.why, "backends": list(self.backends),
                "controllable": self.controllable, "not_controllable": self.not_controllable,
                "merging_pages": self.merging_pages, "cost_bytes": self.cost_bytes, "pending": self.pending,
                "violation": self.violation}


@dataclass(frozen=True)
class MergeReport:
    guests: Tuple[GuestMerge, ...] = ()
    violations_total: int = 0
    stop_ksm: str = ""                  # why isolation stops KSM (on_mixed: stop_ksm)
    errors: Tuple[Tuple[ErrorSource, str], ...] = ()

    @property
    def denied(self) -> int:
        return sum(1 for g in self.guests if g.setting is MergeMode.deny and not g.pending)

    @property
    def controllable(self) -> int:
        return sum(1 for g in self.guests if g.controllable)

    @property
    def denied_cost_bytes(self) -> int:
        """What unmerging the guests denied this tick cost (or would, where deferred)."""
        return sum(g.cost_bytes for g in self.guests)

    def to_dict(self) -> Dict[str, Any]:
        return {"guests": [g.to_dict() for g in self.guests], "violations_total": self.violations_total,
                "stop_ksm": self.stop_ksm, "denied": self.denied, "controllable": self.controllable,
                "denied_cost_bytes": self.denied_cost_bytes}


@dataclass
class Facts:
    """What is read once per QEMU process (the command line, the backends qom-list shows)
    and what is re-read now and then (the XML: metadata can change while a guest runs)."""

    pid: Optional[int]
    identity: GuestIdentity
    nosharepages: bool
    ram: Optional[GuestRam]
    dom: Any = None
    confirmed: Optional[Tuple[str, ...]] = None  # backend ids qom-list confirmed
    xml_read: float = 0.0                        # monotonic time the XML was read


def configured(f: Facts) -> Tuple[MergeMode, MergeSource, str]:
    """The setting the guest was started with."""
    if f.nosharepages:
        return MergeMode.deny, MergeSource.DOMAIN_XML, "<nosharepages/>"
    ram = f.ram
    if ram is not None and ram.mem_merge is False:
        return MergeMode.deny, MergeSource.QEMU_CMDLINE, "mem-merge=off"
    if ram is not None and ram.ram_backends and all(b.merge is False for b in ram.ram_backends):
        return MergeMode.deny, MergeSource.QEMU_CMDLINE, "merge=off"
    return MergeMode.allow, MergeSource.QEMU_CMDLINE, "QEMU default (mem-merge=on)"


def backend_ids(ram: Optional[GuestRam]) -> Tuple[Tuple[str, ...], str]:
    """(RAM backend ids, "") or ((), why the guest's RAM has no switch at run time)."""
    if ram is None:
        return (), "its QEMU command line could not be read"
    ids = tuple(b.id for b in ram.ram_backends if b.id)
    if ids:
        return ids, ""
    if ram.mem_path:
        return (), "its RAM comes from -mem-path, not a memory backend object"
    return (), "its RAM has no memory backend object (-machine memory-backend=); QEMU older than 5.0 or -m only"


def guard(cost: int, meminfo: Optional[MemInfo], already: int = 0) -> Optional[str]:
    """Why unmerging `cost` bytes (after `already` approved) is refused, or None."""
    if cost <= 0:
        return None
    if meminfo is None:
        return "cannot read MemAvailable to check that the host absorbs unmerging %s" % format_bytes(cost)
    margin = unmerge_margin(meminfo)
    if already + cost + margin <= meminfo.available:
        return None
    return ("unmerging would allocate up to %s (its ksm_merging_pages) and keep a margin of %s, but MemAvailable "
            "is %s%s" % (format_bytes(cost), format_bytes(margin), format_bytes(meminfo.available),
                         " (%s already taken by other guests this tick)" % format_bytes(already) if already else ""))
