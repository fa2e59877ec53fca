"""Findings as text for a person or stable JSON for tools, and the exit code.

JSON (docs/doctor.md): {"format": "ksmctl-doctor", "version": 1, "host": {...},
"findings": [finding...], "vms": [{"name", "uuid", "pid", "can_merge", "unmergeable"}],
"worst": severity, "problems": n}. Keys are only ever added.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from ksmctl.readings import VmReading

from .findings import Finding, Severity, VM_UNMERGEABLE

EXIT_NO_PROBLEM = 0
EXIT_PROBLEM = 5     # at least one finding of severity "problem"
FORMAT_VERSION = 1


def exit_code(findings: Sequence[Finding]) -> int:
    return EXIT_PROBLEM if any(f.severity is Severity.PROBLEM for f in findings) else EXIT_NO_PROBLEM


def worst(findings: Sequence[Finding]) -> Severity:
    return max((f.severity for f in findings), default=Severity.OK)


def to_json(host: Dict[str, Any], findings: Sequence[Finding], vms: Sequence[VmReading]) -> Dict[str, Any]:
    rows = []
    for vm in vms:
        mine = [f for f in findings if f.uuid == vm.uuid]
        blocked = sorted({f.reason.value for f in mine if f.reason in VM_UNMERGEABLE})
        rows.append({"name": vm.name, "uuid": vm.uuid, "pid": vm.pid, "can_merge": not blocked and vm.pid is not None,
                     "unmergeable": blocked})
    return {"format": "ksmctl-doctor", "version": FORMAT_VERSION, "host": host,
            "findings": [f.to_dict() for f in findings], "vms": rows, "worst": worst(findings).label,
            "problems": sum(1 for f in findings if f.severity is Severity.PROBLEM)}


_MARK = {Severity.OK: "ok", Severity.INFO: "info", Severity.WARNING: "WARNING", Severity.PROBLEM: "PROBLEM"}


def render(findings: Sequence[Finding], vms: Sequence[VmReading], verbose: bool = True) -> str:
    lines: List[str] = ["Host"]
    lines += _block([f for f in findings if f.vm is None], verbose)
    for vm in vms:
        mine = [f for f in findings if f.uuid == vm.uuid]
        blocked = sorted({f.reason.value for f in mine if f.reason in VM_UNMERGEABLE})
        head = "VM %s (%s, pid %s): %s" % (vm.name, vm.uuid, vm.pid if vm.pid is not None else "?",
                                           "cannot merge (%s)" % ", ".join(blocked) if blocked else "can merge")
        lines += ["", head] + _block(mine, verbose)
    n = sum(1 for f in findings if f.severity is Severity.PROBLEM)
    lines += ["", "%d problem%s, worst finding: %s" % (n, "" if n == 1 else "s", worst(findings).label)]
    return "\n".join(lines)


def _block(findings: Sequence[Finding], verbose: bool) -> List[str]:
    out = []
    for f in sorted(findings, key=lambda f: -f.severity):
        out.append("  [%s] %s" % (_MARK[f.severity], f.cause))
        if verbose:
            for e in f.evidence:
                out.append("      %s = %s  (%s)" % (e.what, e.value, e.source))
        if f.remedy:
            out.append("      -> %s" % f.remedy)
    return out
