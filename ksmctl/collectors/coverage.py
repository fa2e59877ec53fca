"""Whether ksmd's last pass looked at the memory that grew (readings.Coverage).

When mergeable memory grows while ksmd is part-way through a pass, the policy counts a
pass more, since the kernel puts a new process just behind its cursor
(policy/strategies/adaptive/resume.py). Often the growth lies ahead of it (a guest that
registered while ksmd was parked joins the end of its list and faults its RAM in later),
and that pass is wasted: on the real-guest bench, one pass over the new guests' memory,
1 to 2 ksmd CPU-s each time guests start.
The host-level figures cannot tell: every QEMU holds about 66 MiB of anonymous memory
outside its mergeable mappings (bench/README.md, "Real guests with park"). Per process,
the Anonymous pages of the mergeable mappings against ksm_rmap_items can.

smaps walks a process's page tables, so it is read only when the policy asks (a pass
more is pending for growth), only at the tick that sees a pass boundary, and only for
the processes that grew since the tick before the boundary before (the pass that ended
started after it). At most MAX_PROCESSES of them: more, and the reading is None (the
pass more stays).

smaps is a ptrace-mode read (PTRACE_MODE_READ): root without CAP_SYS_PTRACE, as the
shipped systemd unit runs the daemon, cannot read it for processes of another user.
Those count as unreadable, and the pass more stays (docs/service.md)."""
from __future__ import annotations

from typing import Dict, Optional

from ksmctl.collectors.memlayout import parse_smaps
from ksmctl.collectors.procfs import ProcFs
from ksmctl.readings import Coverage

# A process counts as grown from this many pages (256 KiB) up; smaller growth is not read
# and counts as unseen.
GROWN_PAGES = 64
MAX_PROCESSES = 64


class CoverageCollector:
    def __init__(self, procfs: ProcFs) -> None:
        self.procfs = procfs
        self._full_scans: Optional[int] = None
        self._last: Dict[int, int] = {}       # pid -> anonymous bytes, the previous tick
        self._baseline: Dict[int, int] = {}   # the same at the tick before the last boundary

    def observe(self, full_scans: Optional[int], anon: Dict[int, int], wanted: bool) -> Optional[Coverage]:
        """Called every tick with each mergeable process's anonymous bytes; a reading at a
        boundary tick when wanted, else None."""
        boundary = full_scans is not None and self._full_scans is not None and full_scans > self._full_scans
        if full_scans is not None:
            self._full_scans = full_scans
        out = None
        if boundary:
            if wanted:
                out = self.read(anon, self._baseline)
            self._baseline = self._last
        self._last = anon
        return out

    def read(self, anon: Dict[int, int], baseline: Dict[int, int]) -> Optional[Coverage]:
        """None when it cannot tell: too many grown processes, or no ksm_rmap_items (before
        Linux 6.1). A process gone since is left out: its memory left ksmd's list with it.
        smaps needs ptrace access: the shipped unit's daemon cannot read it for guests that
        run as another user (libvirt-qemu, qemu) and counts them unreadable."""
        page = self.procfs.page_size
        grown = []
        unseen = 0
        for pid, size in anon.items():
            more = size - baseline.get(pid, 0)
            if more >= GROWN_PAGES * page:
                grown.append(pid)
            elif more > 0:
                unseen += more // page
        if len(grown) > MAX_PROCESSES:
            return None
        read = mergeable = rmap = unreadable = 0
        for pid in grown:
            stat, smaps = self.procfs.ksm_stat(pid), self.procfs.smaps(pid)
            if stat is None and smaps is None:
                continue
            if stat is None or stat.rmap_items is None:
                return None
            if smaps is None:   # another user's process, without CAP_SYS_PTRACE
                unreadable += 1
                continue
            pages = sum(m.anon for m in parse_smaps(smaps) if m.mergeable) // page
            read += 1
            mergeable += pages
            rmap += stat.rmap_items
            unseen += max(0, pages - stat.rmap_items)
        return Coverage(read, mergeable, rmap, unseen, unreadable)
