"""Doctor findings of per-VM merge control: a guest denied merging that shares pages (the
audit's violation, from the daemon's last tick, or from the guest's own configuration and
ksm_stat when no daemon runs), and a wanted setting not in effect."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from ksmctl.doctor.findings import Finding, Reason, Severity, ev
from ksmctl.guests.audit import RESIDUAL_PAGES
from ksmctl.readings import VmReading

STATE = "the daemon's last tick (state file)"


def merge_findings(daemon: Optional[Dict[str, Any]], vms: Sequence[VmReading]) -> List[Finding]:
    merge = (daemon or {}).get("merge")
    rows = {g.get("uuid"): g for g in (merge or {}).get("guests", []) if isinstance(g, dict)} \
        if isinstance(merge, dict) else {}
    out: List[Finding] = []
    for vm in vms:
        row = rows.get(vm.uuid)
        merging = vm.ksm.merging_pages if vm.ksm is not None else None
        stat = "/proc/%s/ksm_stat" % vm.pid

        def add(reason: Reason, sev: Severity, cause: str, remedy: str, *evidence: Any) -> None:
            out.append(Finding(reason, sev, cause, tuple(evidence), remedy, vm=vm.name, uuid=vm.uuid))

        if row is not None and row.get("violation"):
            add(Reason.MERGE_VIOLATION, Severity.PROBLEM, "denied merging (%s), but %s" % (row.get("source"),
                row["violation"]), "see the KsmctlMergeViolation runbook; the daemon re-applies the deny",
                ev("merge", row.get("merge"), STATE), ev("ksm_merging_pages", merging, stat))
        elif row is None and vm.excluded and merging is not None and merging > RESIDUAL_PAGES:
            add(Reason.MERGE_VIOLATION, Severity.PROBLEM, "excluded by its configuration, but %d of its pages "
                "are merged" % merging, "find what made its memory mergeable (a QMP qom-set merge=on); "
                "`ksmctl merge off %s` or restart it" % vm.name, ev("ksm_merging_pages", merging, stat))
        elif row is not None and row.get("pending"):
            add(Reason.MERGE_PENDING, Severity.WARNING, "merge %s (%s) is not in effect: %s"
                % (row.get("merge"), row.get("source"), row["pending"]),
                "free memory for the unmerge guard, or give the guest a memory backend (restart it under "
                "libvirt 5.0 or later)", ev("merge", row.get("merge"), STATE))
    return out
