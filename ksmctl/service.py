"""Builds a Daemon from config: the one place where the parts are wired together
(collectors, policy, writer, notifier, exporter), so each part stays testable alone."""
from __future__ import annotations

import logging
import os
from typing import Any, List, Optional

from .collectors.host import HostCollector
from .collectors.procfs import ProcFs
from .collectors.sysfs import KsmSysfs
from .collectors.vms import VmCollector
from .coexist import CoexistenceChecker, check_or_refuse
from .config import Config, load_config
from .daemon import Daemon
from .errors import KsmctlError, PermissionDenied
from .estimate_schedule import PeriodicEstimate
from .exporter import build_exporter
from .extras import require as require_extra
from .ksm_writer import KsmWriter
from .policy.loader import load_policy
from .sdnotify import Notifier

log = logging.getLogger("ksmctl.service")


def build_daemon(config: Config, config_path: Optional[str] = None, policy_name: Optional[str] = None,
                 dry_run: bool = False, force: bool = False, once: bool = False) -> Daemon:
    sysfs = KsmSysfs(config.sys_root)
    sysfs.require()
    if not dry_run and not os.access(sysfs.path("run"), os.W_OK):
        raise PermissionDenied("requires root to write /sys/kernel/mm/ksm (%s is not writable); "
                               "use --dry-run to only decide and log" % sysfs.path("run"))
    procfs = ProcFs(config.proc_root)
    loaded = load_policy(policy_name or config.policy)
    marker = AdvisorMarker(config.state_dir)
    if not dry_run:
        checker = CoexistenceChecker(config.proc_root, config.sys_root, config.run_root)
        check_or_refuse(checker.scan(advisor_is_ours=marker.exists()), force)
    vms = make_vm_collector(config, procfs)
    collector = HostCollector(sysfs, procfs, vms=vms)
    writer = KsmWriter(sysfs, dry_run=dry_run)
    observers: List[Any] = [marker.observe] if not dry_run else []
    d = Daemon(config, loaded, collector, writer, notifier=Notifier(),
               observers=observers, config_loader=lambda: load_config(config_path),
               policy_override=policy_name)
    if once:
        d.config = config.model_copy(update={"restore_on_exit": False})
    vms.on_change(d.request_tick)
    if not dry_run:
        d.on_shutdown.append(lambda: marker.sync(sysfs))
    if config.estimate.enabled and not once:
        require_extra("estimate", "estimate.enabled (the periodic estimate)")
        periodic = PeriodicEstimate(config.estimate, config.proc_root, config.sys_root,
                                    publish=lambda s: setattr(collector, "estimate", s),
                                    on_error=lambda m: collector.report_error("estimate", m))
        periodic.start()
        d.on_shutdown.append(periodic.stop)
    if config.exporter.enabled or config.exporter.textfile:
        exporter = build_exporter(config.exporter, serve=not once)
        d.observers.append(exporter.observer)
        d.on_shutdown.append(exporter.stop)
        _count_policy_errors(d, exporter.metrics)
    return d


def _count_policy_errors(d: Daemon, metrics: Any) -> None:
    """A rejected policy on reload counts as ksmctl_errors_total{source="policy"}."""
    load = d.policy_loader

    def counted(name: str) -> Any:
        try:
            return load(name)
        except KsmctlError:
            metrics.count_error("policy")
            raise

    d.policy_loader = counted


def make_vm_collector(config: Config, procfs: ProcFs) -> VmCollector:
    """Per-VM readings from libvirt (unless config.libvirt is off), else QEMU in /proc."""
    return VmCollector(uri=config.libvirt_uri if config.libvirt else None, proc=procfs,
                       run_root=config.run_root)


class AdvisorMarker:
    """Remembers, across restarts, that ksmctl itself turned the kernel's advisor on, so
    a restarted daemon does not mistake its own advisor for another writer's."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, "advisor-owned")

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def observe(self, rec: Any) -> None:
        ours = any(c.knob == "advisor_mode" for c in rec.changes)
        if not ours:
            return
        if rec.decision is not None and rec.decision.targets.get("advisor_mode") == "scan-time":
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            open(self.path, "w").close()
        elif self.exists():
            os.unlink(self.path)

    def sync(self, sysfs: KsmSysfs) -> None:
        """On stop: once the advisor is off again (restored), forget it was ours."""
        if self.exists() and sysfs.has("advisor_mode") and "[scan-time]" not in sysfs.read_raw("advisor_mode"):
            os.unlink(self.path)


