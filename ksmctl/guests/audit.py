"""The audit: a guest whose effective setting is deny must share no pages.

Checked every tick from what the collector read (ksm_stat) and, for guests ksmctl
manages, from QEMU's own `merge` property (a qom-set behind ksmctl's back shows there
before ksmd has merged anything). Each violation episode is logged once and counted once.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Set

log = logging.getLogger("ksmctl.guests")

# QEMU's RAM outside memory-backend objects (firmware, option ROMs, video memory) stays
# mergeable under mem-merge=on and has no run-time switch: measured at 64 pages on a lab
# guest after merge=false. Up to this many merging pages of a denied guest are that.
RESIDUAL_PAGES = 256
# A process's ksm_merging_pages falls only as ksmd's scan reaches the unmerged memory
# (it drops the rmap items then), so merging pages are a violation only from the second
# full pass after the deny was first seen in effect.
GRACE_PASSES = 2


class Audit:
    def __init__(self) -> None:
        self.violations_total = 0
        self._open: Set[str] = set()  # UUIDs in a violation episode now
        self._since: Dict[str, Optional[int]] = {}  # UUID -> full_scans when its deny was first seen in effect

    def check(self, uuid: str, name: str, denied: bool, merging_pages: Optional[int],
              backend_merge_on: bool = False, full_scans: Optional[int] = None) -> Optional[str]:
        """Why this guest violates its deny now (None when it does not); counts and logs
        a violation only when its episode begins. full_scans None: no grace (one look)."""
        why = None
        if not denied:
            self._since.pop(uuid, None)
        else:
            since = self._since.setdefault(uuid, full_scans)
            settled = full_scans is None or since is None or full_scans >= since + GRACE_PASSES
        if denied and backend_merge_on:
            why = "its RAM backend has merge=on again (set behind ksmctl's back)"
        elif denied and settled and merging_pages is not None and merging_pages > RESIDUAL_PAGES:
            why = "ksm_stat shows %d merging pages" % merging_pages
        if why is None:
            self._open.discard(uuid)
            return None
        if uuid not in self._open:
            self._open.add(uuid)
            self.violations_total += 1
            log.warning("merge violation: guest %s (%s) must share no pages, but %s", name, uuid, why)
        return why

    def forget(self, keep: Set[str]) -> None:
        """Drop guests that are gone, so a UUID that comes back starts a new episode."""
        self._open &= keep
        self._since = {u: v for u, v in self._since.items() if u in keep}
