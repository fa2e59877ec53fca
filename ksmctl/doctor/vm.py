"""Per-guest findings: can its memory merge at all, and if not, why (each with where it
was read); if it can, what it merges now and what holds it back."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ksmctl.collectors.memlayout import Mapping, guest_ram
from ksmctl.collectors.vms.backends import GuestRam, GuestRamCache
from ksmctl.readings import KsmStat, VmReading
from ksmctl.units import format_bytes

from .findings import Evidence, Finding, Reason, Severity, VM_UNMERGEABLE, ev

THP_SHARE_NOTE = 0.5   # share of the guest RAM's RSS in huge pages worth a note
STALE_NOTE_PAGES = 256    # stale merges worth a note: at least this many pages ...
STALE_NOTE_SHARE = 0.01   # ... and this share of the merges the kernel counts

CMDLINE = "QEMU command line (/proc/%d/cmdline)"
XML = "libvirt domain XML"


@dataclass(frozen=True)
class VmFacts:
    vm: VmReading
    ram: Optional[GuestRam] = None                 # from the QEMU command line
    nosharepages: Optional[bool] = None            # from the domain XML (None: no libvirt)
    mappings: Optional[Sequence[Mapping]] = None   # /proc/<pid>/smaps
    ksm_after: Optional[KsmStat] = None            # ksm_stat again, read right after smaps
    memory: Optional[int] = None                   # the guest's RAM size, bytes
    potential_bytes: Optional[float] = None        # estimator: what could still be saved
    page_size: int = 4096
    ksm_running: bool = True


def vm_findings(f: VmFacts) -> List[Finding]:
    vm = f.vm
    out: List[Finding] = []

    def add(reason: Reason, sev: Severity, cause: str, evidence: Sequence[Evidence],
            remedy: Optional[str] = None) -> None:
        out.append(Finding(reason, sev, cause, tuple(evidence), remedy, vm=vm.name, uuid=vm.uuid))

    if vm.pid is None:
        add(Reason.NO_PROCESS, Severity.WARNING, "its QEMU process was not found (no pid file, or the pid "
            "runs something else): nothing can be said about its memory", [ev("pid", "unknown", "libvirt")],
            "check `virsh dominfo %s` and /run/libvirt/qemu/%s.pid" % (vm.name, vm.name))
        return out
    cmd = CMDLINE % vm.pid
    ram = f.ram
    ram_maps = guest_ram(list(f.mappings or ()), f.memory)
    maps_src = "/proc/%d/smaps" % vm.pid
    if f.nosharepages:
        add(Reason.NOSHAREPAGES, Severity.INFO, "excluded by its configuration: <memoryBacking><nosharepages/>",
            [ev("memoryBacking/nosharepages", "present", XML)],
            "remove <nosharepages/> from the domain XML and restart the guest")
    if ram is not None:
        machine_off = ram.mem_merge is False
        off = ram.merge_off
        if machine_off or off:
            evid = ([ev("-machine mem-merge", "off", cmd)] if machine_off else []) + \
                   [ev("-object %s merge" % b.id, "off", cmd) for b in off]
            add(Reason.MEM_MERGE_OFF, Severity.INFO if f.nosharepages else Severity.WARNING,
                "QEMU does not mark its RAM mergeable (mem-merge=off / merge=off)", evid,
                "libvirt sets this for <nosharepages/>; otherwise remove mem-merge=off from the QEMU options")
        huge = ram.hugetlb
        if huge or ram.legacy_hugetlb or any(m.hugetlb for m in ram_maps):
            evid = [ev("-object %s" % b.id, "%s mem-path=%s hugetlb=%s" % (b.qom_type, b.mem_path, b.hugetlb), cmd)
                    for b in huge] + ([ev("-mem-path", ram.mem_path, cmd)] if ram.legacy_hugetlb else [])
            evid += [ev("VmFlags of %s" % (m.path or hex(m.start)), " ".join(m.flags), maps_src)
                     for m in ram_maps if m.hugetlb]
            add(Reason.HUGETLBFS, Severity.WARNING, "its RAM is on hugetlbfs: KSM never merges hugetlb pages",
                evid, "remove <hugepages/> from <memoryBacking> (trade: the guest's TLB efficiency)")
        shared = ram.shared
        if shared or any(m.shared and not m.hugetlb for m in ram_maps):
            evid = [ev("-object %s share" % b.id, "on (%s)" % b.qom_type, cmd) for b in shared]
            evid += [ev("VmFlags of %s" % (m.path or hex(m.start)), " ".join(m.flags), maps_src)
                     for m in ram_maps if m.shared]
            add(Reason.SHARED_MEMORY, Severity.WARNING,
                "its RAM is a shared mapping (share=on, e.g. memfd for vhost-user or virtiofs): KSM merges "
                "only private anonymous pages", evid,
                "use <access mode='private'/> in <memoryBacking> if no vhost-user/virtiofs device needs shared RAM")
        files = ram.private_files
        if files:
            add(Reason.FILE_BACKED, Severity.INFO,
                "its RAM is a private file mapping: only pages the guest has written (copied from the file) "
                "can merge", [ev("-object %s mem-path" % b.id, b.mem_path, cmd) for b in files],
                "<source type='anonymous'/> in <memoryBacking> makes all of it anonymous")
        if ram.mem_lock or any(m.locked for m in ram_maps):
            add(Reason.LOCKED, Severity.INFO, "its RAM is locked (mlock): it merges, but a guest write to a "
                "merged page gets a new locked page at once", [ev("-overcommit mem-lock", "on" if ram.mem_lock
                                                                   else "off", cmd)] +
                [ev("Locked of %s" % (m.path or hex(m.start)), format_bytes(m.locked), maps_src)
                 for m in ram_maps if m.locked], None)
    k = vm.ksm
    blocked = any(x.reason in VM_UNMERGEABLE for x in out)
    if k is not None and k.mergeable is False and not blocked:
        add(Reason.NOT_MERGEABLE, Severity.PROBLEM,
            "the kernel says none of its memory is mergeable (ksm_mergeable: no), and its configuration "
            "does not say why", [ev("ksm_mergeable", "no", "/proc/%d/ksm_stat" % vm.pid)] +
            [ev("VmFlags of %s" % (m.path or hex(m.start)), " ".join(m.flags), maps_src) for m in ram_maps],
            "check the QEMU version and options (mem-merge) and `ksmctl vms`")
        blocked = True
    rss = sum(m.rss for m in ram_maps)
    thp = sum(m.anon_huge for m in ram_maps)
    if rss and thp / rss >= THP_SHARE_NOTE and not blocked:
        add(Reason.GUEST_THP, Severity.INFO, "%.0f%% of its RAM's resident memory is in transparent huge "
            "pages: KSM must split each before merging any of it, and khugepaged may collapse it again"
            % (100.0 * thp / rss), [ev("AnonHugePages", format_bytes(thp), maps_src),
                                     ev("Rss", format_bytes(rss), maps_src)],
            "THP 'never' (host) or a guest that frees memory merges more; see the host's THP finding")
    if k is not None and not blocked:
        merging = k.merging_pages or 0
        stat = "/proc/%d/ksm_stat" % vm.pid
        evid = [ev("ksm_merging_pages", k.merging_pages, stat), ev("ksm_zero_pages", k.zero_pages, stat),
                ev("ksm_process_profit", k.process_profit, stat)]
        if merging or k.zero_pages:
            add(Reason.MERGING, Severity.OK, "merging: %s of its pages share a KSM page (%s), %s zero pages, "
                "profit %s" % (merging, format_bytes(merging * f.page_size), k.zero_pages or 0,
                               format_bytes(k.process_profit or 0)), evid)
        else:
            add(Reason.NOT_MERGED_YET, Severity.INFO if f.ksm_running else Severity.WARNING,
                "mergeable, but nothing merged yet: %s" % (
                    "ksmd has not yet seen its pages twice, or they are unique" if f.ksm_running
                    else "KSM is not running (see the host findings)"), evid)
        stale = _stale_merges(f)
        if stale is not None:
            counted, mapped = stale
            swapped = sum(m.swap for m in f.mappings or ())
            cause = ("%d of the %d pages the kernel counts as merged (%s) no longer map a KSM page: the guest "
                     "wrote to them since (copy-on-write broke the merge), so they save nothing now. The "
                     "kernel's counters (its ksm_stat, and the host's pages_sharing) drop them only at ksmd's "
                     "next look at each page, in its next pass over this guest"
                     % (counted - mapped, counted, format_bytes((counted - mapped) * f.page_size)))
            evid = [ev("ksm_merging_pages", counted, stat),
                    ev("KSM (sum over its mappings)", format_bytes(mapped * f.page_size), maps_src)]
            if swapped:   # a merged page swapped out maps no KSM page either, and is still counted
                cause += "; or they are swapped out (%s of its memory is)" % format_bytes(swapped)
                evid.append(ev("Swap (sum over its mappings)", format_bytes(swapped), maps_src))
            add(Reason.STALE_MERGES, Severity.INFO, cause, evid)
    if f.potential_bytes is not None and not blocked:
        add(Reason.POTENTIAL, Severity.INFO, "the last estimate found %s more that could merge"
            % format_bytes(f.potential_bytes), [ev("remaining", format_bytes(f.potential_bytes), "ksmctl estimate")])
    return out


def _stale_merges(f: VmFacts) -> Optional[Tuple[int, int]]:
    """(merges the kernel counts, pages mapping a KSM page) when the difference is worth a
    note. The count is the lower of ksm_stat before and after smaps: a merge made while
    smaps was walked, or a stale one dropped, must not show as stale."""
    k, after, maps = f.vm.ksm, f.ksm_after, f.mappings
    if k is None or after is None or maps is None or k.merging_pages is None or after.merging_pages is None:
        return None
    if not maps or any(m.ksm is None for m in maps):
        return None   # before Linux 6.7 smaps has no KSM line
    counted = min(k.merging_pages, after.merging_pages)
    mapped = sum(m.ksm or 0 for m in maps) // f.page_size
    stale = counted - mapped
    if stale < STALE_NOTE_PAGES or stale < STALE_NOTE_SHARE * counted:
        return None
    return counted, mapped


def unmergeable_reasons(findings: Sequence[Finding]) -> List[Reason]:
    return sorted({x.reason for x in findings if x.reason in VM_UNMERGEABLE}, key=lambda r: r.value)


def config_reasons(vm: VmReading, ram: Optional[GuestRam]) -> Tuple[Reason, ...]:
    """Why a guest's memory cannot merge, from what is cheap to know every tick: its QEMU
    command line (parsed once per process), the collector's opt-out verdict and its
    ksm_stat. `ksmctl doctor` adds the mappings' evidence (smaps) on demand."""
    found = set()
    if ram is not None:
        if ram.mem_merge is False or ram.merge_off:
            found.add(Reason.MEM_MERGE_OFF)
        if ram.hugetlb or ram.legacy_hugetlb:
            found.add(Reason.HUGETLBFS)
        if ram.shared:
            found.add(Reason.SHARED_MEMORY)
        if ram.private_files:
            found.add(Reason.FILE_BACKED)
    if vm.excluded and Reason.MEM_MERGE_OFF not in found:
        found.add(Reason.NOSHAREPAGES)   # the collector's verdict, from the domain XML
    if vm.ksm is not None and vm.ksm.mergeable is False and not found & VM_UNMERGEABLE:
        found.add(Reason.NOT_MERGEABLE)
    return tuple(sorted(found & VM_UNMERGEABLE, key=lambda r: r.value))


_Key = Tuple[str, Optional[int], bool, Optional[bool]]  # what the reasons depend on


class LiveReasons:
    """config_reasons for every running guest, as the daemon needs them each tick, worked
    out again only when an input changed: a guest's command line is parsed once per
    process (GuestRamCache), and its reasons once per (process, opt-out verdict,
    ksm_mergeable). At 2,000 guests, recomputing them every tick cost ~20 ms."""

    def __init__(self, cmdline: Callable[[int], Optional[Sequence[str]]]) -> None:
        self._ram = GuestRamCache(cmdline)
        # uuid -> (the reading they were worked out for, its key, the reasons). A guest
        # whose reading is the very object of last tick (nothing changed) costs a lookup.
        self._known: Dict[str, Tuple[VmReading, _Key, Tuple[Reason, ...]]] = {}

    def current(self, vms: Sequence[VmReading]) -> Dict[str, Tuple[Reason, ...]]:
        last = self._known
        known: Dict[str, Tuple[VmReading, _Key, Tuple[Reason, ...]]] = {}
        fresh: List[Tuple[VmReading, _Key]] = []
        for v in vms:
            hit = last.get(v.uuid)
            if hit is not None and hit[0] is v:
                known[v.uuid] = hit
                continue
            key = self._key(v)
            if hit is not None and hit[1] == key:
                known[v.uuid] = (v, key, hit[2])
            else:
                fresh.append((v, key))
        if fresh:
            rams = self._ram.current([(v.uuid, v.pid) for v in vms if v.pid is not None])
            for v, key in fresh:
                known[v.uuid] = (v, key, config_reasons(v, rams.get((v.uuid, v.pid)) if v.pid is not None else None))
        self._known = known
        return {uuid: hit[2] for uuid, hit in known.items()}

    @staticmethod
    def _key(v: VmReading) -> "_Key":
        return (v.uuid, v.pid, v.excluded, v.ksm.mergeable if v.ksm is not None else None)
