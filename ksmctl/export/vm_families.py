"""The per-VM metric families (labels domain and uuid), rendered once per VM reading.

At thousands of guests these families are most of /metrics: 7 lines per guest, each
formatted from its figures. The collectors hand out the same VmReading object while a
guest's figures are unchanged, so its lines are formatted once and copied at later ticks;
a changed figure is a new object, formatted at the tick that read it.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from ksmctl.readings import VmReading

VM_FAMILIES: Tuple[Tuple[str, str], ...] = (
    ("ksmctl_vm_merging_pages", "Guest pages backed by a KSM page (ksm_merging_pages of its QEMU process)."),
    ("ksmctl_vm_memory_saved_bytes", "Guest memory backed by KSM: (merging + zero pages) x page size of its "
     "QEMU process."),
    ("ksmctl_vm_ksm_profit_bytes", "Kernel's ksm_process_profit of the guest's QEMU process (saving minus "
     "metadata)."),
    ("ksmctl_vm_memory_current_bytes", "Guest memory now (balloon current)."),
    ("ksmctl_vm_memory_maximum_bytes", "Guest memory maximum (balloon maximum, or -m of the QEMU command line)."),
    ("ksmctl_vm_rss_bytes", "Resident memory of the guest's QEMU process."),
    ("ksmctl_vm_excluded", "1 when the guest opted out of merging (nosharepages, mem-merge=off)."),
)
VM_LABELS = ("domain", "uuid")


def escape_label(v: str) -> str:
    """A label value as the text format writes it."""
    if "\\" in v or "\n" in v or '"' in v:
        v = v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return v


def vm_values(vm: VmReading, page: int) -> Tuple[Optional[float], ...]:
    """One VM's value in each family of VM_FAMILIES; None: no sample (unknown)."""
    k = vm.ksm
    merging = saved = profit = None
    if k is not None and k.merging_pages is not None:
        merging = float(k.merging_pages)
        saved = float((k.merging_pages + (k.zero_pages or 0)) * page)
    if k is not None and k.process_profit is not None:
        profit = float(k.process_profit)
    return (merging, saved, profit,
            float(vm.balloon_current) if vm.balloon_current is not None else None,
            float(vm.balloon_maximum) if vm.balloon_maximum is not None else None,
            float(vm.rss) if vm.rss is not None else None,
            1.0 if vm.excluded else 0.0)


def vm_sample_lines(vm: VmReading, page: int) -> Tuple[str, ...]:
    """The lines render_text writes for vm_values (labels sorted by name, as it sorts)."""
    labels = 'domain="%s",uuid="%s"' % (escape_label(vm.name), escape_label(vm.uuid))
    return tuple("" if v is None else "%s{%s} %s\n" % (name, labels, floatToGoString(v))
                 for (name, _doc), v in zip(VM_FAMILIES, vm_values(vm, page)))


class RenderedVmFamily(GaugeMetricFamily):
    """A per-VM family whose exposition lines are rendered already: render_text copies
    `rendered`; the samples are built only for readers that want them (prometheus_client's
    generate_latest, tests), from the same values, so both agree."""

    _samples: Optional[List[Sample]] = None

    def __init__(self, name: str, doc: str, rendered: str, vms: Sequence[VmReading], page: int,
                 index: int) -> None:
        super().__init__(name, doc, labels=list(VM_LABELS))
        self.rendered = rendered
        self._source = (vms, page, index)

    @property  # type: ignore[override]
    def samples(self) -> List[Sample]:
        if self._samples is None:
            vms, page, index = self._source
            built = []
            for vm in vms:
                v = vm_values(vm, page)[index]
                if v is not None:
                    built.append(Sample(self.name, {"domain": vm.name, "uuid": vm.uuid}, v, None))
            self._samples = built
            return built
        return self._samples

    @samples.setter
    def samples(self, value: List[Sample]) -> None:
        self._samples = value or None


class VmLines:
    """Each VM's sample lines, cached per VmReading object; holds only the last render's
    VMs (an exited guest's lines go with it)."""

    def __init__(self) -> None:
        self._cache: Dict[int, Tuple[VmReading, Tuple[str, ...]]] = {}  # id(vm) -> (vm, lines)
        self._page = 0

    def families(self, vms: Sequence[VmReading], page: int) -> List[Metric]:
        old = self._cache if self._page == page else {}
        new: Dict[int, Tuple[VmReading, Tuple[str, ...]]] = {}
        lines = []
        for vm in vms:
            hit = old.get(id(vm))
            if hit is None or hit[0] is not vm:  # the entry holds vm, so its id is not reused meanwhile
                hit = (vm, vm_sample_lines(vm, page))
            new[id(vm)] = hit
            lines.append(hit[1])
        self._cache, self._page = new, page  # whole replacements: a scrape thread may render too
        out: List[Metric] = []
        for i, (name, doc) in enumerate(VM_FAMILIES):
            text = "".join(vm_lines[i] for vm_lines in lines)
            if text:
                out.append(RenderedVmFamily(name, doc, text, vms, page, i))
        return out
