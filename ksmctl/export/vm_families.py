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


def vm_labels(vm: VmReading) -> str:
    """The label pairs render_text writes for a VM (sorted by name, as it sorts)."""
    return 'domain="%s",uuid="%s"' % (escape_label(vm.name), escape_label(vm.uuid))


def vm_sample_lines(vm: VmReading, page: int, values: Optional[Tuple[Optional[float], ...]] = None,
                    before: Optional["_Entry"] = None) -> Tuple[str, ...]:
    """The lines render_text writes for vm_values; a line whose value is what it was in
    `before` (the same guest's last lines) is taken from there."""
    values = vm_values(vm, page) if values is None else values
    labels = vm_labels(vm) if before is None else before.labels
    out = []
    for i, ((name, _doc), v) in enumerate(zip(VM_FAMILIES, values)):
        if v is None:
            out.append("")
        elif before is not None and before.values[i] == v:
            out.append(before.lines[i])
        else:
            out.append("%s{%s} %s\n" % (name, labels, floatToGoString(v)))
    return tuple(out)


class _Entry:
    """One VM's reading, values, labels and lines, as last rendered."""

    __slots__ = ("vm", "values", "labels", "lines")
    vm: VmReading
    values: Tuple[Optional[float], ...]
    labels: str
    lines: Tuple[str, ...]

    def __init__(self, vm: VmReading, page: int, before: Optional["_Entry"]) -> None:
        self.vm = vm
        self.values = vm_values(vm, page)
        self.labels = vm_labels(vm) if before is None else before.labels
        self.lines = vm_sample_lines(vm, page, self.values, before)


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
    """Each VM's sample lines, cached per VmReading object; when a guest's reading is new,
    the lines of its figures that kept their value are reused (while KSM merges, only
    the ksm_stat figures move). Holds only the last render's VMs (an exited guest's lines
    go with it)."""

    def __init__(self) -> None:
        self._cache: Dict[str, _Entry] = {}  # uuid -> entry
        self._page = 0

    def families(self, vms: Sequence[VmReading], page: int) -> List[Metric]:
        old = self._cache if self._page == page else {}
        new: Dict[str, _Entry] = {}
        lines = []
        for vm in vms:
            hit = old.get(vm.uuid)
            if hit is None or hit.vm is not vm:
                same_guest = hit is not None and hit.vm.name == vm.name
                hit = _Entry(vm, page, hit if same_guest else None)
            new[vm.uuid] = hit
            lines.append(hit.lines)
        self._cache, self._page = new, page  # whole replacements: a scrape thread may render too
        out: List[Metric] = []
        for i, (name, doc) in enumerate(VM_FAMILIES):
            text = "".join(vm_lines[i] for vm_lines in lines)
            if text:
                out.append(RenderedVmFamily(name, doc, text, vms, page, i))
        return out
