"""Stops ksmd exactly at a pass boundary, between two ticks: the policy's park (why: see
policy/strategies/adaptive/park.py). A ksmd batch ends where a pass ends, and ksmd then
sleeps sleep_millisecs before the next pass's first batch; pages_to_scan written as 0 in
that sleep leaves its cursor at the head of its list.

The daemon polls full_scans every POLL_SECONDS while a park is armed. The write counts as
in time only when it finished within half the sleep of the last poll that still saw the
pass running (ksmd sleeps whole jiffies, and may wake up to one early). A late write is
taken back: the policy's next tick then reads pages_to_scan as it was, "not parked",
which is what it must believe when the cursor may have moved on.
"""
from __future__ import annotations

import enum
import time
from dataclasses import replace
from typing import Callable, Optional

from ksmctl.errors import KsmctlError
from ksmctl.kernel.sysfs import KsmSysfs
from ksmctl.kernel.writer import Change, KsmWriter
from ksmctl.readings import KsmState

POLL_SECONDS = 0.005


class ParkOutcome(enum.Enum):
    parked = "parked"          # pages_to_scan 0 within ksmd's sleep after the boundary
    late = "late"              # the boundary came and went unseen in time: nothing written
    failed = "failed"          # full_scans unreadable or the write refused


class BoundaryPark:
    """One armed park: stop ksmd when full_scans reaches `target`. `state` is the KSM state
    after this tick's writes (the writer writes only what differs from it)."""

    def __init__(self, sysfs: KsmSysfs, writer: KsmWriter, state: KsmState, target: int, sleep_ms: int,
                 wrote: Callable[[Change], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.sysfs, self.writer, self.state = sysfs, writer, state
        self.target, self.wrote, self.clock = target, wrote, clock
        self.window = sleep_ms / 2000.0   # half of ksmd's sleep after the batch that ends the pass
        self.clear: Optional[float] = None   # the last poll that saw full_scans below target
        self.error: Optional[str] = None

    def carry(self, earlier: Optional["BoundaryPark"]) -> "BoundaryPark":
        """Keep the earlier park's last clear poll when it watched for the same boundary (a
        tick fell in the pass): a boundary during the tick is then still judged in time."""
        if earlier is not None and earlier.target == self.target and self.clear is None:
            self.clear = earlier.clear
        return self

    def poll(self) -> Optional[ParkOutcome]:
        """None while the pass runs; the outcome once it has ended."""
        try:
            scans = self.sysfs.read_int("full_scans")
        except KsmctlError as e:
            self.error = e.message
            return ParkOutcome.failed
        now = self.clock()
        if scans < self.target:
            self.clear = now
            return None
        if scans > self.target or self.clear is None or now - self.clear > self.window:
            return ParkOutcome.late
        try:
            self.writer.apply({"pages_to_scan": 0}, self.state, wrote=self.wrote)
            if self.clock() - self.clear > self.window:   # ksmd may have started the next pass
                parked = replace(self.state, values={**self.state.values, "pages_to_scan": 0})
                self.writer.apply({"pages_to_scan": self.state.values["pages_to_scan"]}, parked, wrote=self.wrote)
                return ParkOutcome.late
        except KsmctlError as e:
            self.error = e.message
            return ParkOutcome.failed
        return ParkOutcome.parked
