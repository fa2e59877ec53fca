"""What a finding is: a severity, a reason from a bounded set (it is a metric label), a
one-line cause, the evidence (values and where they were read) and a remedy an operator
can apply."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from ksmctl.errors import StrEnum


class Severity(enum.IntEnum):
    OK = 0
    INFO = 1
    WARNING = 2
    PROBLEM = 3

    @property
    def label(self) -> str:
        return self.name.lower()


class Reason(StrEnum):
    """Why. Host reasons describe the kernel's KSM; VM reasons why a guest's memory
    merges or not. VM_UNMERGEABLE lists those that keep a guest out of KSM entirely."""

    # host
    KSM_UNAVAILABLE = "ksm_unavailable"
    KSM_OFF = "ksm_off"
    KSM_RUNNING = "ksm_running"
    ADVISOR_ACTIVE = "advisor_active"
    OTHER_WRITER = "other_writer"
    USE_ZERO_PAGES = "use_zero_pages"
    SMART_SCAN = "smart_scan"
    PAGE_SHARING_CAP = "page_sharing_cap"
    NUMA_SEPARATE = "numa_separate"
    NUMA_ACROSS = "numa_across"
    THP = "thp"
    KSMD_CPU = "ksmd_cpu"
    PROFIT_NEGATIVE = "profit_negative"
    POLICY = "policy"
    VENDOR_KNOB = "vendor_knob"
    # VM: cannot merge at all
    NOSHAREPAGES = "nosharepages"
    MEM_MERGE_OFF = "mem_merge_off"
    NOT_MERGEABLE = "not_mergeable"
    HUGETLBFS = "hugetlbfs"
    SHARED_MEMORY = "shared_memory"
    FILE_BACKED = "file_backed"
    NO_PROCESS = "no_process"
    # VM: merges, with a caveat or a figure
    LOCKED = "locked"
    GUEST_THP = "guest_thp"
    MERGING = "merging"
    STALE_MERGES = "stale_merges"         # counted as merged, rewritten by the guest since
    NOT_MERGED_YET = "not_merged_yet"
    POTENTIAL = "potential"
    # VM: per-VM merge control (ksmctl/guests)
    MERGE_VIOLATION = "merge_violation"   # denied merging, yet sharing pages
    MERGE_PENDING = "merge_pending"       # a wanted deny/allow not in effect (guard, not controllable)


# A private file backend still merges what the guest writes (copy-on-write pages are
# anonymous): it is a caveat, not a reason it cannot merge.
VM_UNMERGEABLE = frozenset({Reason.NOSHAREPAGES, Reason.MEM_MERGE_OFF, Reason.NOT_MERGEABLE,
                            Reason.HUGETLBFS, Reason.SHARED_MEMORY})


@dataclass(frozen=True)
class Evidence:
    what: str        # e.g. "use_zero_pages"
    value: str       # as read
    source: str      # the file, or "libvirt domain XML", "QEMU command line"

    def to_dict(self) -> Dict[str, str]:
        return {"what": self.what, "value": self.value, "source": self.source}


@dataclass(frozen=True)
class Finding:
    reason: Reason
    severity: Severity
    cause: str
    evidence: Tuple[Evidence, ...] = ()
    remedy: Optional[str] = None
    vm: Optional[str] = None          # the guest's name; None for host findings
    uuid: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"scope": "host" if self.vm is None else "vm", "vm": self.vm, "uuid": self.uuid,
                "reason": self.reason.value, "severity": self.severity.label, "cause": self.cause,
                "evidence": [e.to_dict() for e in self.evidence], "remedy": self.remedy}


def ev(what: str, value: object, source: str) -> Evidence:
    return Evidence(what, str(value), source)
