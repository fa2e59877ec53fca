"""Knobs the kernel takes only while nothing is merged (max_page_sharing,
merge_across_nodes: EBUSY while pages_shared > 0), changed the one safe way.

The steps, one per tick so the loop never blocks: refuse unless MemAvailable absorbs
the unmerged pages with the margin `ksmctl unmerge` keeps; unmerge (run=2); wait for
pages_shared to reach zero; write; let the policy's run target resume merging. Every
step is logged and reported in status(). A refusal or a failed write is not tried again
for the same wanted values: only a new target (a reload, another policy) or a restart
tries again, so a host that cannot absorb the unmerge is never asked twice in a row.
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple

from ksmctl.errors import KsmctlError
from ksmctl.readings import KsmState, MemInfo
from ksmctl.units import format_bytes

from .knobs import BY_NAME, KnobValue
from .writer import Change, KsmWriter, unmerge_need, unmerge_refusal

log = logging.getLogger("ksmctl.transition")


class Phase(str, enum.Enum):
    IDLE = "idle"
    UNMERGING = "unmerging"      # run=2 written, waiting for pages_shared to reach zero
    REFUSED = "refused"          # the memory guard said no; not retried for these values
    FAILED = "failed"            # the write failed; not retried for these values
    WOULD_UNMERGE = "would_unmerge"   # dry run: what it would do


@dataclass(frozen=True)
class Step:
    """What this tick does: the targets left for the ordinary write, and whether the
    policy's run target must wait (run=2 is being held)."""

    targets: Dict[str, object]
    hold_run: bool = False


class UnmergedOnlyChanges:
    def __init__(self, writer: KsmWriter, wrote: Optional[Callable[[Change], None]] = None) -> None:
        self.writer = writer
        self.wrote = wrote
        self.phase = Phase.IDLE
        self.pending: Dict[str, Tuple[Optional[KnobValue], KnobValue]] = {}
        self.message = ""
        self._gave_up_on: Optional[Dict[str, KnobValue]] = None
        self._raced = False   # one EBUSY from pages merged between read and write: unmerge next tick

    def status(self) -> Optional[Dict[str, object]]:
        if self.phase is Phase.IDLE and not self.pending:
            return None
        return {"phase": self.phase.value, "knobs": {k: list(v) for k, v in self.pending.items()},
                "message": self.message}

    def step(self, targets: Mapping[str, object], state: KsmState, meminfo: Optional[MemInfo]) -> Step:
        wanted = {k: v for k, v in targets.items()
                  if k in BY_NAME and BY_NAME[k].needs_unmerged and k not in state.unsupported
                  and state.current(k) != v}
        rest = {k: v for k, v in targets.items() if k not in wanted}
        if not wanted:
            if self.phase is not Phase.IDLE:
                self._set(Phase.IDLE, "done" if self.phase is Phase.UNMERGING else "")
            self.pending, self._gave_up_on = {}, None
            return Step(rest)
        values: Dict[str, KnobValue] = {k: v for k, v in wanted.items() if isinstance(v, (int, str))}
        self.pending = {k: (state.current(k), v) for k, v in values.items()}
        what = ", ".join("%s %s -> %s" % (k, state.current(k), v) for k, v in sorted(values.items()))
        if self._gave_up_on == values:
            return Step(rest)   # refused or failed for exactly these values: not again
        merged = state.get("pages_shared") or 0
        if self.writer.dry_run:
            self._set(Phase.WOULD_UNMERGE, "dry run: %s needs nothing merged; would unmerge %s first"
                      % (what, self._need(state, meminfo)) if merged else "dry run: would write %s" % what)
            return Step(rest)
        if merged == 0:
            return self._write(values, state, rest, what)
        if self.phase is Phase.UNMERGING:
            return Step(rest, hold_run=True)   # still draining; ksmd unmerges at its own pace
        if meminfo is None:
            return self._give_up(Phase.REFUSED, values, rest, "%s needs nothing merged, and MemAvailable cannot "
                                 "be read: not unmerging" % what)
        try:
            refusal = unmerge_refusal(state, meminfo)
        except KsmctlError as e:
            refusal = e.message
        if refusal is not None:
            return self._give_up(Phase.REFUSED, values, rest, "%s needs nothing merged: %s" % (what, refusal))
        try:
            self.writer.unmerge(state, meminfo)
        except KsmctlError as e:
            return self._give_up(Phase.FAILED, values, rest, "%s: unmerging failed: %s" % (what, e.message))
        if self.wrote is not None:
            self.wrote(Change("run", state.get("run"), 2))
        self._set(Phase.UNMERGING, "%s: the kernel takes it only while nothing is merged; unmerging %s (run=2), "
                  "then writing it and resuming" % (what, self._need(state, meminfo)))
        return Step(rest, hold_run=True)

    def _write(self, values: Dict[str, KnobValue], state: KsmState, rest: Dict[str, object], what: str) -> Step:
        try:
            self.writer.apply(values, state, wrote=self.wrote)
        except KsmctlError as e:
            if self.phase is not Phase.UNMERGING and not self._raced and "while pages are merged" in e.message:
                self._raced = True   # ksmd merged something since the read: take the unmerge path
                self._set(Phase.IDLE, "%s: pages were merged meanwhile (EBUSY); unmerging first" % what)
                return Step(rest)
            return self._give_up(Phase.FAILED, values, rest, "%s: %s" % (what, e.message))
        self._raced = False
        self._set(Phase.IDLE, "%s written%s" % (what, " after unmerging" if self.phase is Phase.UNMERGING else ""))
        self.pending, self._gave_up_on = {}, None
        return Step(rest)

    def _give_up(self, phase: Phase, values: Dict[str, KnobValue], rest: Dict[str, object], message: str) -> Step:
        self._gave_up_on = dict(values)
        self._set(phase, message + " (not tried again until the policy asks for other values)")
        return Step(rest)

    def _set(self, phase: Phase, message: str) -> None:
        if message and message != self.message:
            (log.warning if phase in (Phase.REFUSED, Phase.FAILED) else log.info)("%s", message)
        self.phase, self.message = phase, message

    @staticmethod
    def _need(state: KsmState, meminfo: Optional[MemInfo]) -> str:
        if meminfo is None:
            return "the merged pages"
        try:
            need, _margin = unmerge_need(state, meminfo)
        except KsmctlError:
            return "the merged pages"
        return format_bytes(need)


def explain(targets: Mapping[str, object], state: KsmState, meminfo: Optional[MemInfo]) -> Dict[str, str]:
    """What applying targets would do to the knobs that need nothing merged, and to knobs
    this kernel lacks, in words (for `ksmctl policy explain`)."""
    out: Dict[str, str] = {}
    merged = state.get("pages_shared") or 0
    for name, value in sorted(targets.items()):
        if name in state.unsupported:
            out[name] = "not supported by this kernel: skipped, the rest of the policy applies"
            continue
        k = BY_NAME.get(name)
        if k is None or not k.needs_unmerged or state.current(name) == value:
            continue
        change = "%s -> %s" % (state.current(name), value)
        if not merged:
            out[name] = "%s, written at once (nothing is merged)" % change
        elif meminfo is None:
            out[name] = "%s needs nothing merged, and MemAvailable cannot be read: refused" % change
        else:
            try:
                need, margin = unmerge_need(state, meminfo)
                refusal = unmerge_refusal(state, meminfo)
            except KsmctlError as e:
                out[name] = "%s needs nothing merged: refused: %s" % (change, e.message)
                continue
            out[name] = ("%s needs nothing merged: would unmerge %s first (MemAvailable %s, margin %s): %s"
                         % (change, format_bytes(need), format_bytes(meminfo.available), format_bytes(margin),
                            "allowed" if refusal is None else "refused"))
    return out
