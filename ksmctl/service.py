"""Builds a Daemon from config: the one place where the parts are wired together
(collectors, policy, writer, notifier, exporter), so each part stays testable alone."""
from __future__ import annotations

import logging
import os
from typing import Any, List, Optional

from .collectors.host import HostCollector
from .collectors.procfs import ProcFs
from .collectors.sysfs import KsmSysfs
from .config import Config, load_config
from .daemon import Daemon, NullNotifier
from .errors import PermissionDenied
from .ksm_writer import KsmWriter
from .policy.loader import load_policy

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
    from .cli import make_vm_collector  # shared with the CLI's own VM view
    vms = make_vm_collector(config, procfs)
    collector = HostCollector(sysfs, procfs, vms=vms)
    writer = KsmWriter(sysfs, dry_run=dry_run)
    observers: List[Any] = []
    d = Daemon(config, loaded, collector, writer, notifier=_notifier(),
               observers=observers, config_loader=lambda: load_config(config_path),
               policy_override=policy_name)
    if once:
        d.config = config.model_copy(update={"restore_on_exit": False})
    # --- exporter wiring (ksmctl/exporter.py) ---
    # --- end exporter wiring ---
    return d


def _notifier() -> Any:
    try:
        from .sdnotify import Notifier
    except ImportError:
        return NullNotifier()
    return Notifier()
