"""Whether this process may run a scan, checked before it starts.

Without CAP_SYS_ADMIN pagemap reads as zero frame numbers and without CAP_SYS_PTRACE
other users' memory is unreadable: the scan would "succeed" with wrong or empty figures,
so a missing capability is refused up front, naming the systemd drop-in that grants it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

from ksmctl.errors import PermissionDenied

CAP_SYS_PTRACE, CAP_SYS_ADMIN = 19, 21
_NEEDED_CAPS = ((CAP_SYS_PTRACE, "CAP_SYS_PTRACE", "to read other users' process memory"),
                (CAP_SYS_ADMIN, "CAP_SYS_ADMIN", "for page frame numbers in pagemap"))


def missing_capabilities(status_text: str) -> List[str]:
    """Capabilities the scan needs that CapEff in /proc/self/status lacks (root can lack them
    too, e.g. under the shipped unit's CapabilityBoundingSet)."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            try:
                eff = int(line.split()[1], 16)
            except (IndexError, ValueError):
                return []
            return ["%s (%s)" % (name, why) for bit, name, why in _NEEDED_CAPS if not eff >> bit & 1]
    return []


def check_capabilities(proc_root: str) -> None:
    """PermissionDenied unless root with the capabilities above."""
    if os.geteuid() != 0:
        raise PermissionDenied(
            "ksmctl estimate needs root: it reads other processes' memory and their "
            "frame numbers through /proc/<pid>/pagemap")
    try:
        status = (Path(proc_root) / "self" / "status").read_text()
    except OSError:
        return   # a fixture /proc tree has no `self`
    missing = missing_capabilities(status)
    if missing:
        raise PermissionDenied(
            "the estimate runs as root but without %s. Under the shipped systemd unit, "
            "grant them with a drop-in (systemctl edit ksmctl): [Service] "
            "CapabilityBoundingSet=CAP_SYS_PTRACE CAP_SYS_ADMIN" % " and ".join(missing))
