"""Assembles one tick's Readings from sysfs, /proc and the VM collector.

Failure policy, explicit: KSM sysfs or /proc/meminfo unreadable -> the tick is skipped
(CollectionFailed; the policy cannot decide without them). PSI, ksmd CPU, per-VM data
and mergeable memory are optional: a failure leaves that part None and is recorded in
Readings.errors, so the exporter counts it and drops only those series.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, List, Optional, Tuple

from ksmctl.errors import KsmctlError, ReadError
from ksmctl.readings import EstimateSummary, Readings
from ksmctl.collectors.procfs import ProcFs
from ksmctl.kernel.sysfs import KsmSysfs

log = logging.getLogger("ksmctl.collect")


class CollectionFailed(KsmctlError):
    """A reading the policy cannot do without failed: skip this tick."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(message)
        self.source = source


class HostCollector:
    def __init__(self, sysfs: KsmSysfs, procfs: ProcFs, vms: Optional[object] = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 track_mergeable: bool = True) -> None:
        self.sysfs = sysfs
        self.procfs = procfs
        self.vms = vms  # anything with .collect() -> Tuple[VmReading, ...]
        self.clock = clock
        self.wall = wall
        self.track_mergeable = track_mergeable
        self.estimate: Optional[EstimateSummary] = None  # set by the periodic estimator
        self._reported: List[Tuple[str, str]] = []  # errors from background work, for the next tick

    def report_error(self, source: str, message: str) -> None:
        self._reported.append((source, message))

    def collect(self) -> Readings:
        errors: List[Tuple[str, str]] = []
        while self._reported:
            errors.append(self._reported.pop(0))
        try:
            ksm = self.sysfs.read()
        except KsmctlError as e:
            raise CollectionFailed("sysfs", e.message) from None
        for name, why in ksm.unreadable.items():
            errors.append(("sysfs", why))
        try:
            meminfo = self.procfs.meminfo()
        except ReadError as e:
            raise CollectionFailed("proc", e.message) from None
        psi = self._optional("proc", self.procfs.psi, errors)
        cpu = self._optional("proc", self.procfs.ksmd_cpu_seconds, errors)
        vms: Optional[object] = ()
        if self.vms is not None:
            vms = self._optional("libvirt", self.vms.collect, errors)
            errors.extend(getattr(self.vms, "errors", ()))  # per-domain problems this tick
        mergeable = self._mergeable(vms, errors) if self.track_mergeable else None
        return Readings(monotonic=self.clock(), wall=self.wall(), ksm=ksm, meminfo=meminfo, psi=psi,
                        ksmd_cpu_seconds=cpu, vms=tuple(vms) if vms is not None else None,
                        mergeable_rss=mergeable, estimate=self.estimate,
                        errors=tuple(errors))

    def _mergeable(self, vms: Optional[object], errors: List[Tuple[str, str]]) -> Optional[int]:
        """Mergeable RSS of all processes; guests' own figures come from the VM readings."""
        guests = {v.pid: v for v in (vms or ()) if v.pid is not None and v.ksm is not None}  # type: ignore[union-attr]
        rest = self._optional("proc", lambda: self.procfs.mergeable_rss(skip=guests), errors)
        if rest is None:
            return None
        return rest + sum(v.rss or 0 for v in guests.values()
                          if v.ksm.mergeable or v.ksm.merge_any or (v.ksm.mergeable is None and v.ksm.rmap_items))

    @staticmethod
    def _optional(source: str, fn: Callable[[], object], errors: List[Tuple[str, str]]):
        try:
            return fn()
        except KsmctlError as e:
            errors.append((source, e.message))
        except OSError as e:
            errors.append((source, "%s: %s" % (getattr(e, "filename", "") or source, e.strerror or e)))
        return None
