"""Stopping ksmd exactly at a pass boundary (scan.adaptive.park). mm/ksm.c adds a process
that starts while ksmd is part-way through a pass just behind its cursor, so that pass
never sees it: a guest that starts while ksmd idles mid-list costs the rest of a pass
more (resume.py). Parked at a boundary, the cursor is the head of ksmd's list, a new
process joins the end of it, and the next pass sees it, as after a fresh start.

The park is armed in the last pass the policy needs: the pace keeps a sleep of at least
PARK_SLEEP_MS between batches, and the daemon (kernel/park.py) watches full_scans until
the next tick and writes pages_to_scan 0 in the sleep after the batch that ended the
pass (a batch stops at the boundary). When it cannot write in time it writes nothing;
the next tick then finds pages_to_scan as it was, and the policy goes on as without park
(its check, then the idle scan)."""
from __future__ import annotations

from typing import Optional

from ksmctl.policy.model import Adaptive
from ksmctl.policy.strategies.adaptive.state import AdaptiveState, Tick

# ksmd's sleep after the batch that ends the armed pass: the daemon's window to write
# pages_to_scan 0 before the next pass starts (kernel/park.py writes only within half of it).
PARK_SLEEP_MS = 50


def park_target(ad: Adaptive, tick: Tick, st: AdaptiveState) -> Optional[int]:
    """The full_scans at which to park ksmd: set while the pass in progress is the last one
    the policy needs."""
    if not ad.park or st.verifying or st.need_passes - st.passes != 1:
        return None
    return tick.now.full_scans + 1
