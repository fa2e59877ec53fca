"""Assembles one tick's Readings from sysfs, /proc and the VM collector.

Failure policy, explicit: KSM sysfs or /proc/meminfo unreadable -> the tick is skipped
(CollectionFailed; the policy cannot decide without them). PSI, ksmd CPU, per-VM data
and mergeable memory are optional: a failure leaves that part None and is recorded in
Readings.errors, so the exporter counts it and drops only those series.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple, TypeVar

from ksmctl.errors import ErrorSource, KsmctlError, ReadError
from ksmctl.readings import Coverage, EstimateSummary, Readings, VmReading, VmSource
from ksmctl.collectors.coverage import CoverageCollector
from ksmctl.collectors.procfs import ProcFs
from ksmctl.kernel.sysfs import KsmSysfs

log = logging.getLogger("ksmctl.collect")
T = TypeVar("T")
Errors = List[Tuple[ErrorSource, str]]


class VmSourceLike(Protocol):
    """What the host collector needs of a VM collector (collectors.vms.VmCollector)."""

    def collect(self) -> Tuple[VmReading, ...]: ...

    @property
    def errors(self) -> Sequence[Tuple[ErrorSource, str]]: ...

    @property
    def source(self) -> Optional[VmSource]: ...


class CollectionFailed(KsmctlError):
    """A reading the policy cannot do without failed: skip this tick."""

    def __init__(self, source: ErrorSource, message: str) -> None:
        super().__init__(message)
        self.source = source


class HostCollector:
    def __init__(self, sysfs: KsmSysfs, procfs: ProcFs, vms: Optional[VmSourceLike] = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 track_mergeable: bool = True) -> None:
        self.sysfs = sysfs
        self.procfs = procfs
        self.vms = vms
        self.clock = clock
        self.wall = wall
        self.track_mergeable = track_mergeable
        self.estimate: Optional[EstimateSummary] = None  # set by the periodic estimator
        self.coverage = CoverageCollector(procfs)
        self._reported: Errors = []  # errors from background work, for the next tick

    def report_error(self, source: ErrorSource, message: str) -> None:
        self._reported.append((source, message))

    def collect(self, coverage_wanted: bool = False) -> Readings:
        """coverage_wanted: the policy holds a pass more for growth (AdaptiveState.behind_growth),
        so a boundary this tick reads whether ksmd saw the grown memory (Readings.coverage)."""
        errors: Errors = []
        while self._reported:
            errors.append(self._reported.pop(0))
        try:
            ksm = self.sysfs.read()
        except KsmctlError as e:
            raise CollectionFailed(ErrorSource.SYSFS, e.message) from None
        for name, why in ksm.unreadable.items():
            errors.append((ErrorSource.SYSFS, why))
        try:
            meminfo = self.procfs.meminfo()
        except ReadError as e:
            raise CollectionFailed(ErrorSource.PROC, e.message) from None
        psi = self._optional(ErrorSource.PROC, self.procfs.psi, errors)
        cpu = self._optional(ErrorSource.PROC, self.procfs.ksmd_cpu_seconds, errors)
        vms: Optional[Tuple[VmReading, ...]] = ()
        vm_source: Optional[VmSource] = None
        if self.vms is not None:
            vms = self._optional(ErrorSource.LIBVIRT, self.vms.collect, errors)
            errors.extend(self.vms.errors)  # per-domain problems, libvirt outages
            vm_source = self.vms.source if vms is not None else None
        mergeable: Optional[int] = None
        coverage: Optional[Coverage] = None
        if self.track_mergeable:
            by_pid = self._mergeable(vms, errors)
            if by_pid is not None:
                mergeable = sum(by_pid.values())
                coverage = self._optional(ErrorSource.PROC, lambda: self.coverage.observe(
                    ksm.get("full_scans"), by_pid, coverage_wanted), errors)
        return Readings(monotonic=self.clock(), wall=self.wall(), ksm=ksm, meminfo=meminfo, psi=psi,
                        ksmd_cpu_seconds=cpu, vms=tuple(vms) if vms is not None else None,
                        mergeable_rss=mergeable, estimate=self.estimate,
                        errors=tuple(errors), vm_source=vm_source, coverage=coverage)

    def _mergeable(self, vms: Optional[Tuple[VmReading, ...]], errors: Errors) -> Optional[Dict[int, int]]:
        """Mergeable memory of each process, as its anonymous RSS (Statm.anon); guests'
        own figures come from the VM readings."""
        guests: Dict[int, VmReading] = {v.pid: v for v in (vms or ()) if v.pid is not None}
        rest = self._optional(ErrorSource.PROC, lambda: self.procfs.mergeable_anon(skip=guests), errors)
        if rest is None:
            return None
        rest.update((pid, v.anon_rss or 0) for pid, v in guests.items() if guest_mergeable(v))
        return rest

    @staticmethod
    def _optional(source: ErrorSource, fn: Callable[[], T], errors: Errors) -> Optional[T]:
        try:
            return fn()
        except KsmctlError as e:
            errors.append((source, e.message))
        except OSError as e:
            errors.append((source, "%s: %s" % (getattr(e, "filename", "") or source, e.strerror or e)))
        return None


def guest_mergeable(v: VmReading) -> bool:
    """The kernel's word where ksm_stat gives it (ksm_mergeable, prctl merge-any: kernels
    from 2025 on). Before, a guest counts once ksmd has seen it, or from its configuration:
    QEMU marks guest RAM mergeable unless mem-merge=off or <nosharepages/> said not. Waiting
    for ksmd would hide a guest started while idle for hours: the kernel adds it just behind
    ksmd's cursor, and the idle scan reaches it after crawling the whole list."""
    k = v.ksm
    if k is not None and (k.mergeable or k.merge_any):
        return True
    if k is not None and k.mergeable is False:
        return False
    return bool(k is not None and k.rmap_items) or not v.excluded
