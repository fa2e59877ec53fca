"""Whether one more full pass is worth what it costs. After the passes that every page
needs, the checking interval may still find merges: pages that changed while they were
scanned and have settled since (one more pass finds those), or a trickle from guests that
keep rewriting memory (one more pass finds a little of it, at the cost of a whole pass).
What tells them apart is the yield: the saving the checking interval (the last pass, on
kernels that do not count pages scanned) gained per ksmd CPU-second (per page scanned when
ksmd's CPU time is unknown), against the average of the merging phase before it. A pass is
worth it when that is at least min_pass_yield of it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ksmctl.policy.signals import Mark
from ksmctl.policy.strategies.adaptive.state import AdaptiveState, Tick

MIB = 1024 * 1024


@dataclass(frozen=True)
class Worth:
    interval: float   # what the checked span gained per unit of cost
    phase: float      # what the merging phase gained on average, per the same unit
    unit: str

    def enough(self, share: float) -> bool:
        return self.interval >= share * self.phase

    def describe(self, share: float, span: str) -> str:
        ratio = "" if self.phase <= 0 else " (%.1f%%)" % (100.0 * self.interval / self.phase)
        return "%s gained %.3g %s%s, the merging phase %.3g on average; a pass needs %g of it" % (
            span, self.interval, self.unit, ratio, self.phase, share)


def _cpu(a: Mark, b: Mark) -> Optional[float]:
    return None if a.ksmd_cpu is None or b.ksmd_cpu is None else b.ksmd_cpu - a.ksmd_cpu


def pass_worth(tick: Tick, state: AdaptiveState, since: Mark) -> Optional[Worth]:
    """The yield from `since` to this tick (the checking interval, or where the kernel does
    not count pages scanned the last pass) against the merging phase's before it; None when
    either span has no cost to divide by (then the pass runs)."""
    start, now = state.phase_start, tick.now
    if start is None:
        return None
    gain, phase_gain = now.saved_pages - since.saved_pages, since.saved_pages - start.saved_pages
    cpu, phase_cpu = _cpu(since, now), _cpu(start, since)
    if cpu is not None and phase_cpu is not None and cpu > 0 and phase_cpu > 0:
        mib = tick.page_size / MIB
        return Worth(gain * mib / cpu, phase_gain * mib / phase_cpu, "MiB saved per ksmd CPU-second")
    scanned, phase_scanned = tick.scanned(since, now), tick.scanned(start, since)
    if scanned > 0 and phase_scanned > 0:
        return Worth(1000.0 * gain / scanned, 1000.0 * phase_gain / phase_scanned, "new merges per 1000 pages")
    return None
