"""What ksmctl wrote to the KSM knobs, and what to do when someone else changes them.

KSM's knobs are global: ksmtuned, a person with `echo`, or another manager may write
one we set. One object keeps everything that follows from "we wrote this": the values
found before our first write (put back on stop, as tuned does), the last values written,
which external changes were already reported (so each is logged and counted once), and
the knobs we are backing off from. The daemon asks it which targets to write this tick
and tells it what the writer wrote; nothing else touches this state.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

from ksmctl.kernel import knobs
from ksmctl.kernel.knobs import KnobValue
from ksmctl.kernel.writer import Change
from ksmctl.readings import KsmState


class OnExternalChange(enum.Enum):
    """A policy's ownership.on_external_change. REASSERT: write our target again.
    BACK_OFF: leave their value for as long as our own target for that knob is unchanged."""

    REASSERT = "reassert"
    BACK_OFF = "back_off"


@dataclass(frozen=True)
class Drift:
    """A knob someone else changed: `first` is True once per external change, so it is
    logged and counted once, not every tick it persists."""

    knob: str
    expected: KnobValue
    found: KnobValue
    first: bool

    def message(self) -> str:
        return ("%s was changed by another writer: ksmctl wrote %s, it is now %s"
                % (self.knob, self.expected, self.found))


@dataclass(frozen=True)
class Plan:
    """One tick's answer: the targets to hand the writer, and the external changes seen."""

    targets: Dict[str, object]  # as the decision gave them; the writer validates
    drifts: Tuple[Drift, ...]

    @property
    def new_drifts(self) -> Tuple[Drift, ...]:
        return tuple(d for d in self.drifts if d.first)


class KnobOwnership:
    """The daemon's claim on the knobs it writes."""

    def __init__(self) -> None:
        self._original: Dict[str, Optional[KnobValue]] = {}  # found before our first write (None: unread)
        self._written: Dict[str, KnobValue] = {}    # what the kernel should show, by us
        self._reported: Dict[str, KnobValue] = {}   # external value already reported
        self._backing_off: Dict[str, object] = {}  # knob -> our target when we backed off

    # -- each tick ----------------------------------------------------------------------
    def plan(self, wanted: Mapping[str, object], state: KsmState,
             on_change: OnExternalChange = OnExternalChange.REASSERT) -> Plan:
        """Compare what we wrote with what the kernel shows, then say which of `wanted`
        to write: all of it (reassert), or all but the knobs we are backing off from."""
        back_off = on_change is OnExternalChange.BACK_OFF
        drifts = self._drifts(state)
        for d in drifts:
            if back_off:  # adopt their value: a later change of it is a new event
                self._backing_off[d.knob] = wanted.get(d.knob)
                self._written[d.knob] = d.found
                self._reported.pop(d.knob, None)
        targets = dict(wanted)
        for name, held in list(self._backing_off.items()):
            if back_off and name in targets and targets[name] == held:
                del targets[name]
            else:
                del self._backing_off[name]  # our target moved on (or the policy): ours again
        return Plan(targets, tuple(drifts))

    def _drifts(self, state: KsmState) -> List[Drift]:
        out = []
        for name, expected in self._written.items():
            found = state.current(name)
            if found is None:
                continue  # unsupported or unreadable this tick: no evidence of another writer
            if found == expected:
                self._reported.pop(name, None)
                continue
            first = self._reported.get(name) != found
            self._reported[name] = found
            out.append(Drift(name, expected, found, first))
        return out

    def wrote(self, change: Change) -> None:
        """The writer wrote this (KsmWriter.apply's `wrote`): remember the value found
        before our first write of the knob, and the value now written."""
        self._original.setdefault(change.knob, change.old)
        self._written[change.knob] = change.new

    # -- at stop ------------------------------------------------------------------------
    @property
    def has_original(self) -> bool:
        return bool(self._original)

    def restore_targets(self) -> Dict[str, KnobValue]:
        """The values found before our first write, for the restorable knobs. run=2 comes
        back as 0 (never unmerge); with the advisor restored to scan-time, pages_to_scan
        is the kernel's again, so it is left alone."""
        targets = {name: knobs.knob(name).restore_value(v) for name, v in self._original.items()
                   if v is not None and knobs.knob(name).restorable}
        if targets.get("advisor_mode") == "scan-time":
            targets.pop("pages_to_scan", None)
        return targets

    def restored(self) -> None:
        """Restore was tried: the originals are spent, whatever the kernel said."""
        self._original.clear()

    def written(self) -> Dict[str, KnobValue]:
        """A copy of what we last wrote (for the state file and tests)."""
        return dict(self._written)

    def original(self) -> Dict[str, Optional[KnobValue]]:
        return dict(self._original)
