"""When an idle ksmd looks at everything once more. The idle scan (hours per pass on a
large host) is cheap, but what it has not reached yet waits: pairs the kernel's unstable
tree lost in a pass (bench/README.md: up to 42% of the fill workload's contents), the
trickle from guests that keep filling memory, and merges the kernel still counts after a
write broke them. A sweep is one full pass at the merging pace. They are spaced so that
they cost at most sweep_cpu of one core on average: the interval is what a pass of the
last phase cost in ksmd CPU-seconds, divided by sweep_cpu. Where ksmd's CPU time is
unknown there is no cost to space them by, and no sweeps."""
from __future__ import annotations

from typing import Optional

from ksmctl.policy.model import Adaptive
from ksmctl.policy.strategies.adaptive.state import AdaptiveState, Tick


def pass_cpu(state: AdaptiveState, tick: Tick) -> Optional[float]:
    """ksmd CPU-seconds per pass over the phase that ends at this tick; None when unknown."""
    start, now = state.phase_start, tick.now
    if start is None or start.ksmd_cpu is None or now.ksmd_cpu is None or state.passes <= 0:
        return None
    return max(0.0, now.ksmd_cpu - start.ksmd_cpu) / state.passes


def sweep_due(ad: Adaptive, tick: Tick, state: AdaptiveState) -> Optional[str]:
    """The reason for a sweep now, or None while none is due."""
    if ad.sweep_cpu <= 0 or state.idle_at is None or state.pass_cpu is None:
        return None
    every = state.pass_cpu / ad.sweep_cpu
    idle_for = tick.now.monotonic - state.idle_at.monotonic
    if idle_for < every:
        return None
    return ("sweep: idle for %.0fs; one pass cost %.3g ksmd CPU-s, so a sweep every %.0fs costs %g of a core "
            "(sweep_cpu): one pass at the merging pace, after the end of the pass ksmd is in"
            % (idle_for, state.pass_cpu, every, ad.sweep_cpu))
