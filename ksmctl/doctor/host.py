"""Host findings: is KSM there and on, who holds the knobs, and the kernel settings that
change what can merge (zero pages, smart scan, sharing limits, NUMA, THP)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ksmctl.collectors.memlayout import Thp
from ksmctl.readings import KsmState
from ksmctl.units import format_bytes

from .findings import Evidence, Finding, Reason, Severity, ev

KSMD_CPU_WARN = 50.0   # % of one core


@dataclass(frozen=True)
class HostFacts:
    """Everything the host rules look at, read by the caller (collectors)."""

    ksm: Optional[KsmState]
    ksm_dir: str
    thp: Optional[Thp] = None
    numa_nodes: Optional[Tuple[int, ...]] = None
    numa_dir: str = "/sys/devices/system/node"
    ksmd_cpu_percent: Optional[float] = None
    writers: Sequence[Tuple[str, str, str]] = ()      # (kind, description, how to stop)
    daemon: Optional[Mapping[str, Any]] = None         # the daemon's state file, if one runs
    conditions: Sequence[Tuple[str, bool, str]] = ()   # (group, holds, why) of the configured policy
    policy_name: Optional[str] = None
    mergeable_bytes: Optional[int] = None             # RSS of processes with mergeable memory
    vendor_knobs: Mapping[str, str] = field(default_factory=dict)


def host_findings(h: HostFacts) -> List[Finding]:
    if h.ksm is None:
        return [Finding(Reason.KSM_UNAVAILABLE, Severity.PROBLEM,
                        "this kernel has no KSM: %s does not exist" % h.ksm_dir,
                        (ev("directory", "missing", h.ksm_dir),),
                        "use a kernel built with CONFIG_KSM=y (every distribution kernel is)")]
    out: List[Finding] = []
    out += _run_state(h)
    out += _writers(h)
    out += _zero_pages(h)
    out += _smart_scan(h)
    out += _sharing_cap(h)
    out += _numa(h)
    out += _thp(h)
    out += _cpu_and_profit(h)
    out += _policy(h)
    for name, value in sorted(h.vendor_knobs.items()):
        out.append(Finding(Reason.VENDOR_KNOB, Severity.INFO,
                           "%s/%s is not an upstream KSM attribute (a vendor kernel's knob): ksmctl "
                           "reports it and never writes it" % (h.ksm_dir, name),
                           (ev(name, value, "%s/%s" % (h.ksm_dir, name)),),
                           "see your distribution's kernel documentation for %s" % name))
    return out


def _k(h: HostFacts, name: str) -> Evidence:
    assert h.ksm is not None
    value = h.ksm.get(name)
    return ev(name, "not supported" if value is None else value, "%s/%s" % (h.ksm_dir, name))


def _run_state(h: HostFacts) -> List[Finding]:
    k = h.ksm
    assert k is not None
    run = k.get("run")
    d = h.daemon
    decision = (d or {}).get("decision") or {}
    who = ("the ksmctl daemon (pid %s, policy %s%s)" % (d.get("pid"), (d.get("policy") or {}).get("name"),
                                                        ", dry run: it only watches" if d.get("dry_run") else "")
           if d else "no ksmctl daemon runs")
    evid: Tuple[Evidence, ...] = (_k(h, "run"), ev("daemon", who, "ksmctl state file"))
    if run == 1 and k.get("pages_to_scan") == 0:
        # ksmd wakes but scans nothing: the adaptive policy's park, or a stall nobody chose.
        evid += (_k(h, "pages_to_scan"), _k(h, "full_scans"))
        if d and decision.get("scan_rule") == "park":
            return [Finding(Reason.KSM_RUNNING, Severity.OK, "KSM is on and parked: %s stopped ksmd where a pass "
                            "ended (pages_to_scan 0); it scans again when mergeable memory grows or a sweep is due"
                            % who, evid)]
        return [Finding(Reason.KSM_RUNNING, Severity.WARNING, "KSM is on but ksmd scans nothing (pages_to_scan "
                        "0), and %s parked it: nothing new merges" % ("no daemon" if not d else who), evid,
                        "let the policy set the rate, or `ksmctl set pages_to_scan=100`")]
    if run == 1:
        return [Finding(Reason.KSM_RUNNING, Severity.OK, "KSM is running: %s pages every %s ms; %s" % (
            k.get("pages_to_scan"), k.get("sleep_millisecs"), who), evid + (_k(h, "pages_to_scan"),
                                                                            _k(h, "sleep_millisecs")))]
    if d and not d.get("dry_run") and decision:
        why = "; ".join(decision.get("reasons") or []) or decision.get("run_rule", "")
        return [Finding(Reason.KSM_OFF, Severity.INFO, "KSM is off (run=%s): the policy decided %s (%s)"
                        % (run, decision.get("run_rule"), why), evid,
                        "if it should run now, see `ksmctl policy explain` for the start conditions")]
    what = "stopped after an unmerge" if run == 2 else "off"
    if not h.mergeable_bytes:
        return [Finding(Reason.KSM_OFF, Severity.INFO, "KSM is %s (run=%s) and %s; no process has mergeable "
                        "memory now, so there is nothing to merge" % (what, run, who), evid)]
    sev = Severity.PROBLEM if not d else Severity.WARNING
    return [Finding(Reason.KSM_OFF, sev, "KSM is %s (run=%s) and %s: %s of mergeable memory is not being "
                    "merged" % (what, run, who, format_bytes(h.mergeable_bytes)),
                    evid + (ev("mergeable memory", format_bytes(h.mergeable_bytes), "/proc/*/ksm_stat"),),
                    "start the daemon (`systemctl enable --now ksmctl`), or `ksmctl set run=1`")]


def _writers(h: HostFacts) -> List[Finding]:
    out = []
    for kind, desc, how in h.writers:
        reason = Reason.ADVISOR_ACTIVE if kind == "advisor" else Reason.OTHER_WRITER
        out.append(Finding(reason, Severity.WARNING, desc, (ev("writer", kind, "process table / sysfs"),), how))
    return out


def _zero_pages(h: HostFacts) -> List[Finding]:
    k = h.ksm
    assert k is not None
    if k.get("use_zero_pages") != 1:
        return []
    return [Finding(Reason.USE_ZERO_PAGES, Severity.INFO,
                    "use_zero_pages=1: empty pages are mapped to the kernel's zero page; they count in "
                    "ksm_zero_pages, not pages_sharing (ksmctl's saving adds both)",
                    (_k(h, "use_zero_pages"), _k(h, "ksm_zero_pages"), _k(h, "pages_sharing")),
                    "nothing to do; policy key use_zero_pages sets it")]


def _smart_scan(h: HostFacts) -> List[Finding]:
    k = h.ksm
    assert k is not None
    if k.get("smart_scan") != 1:
        return []
    return [Finding(Reason.SMART_SCAN, Severity.INFO,
                    "smart_scan=1: ksmd skips pages that did not merge on earlier passes (fewer CPU "
                    "seconds; a page that becomes a duplicate later is found later)",
                    (_k(h, "smart_scan"), _k(h, "pages_skipped")), "policy key smart_scan sets it")]


def _sharing_cap(h: HostFacts) -> List[Finding]:
    k = h.ksm
    assert k is not None
    chains = k.get("stable_node_chains") or 0
    if not chains:
        return []
    return [Finding(Reason.PAGE_SHARING_CAP, Severity.WARNING,
                    "%d KSM pages reached max_page_sharing=%s sharers: each further group of sharers "
                    "costs another KSM page (stable_node_dups %s)" % (
                        chains, k.get("max_page_sharing"), k.get("stable_node_dups")),
                    (_k(h, "max_page_sharing"), _k(h, "stable_node_chains"), _k(h, "stable_node_dups")),
                    "raise policy key max_page_sharing (the kernel takes it only while nothing is "
                    "merged: ksmctl unmerges first when the host can absorb it)")]


def _numa(h: HostFacts) -> List[Finding]:
    k = h.ksm
    assert k is not None
    nodes = h.numa_nodes
    if not nodes or len(nodes) < 2 or k.get("merge_across_nodes") is None:
        return []
    evid = (_k(h, "merge_across_nodes"), ev("nodes with memory", ",".join(map(str, nodes)),
                                           h.numa_dir + "/has_memory"))
    if k.get("merge_across_nodes") == 0:
        return [Finding(Reason.NUMA_SEPARATE, Severity.INFO,
                        "merge_across_nodes=0 on %d NUMA nodes: identical pages on different nodes stay "
                        "apart (less saving, local memory kept)" % len(nodes), evid,
                        "policy key merge_across_nodes: 1 merges them (a guest may then read a merged "
                        "page from a remote node)")]
    return [Finding(Reason.NUMA_ACROSS, Severity.INFO,
                    "merge_across_nodes=1 on %d NUMA nodes: pages merge across nodes; a guest may read "
                    "a merged page from remote memory" % len(nodes), evid,
                    "policy key merge_across_nodes: 0 keeps merging within each node")]


def _thp(h: HostFacts) -> List[Finding]:
    t = h.thp
    if t is None or t.enabled == "never":
        return []
    evid = (ev("enabled", t.enabled, t.path + "/enabled"), ev("defrag", t.defrag, t.path + "/defrag"),
            ev("khugepaged/defrag", t.khugepaged_defrag, t.path + "/khugepaged/defrag"))
    sev = Severity.WARNING if t.enabled == "always" else Severity.INFO
    scope = "all anonymous memory" if t.enabled == "always" else "memory that asks for it (QEMU asks for guest RAM)"
    return [Finding(Reason.THP, sev,
                    "transparent huge pages: %s (%s): huge pages back %s; KSM merges only small pages, so "
                    "it must split a huge page to merge any part of it, and khugepaged may collapse it "
                    "again. Trade: KSM saving against TLB efficiency" % (t.enabled, t.path + "/enabled", scope),
                    evid, "for the most saving: `echo never > %s/enabled` (or per guest, see the VM "
                    "findings); for the fastest guests keep huge pages" % t.path)]


def _cpu_and_profit(h: HostFacts) -> List[Finding]:
    k = h.ksm
    assert k is not None
    out = []
    cpu = h.ksmd_cpu_percent
    if cpu is not None:
        sev = Severity.WARNING if cpu > KSMD_CPU_WARN else Severity.INFO
        out.append(Finding(Reason.KSMD_CPU, sev, "ksmd uses %.1f%% of one core" % cpu,
                           (ev("ksmd CPU", "%.1f%%" % cpu, "/proc/<ksmd pid>/stat"),),
                           "policy scan.cpu_budget caps it" if sev is Severity.WARNING else None))
    gp = k.get("general_profit")
    if gp is not None and gp < 0:
        out.append(Finding(Reason.PROFIT_NEGATIVE, Severity.WARNING,
                           "general_profit is %s: KSM's metadata costs more than its merging saves"
                           % format_bytes(gp), (_k(h, "general_profit"), _k(h, "pages_unshared")),
                           "stop scanning memory that does not merge: a policy that stops KSM without "
                           "pressure, or exclude guests that never merge"))
    return out


def _policy(h: HostFacts) -> List[Finding]:
    if not h.conditions:
        return []
    start = [why for g, ok, why in h.conditions if g == "start_when" and ok]
    stop = [(ok, why) for g, ok, why in h.conditions if g == "stop_when"]
    parts = ["start_when: " + ("; ".join(start) if start else "none holds")]
    if stop:
        failing = [why for ok, why in stop if not ok]
        parts.append("stop_when: " + ("all hold" if not failing else "; ".join(failing)))
    evid = tuple(ev(g, ("holds: " if ok else "does not hold: ") + why, "policy %s" % h.policy_name)
                 for g, ok, why in h.conditions)
    return [Finding(Reason.POLICY, Severity.INFO, "policy %s, %s" % (h.policy_name, "; ".join(parts)), evid,
                    "`ksmctl policy explain` shows the decision these lead to")]


def describe_vendor_knobs(present: Sequence[str], known: Sequence[str]) -> List[str]:
    """Files in the KSM directory that are not in the knob table."""
    return sorted(set(present) - set(known))


def as_dict(h: HostFacts) -> Dict[str, Any]:
    k = h.ksm
    return {"ksm": None if k is None else {"run": k.get("run"), "saved_bytes": k.saved_bytes,
                                           "values": dict(k.values)},
            "thp": None if h.thp is None else {"enabled": h.thp.enabled, "defrag": h.thp.defrag},
            "numa_nodes": list(h.numa_nodes) if h.numa_nodes is not None else None,
            "ksmd_cpu_percent": h.ksmd_cpu_percent}
