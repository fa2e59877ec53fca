"""Builds a Daemon from config: the one place where the parts are wired together
(collectors, policy, writer, notifier, exporter), so each part stays testable alone."""
from __future__ import annotations

import logging
import os
from typing import Any, List, Optional

from ksmctl.collectors.host import HostCollector
from ksmctl.collectors.procfs import ProcFs
from ksmctl.kernel.sysfs import KsmSysfs
from ksmctl.collectors.vms import VmCollector
from ksmctl.service.coexist import CoexistenceChecker, check_or_refuse
from ksmctl.config import Config, load_config
from ksmctl.service.daemon import Daemon
from ksmctl.errors import ErrorSource, PermissionDenied
from ksmctl.estimate.schedule import PeriodicEstimate
from ksmctl.export.http import build_exporter
from ksmctl.extras import require as require_extra
from ksmctl.kernel.writer import KsmWriter
from ksmctl.policy.loader import load_policy
from ksmctl.service.sdnotify import Notifier
from ksmctl.service.state import StateFile, dry_run_path

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
    state = StateFile(dry_run_path(config.state_file) if dry_run else config.state_file).acquire()
    d = Daemon(config, loaded, collector, writer, notifier=Notifier(),
               observers=observers, config_loader=lambda: load_config(config_path),
               policy_override=policy_name, state_file=state)
    if once:
        d.config = config.model_copy(update={"restore_on_exit": False})
    vms.on_change(d.request_tick)
    if config.libvirt:
        d.guests = make_guest_controller(config, procfs, dry_run)
    if not dry_run:
        d.on_shutdown.append(lambda: marker.sync(sysfs))
    if config.estimate.enabled and not once:
        require_extra("estimate", "estimate.enabled (the periodic estimate)")
        periodic = PeriodicEstimate(config.estimate, config.proc_root, config.sys_root,
                                    publish=lambda s: setattr(collector, "estimate", s),
                                    on_error=lambda m: collector.report_error(ErrorSource.ESTIMATE, m))
        periodic.start()
        d.on_shutdown.append(periodic.stop)
    if config.exporter.enabled or config.exporter.textfile:
        exporter = build_exporter(config.exporter, serve=not once)
        d.observers.append(exporter.observer)
        d.on_shutdown.append(exporter.stop)
    return d


def make_vm_collector(config: Config, procfs: ProcFs) -> VmCollector:
    """Per-VM readings from libvirt (unless config.libvirt is off), else QEMU in /proc."""
    return VmCollector(uri=config.libvirt_uri if config.libvirt else None, proc=procfs,
                       run_root=config.run_root)


def make_guest_controller(config: Config, procfs: ProcFs, dry_run: bool = False) -> Any:
    """Per-VM merge control (policy vms section, `ksmctl merge` changes, the audit)."""
    from ksmctl.guests.control import GuestController
    from ksmctl.guests.qmp import Qmp
    from ksmctl.guests.runtime import RuntimeChanges
    return GuestController(Qmp(config.libvirt_uri), procfs, RuntimeChanges(config.state_dir), dry_run=dry_run)


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


