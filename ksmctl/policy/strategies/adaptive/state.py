"""What the adaptive strategy remembers, and what it reads from one tick."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

from ksmctl.policy.rules import AdaptiveMode, ScanRule
from ksmctl.policy.signals import Mark
from ksmctl.readings import Coverage


@dataclass(frozen=True)
class AdaptiveState:
    mode: AdaptiveMode = AdaptiveMode.merging
    passes: int = 0                          # full-scan boundaries seen since (re)start of merging
    last_pass_yield: Optional[float] = None  # new merges per 1000 pages scanned over the last tick
    need_passes: int = 0                     # boundaries to see before idling is allowed
    verifying: bool = False                  # passes done, checking one interval at verify_rate
    idle_mergeable: Optional[int] = None     # mergeable memory's low-water mark since passes were counted from 0
    phase_start: Optional[Mark] = None       # the counters when passes were counted from 0 (worth.py)
    pass_start: Optional[Mark] = None        # the counters at the tick that saw the last pass boundary
    idle_at: Optional[Mark] = None           # the counters when it last went idle (sweep.py)
    pass_cpu: Optional[float] = None         # ksmd CPU-seconds per pass of the phase before that
    park_at: Optional[int] = None            # full_scans at which ksmd is to stop (park.py)
    parked: bool = False                     # ksmd was stopped exactly at a pass boundary
    behind_growth: bool = False              # need_passes holds one more for growth behind the cursor (resume.py)

    def at_boundary(self, tick: "Tick") -> bool:
        """ksmd is parked at a pass boundary still: a process that starts now joins the end
        of its list, so the next pass sees it."""
        return self.parked and tick.parked

    def stopped(self) -> "AdaptiveState":
        """While KSM is stopped: merging again from pass 0 when it restarts."""
        return replace(self, mode=AdaptiveMode.merging, passes=0, park_at=None, parked=False)


@dataclass(frozen=True)
class Tick:
    now: Mark
    last: Optional[Mark]         # the previous tick; None on the first
    mergeable: Optional[int]     # bytes of MADV_MERGEABLE memory (None: unknown)
    rmap_pages: int              # pages ksmd holds (shared + sharing + unshared + volatile)
    page_size: int
    restarted: bool              # KSM starts this tick or was stopped by the policy before
    resumed: bool                # a restart after earlier ticks (not the very first tick)
    parked: bool = False         # pages_to_scan reads 0: ksmd scans nothing (park.py)
    coverage: Optional[Coverage] = None  # at a boundary: did the pass see the grown memory (passes.py)

    def list_pages(self) -> int:
        """The pages one full pass covers: ksmd's list, or the mergeable memory when larger
        (pages not yet faulted in)."""
        return max((self.mergeable or 0) // self.page_size, self.rmap_pages, 1)

    def scanned(self, a: Mark, b: Mark) -> int:
        """Pages ksmd scanned from a to b: its counter, or where the kernel has none (before
        Linux 6.7) the passes completed times the list. That is right to a tick when a and b
        both saw a pass boundary (passes.py asks only for those); from a phase's start
        (worth.py) it leaves out the part of a pass scanned before the first boundary."""
        if a.pages_scanned is not None and b.pages_scanned is not None:
            return b.pages_scanned - a.pages_scanned
        return (b.full_scans - a.full_scans) * self.list_pages()

    def grown(self, state: AdaptiveState) -> Optional[int]:
        """Growth of mergeable memory over its low-water mark; None when unknown."""
        if self.mergeable is None:
            return None
        return self.mergeable - (state.idle_mergeable or 0)


# A phase step: the new state, the rule, the reasons.
Step = Tuple[AdaptiveState, ScanRule, Tuple[str, ...]]
