"""Other writers of /sys/kernel/mm/ksm, found at start (changes between ticks:
kernel/ownership.py).

KSM has one set of global knobs. Two managers writing them undo each other's
work silently (ksmtuned writes run=0 as soon as free memory recovers), so the
daemon refuses to start next to another writer unless forced.

Known writers, by what the distributions ship:
- ksmtuned (shell script): Debian/Ubuntu `ksmtuned` package, Proxmox
  `ksm-control-daemon`, RHEL 9+/Fedora `ksmtuned` package (older: qemu-kvm-common).
- ksm.service (oneshot `ksmctl start|stop`, C helper at /usr/sbin/ksmctl on
  Debian, /usr/libexec/ksmctl on RHEL/Fedora): writes run=1 at boot, run=0 on stop.
- MOM (`momd`, oVirt/vdsm's mom-vdsm.service): its KSM controller writes run,
  pages_to_scan and sleep_millisecs.
- The kernel's own scan-rate advisor (advisor_mode=scan-time) drives
  pages_to_scan itself; writing pages_to_scan then fails with EINVAL.
- Another `ksmctl daemon`.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from ksmctl.collectors.procfs import Process, ProcFs
from ksmctl.errors import ReadError, Refused
from ksmctl.kernel.sysfs import KsmSysfs

log = logging.getLogger(__name__)

SHELLS = frozenset({"sh", "bash", "dash", "ash", "busybox"})
INTERPRETERS = SHELLS | frozenset({"python", "python2", "python3"})


@dataclass(frozen=True)
class Conflict:
    """One other KSM writer; `how_to_stop` is a sentence an operator can act on."""

    kind: str  # ksmtuned | ksm.service | mom | advisor | ksmctl
    description: str
    how_to_stop: str
    pids: Tuple[int, ...] = ()

    def message(self) -> str:
        return "%s: %s" % (self.description, self.how_to_stop)


def _program(argv: Sequence[str], comm: str) -> str:
    """The program a process runs: the script for `bash /usr/sbin/ksmtuned`,
    `python3 /usr/sbin/momd` and `python3 -m ksmctl`, else argv[0]'s basename."""
    if not argv:
        return comm
    first = os.path.basename(argv[0])
    if first.rstrip("0123456789.") in INTERPRETERS:
        for arg in argv[1:]:
            if not arg.startswith("-"):
                return os.path.basename(arg)
    return first


class CoexistenceChecker:
    """Looks for other KSM writers under the given /proc, /sys and /run roots."""

    def __init__(self, proc_root: str = "/proc", sys_root: str = "/sys",
                 run_root: str = "/run", self_pid: Optional[int] = None,
                 systemctl: Optional[str] = None) -> None:
        self.proc = ProcFs(proc_root)
        self.sysfs = KsmSysfs(sys_root)
        self.run = Path(run_root)
        self.self_pid = os.getpid() if self_pid is None else self_pid
        self.systemctl = systemctl

    # -- processes ---------------------------------------------------------

    def _processes(self) -> Iterator[Process]:
        """User processes (kernel threads and zombies write nothing); an unlistable
        /proc finds none, it does not stop the daemon from starting."""
        try:
            yield from self.proc.processes()
        except ReadError as exc:
            log.debug("%s", exc.message)

    def process_conflicts(self) -> List[Conflict]:
        found: Dict[str, List[int]] = {}
        for pid, argv, comm in self._processes():
            if pid == self.self_pid:
                continue
            prog = _program(argv, comm)
            if comm == "ksmtuned" or prog == "ksmtuned":
                found.setdefault("ksmtuned", []).append(pid)
            elif prog == "momd" or comm == "momd":
                found.setdefault("mom", []).append(pid)
            elif prog in ("ksmctl", "ksmctl.cli") and "daemon" in argv and "--dry-run" not in argv:
                # a --dry-run daemon only decides and logs: it writes nothing
                found.setdefault("ksmctl", []).append(pid)
        out = []
        for kind, pids in sorted(found.items()):
            pids.sort()
            out.append(_process_conflict(kind, tuple(pids)))
        return out

    # -- kernel ------------------------------------------------------------

    def advisor_conflict(self) -> Optional[Conflict]:
        path = self.sysfs.path("advisor_mode")
        if not self.sysfs.has("advisor_mode"):
            return None  # kernel before 6.9: no advisor
        try:
            mode = self.sysfs.read_choice("advisor_mode")[0]
        except ReadError as e:
            log.debug("%s", e.message)
            return None
        if mode == "none":
            return None
        return Conflict(
            "advisor",
            "the kernel's KSM advisor is active (%s shows [%s]); it sets pages_to_scan "
            "itself" % (path, mode),
            "turn it off with `echo none > %s`, or start with --force" % path,
        )

    # -- systemd units -----------------------------------------------------

    def unit_conflicts(self, units: Sequence[str] = ("ksm.service",)) -> List[Conflict]:
        """Active writer units that leave no process behind (ksm.service is a
        oneshot: run=1 at start, run=0 when stopped). Only asked when systemd is
        the running init (sd_booted: /run/systemd/system exists)."""
        if not (self.run / "systemd" / "system").is_dir():
            return []
        systemctl = self.systemctl or shutil.which("systemctl")
        if not systemctl:
            return []
        out = []
        for unit in units:
            try:
                rc = subprocess.run([systemctl, "is-active", "--quiet", unit],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, timeout=10).returncode
            except (OSError, subprocess.SubprocessError) as exc:
                log.debug("systemctl is-active %s failed: %s", unit, exc)
                continue
            if rc == 0:
                name = unit[:-len(".service")] if unit.endswith(".service") else unit
                out.append(Conflict(
                    unit,
                    "%s is active (it writes run=1 at boot and run=0 when stopped)" % unit,
                    "stop it with `systemctl stop %s` and `systemctl disable %s`, or start "
                    "with --force" % (name, name),
                ))
        return out

    def scan(self, advisor_is_ours: bool = False) -> List[Conflict]:
        """All other writers found now.

        advisor_is_ours: the previous run of this daemon (its state file says so)
        turned the advisor on, so finding it active after a restart is no rival.
        """
        conflicts = self.process_conflicts()
        advisor = None if advisor_is_ours else self.advisor_conflict()
        if advisor is not None:
            conflicts.append(advisor)
        conflicts.extend(self.unit_conflicts())
        return conflicts


def _process_conflict(kind: str, pids: Tuple[int, ...]) -> Conflict:
    pid_text = "pid %s" % ", ".join(str(p) for p in pids) if len(pids) == 1 else \
        "pids %s" % ", ".join(str(p) for p in pids)
    if kind == "ksmtuned":
        return Conflict(kind, "ksmtuned is running (%s)" % pid_text,
                        "stop it with `systemctl stop ksmtuned` and `systemctl disable "
                        "ksmtuned`, or start with --force", pids)
    if kind == "mom":
        return Conflict(kind, "MOM (momd, oVirt/vdsm's memory overcommit manager) is running "
                        "(%s); its KSM controller writes run, pages_to_scan and "
                        "sleep_millisecs" % pid_text,
                        "stop it with `systemctl stop mom-vdsm momd`, or remove the KSM "
                        "controller from its configuration, or start with --force", pids)
    return Conflict(kind, "another ksmctl daemon is running (%s)" % pid_text,
                    "stop it with `systemctl stop ksmctl` (or kill %s), or start with "
                    "--force" % " ".join(str(p) for p in pids), pids)


def check_or_refuse(conflicts: Sequence[Conflict], force: bool) -> List[Conflict]:
    """Raise Refused naming what to stop; with force, warn and carry on."""
    if not conflicts:
        return []
    if force:
        for c in conflicts:
            log.warning("--force: starting next to another KSM writer: %s", c.description)
        return list(conflicts)
    lines = ["refusing to start: another KSM writer is active "
             "(two writers undo each other's settings)"]
    lines.extend("  - " + c.message() for c in conflicts)
    raise Refused("\n".join(lines))
