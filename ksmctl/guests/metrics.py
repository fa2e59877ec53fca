"""The merge-control families of /metrics, from a tick's MergeReport (only while the
daemon runs merge control, so hosts without it scrape exactly what they did before)."""
from __future__ import annotations

from typing import List

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ksmctl.guests.control import MergeReport
from ksmctl.policy.vms import MergeMode


def merge_families(report: MergeReport, per_vm: bool = True) -> List[Metric]:
    out: List[Metric] = [
        CounterMetricFamily("ksmctl_merge_violations", "Times a guest whose merge setting is deny was seen "
                            "sharing pages (or with its RAM backend's merge back on), once per episode.",
                            value=float(report.violations_total)),
        GaugeMetricFamily("ksmctl_guests_merge_denied", "Running guests whose merge setting is deny and in effect.",
                          value=float(report.denied)),
        GaugeMetricFamily("ksmctl_guests_merge_controllable", "Running guests whose RAM has a memory backend "
                          "object, so their merge setting can change without a restart.",
                          value=float(report.controllable)),
        GaugeMetricFamily("ksmctl_guests_merge_pending", "Running guests whose wanted merge setting is not in "
                          "effect (deferred by the unmerge guard, not controllable, QMP failed).",
                          value=float(sum(1 for g in report.guests if g.pending))),
        GaugeMetricFamily("ksmctl_merge_denied_unmerge_bytes", "Memory that unmerging the guests denied this tick "
                          "allocated (or would, where deferred): their ksm_merging_pages x page size.",
                          value=float(report.denied_cost_bytes)),
    ]
    if not per_vm:
        return out
    labels = ["domain", "uuid"]
    allowed = GaugeMetricFamily("ksmctl_vm_merge_allowed", "1 when the guest's effective merge setting lets KSM "
                                "merge it, 0 when denied; source: domain_xml, qemu_cmdline, runtime, policy, "
                                "isolation.", labels=labels + ["source"])
    violation = GaugeMetricFamily("ksmctl_vm_merge_violation", "1 while a guest denied merging shares pages.",
                                  labels=labels)
    for g in report.guests:
        in_effect = g.setting if not g.pending else None
        allowed.add_metric([g.name, g.uuid, str(g.source)], 0.0 if in_effect is MergeMode.deny else 1.0)
        violation.add_metric([g.name, g.uuid], 1.0 if g.violation else 0.0)
    return out + [f for f in (allowed, violation) if f.samples]
