"""Where the kernel is written: the one writer of every KSM knob.

It validates each value against its row of kernel/knobs.py, writes only what changed,
in an order the kernel accepts (Knob.write_order), and turns the kernel's refusals into
messages that say what to do. What we wrote and what was there before (for restore,
for drift) is kernel/ownership.py's business, not the writer's.
"""
from __future__ import annotations

import errno
import logging
import re
from dataclasses import dataclass
from typing import Callable, List, Mapping, Optional, Tuple

from ksmctl.errors import KernelWriteError, KsmctlError, PermissionDenied, Refused, UsageError
from ksmctl.kernel import knobs
from ksmctl.kernel.knobs import RUN_UNMERGE, Kind, KnobValue
from ksmctl.kernel.sysfs import KsmSysfs
from ksmctl.readings import KsmState, MemInfo
from ksmctl.units import format_bytes

log = logging.getLogger("ksmctl.writer")

UNMERGE_MARGIN_FRACTION = 0.05
UNMERGE_MARGIN_MIN = 256 * 1024 * 1024
# What counts as a number: ASCII digits, optionally negative (so "-5" is reported as out of
# range). int() would also take "+2", " 2", "1_0" and "٢", and let run=2 past the unmerge guard.
_NUMBER = re.compile(r"-?[0-9]+", re.ASCII)


@dataclass(frozen=True)
class Change:
    knob: str
    old: Optional[KnobValue]
    new: KnobValue


def _unknown(name: str) -> UsageError:
    return UsageError("unknown KSM knob %r; writable knobs: %s" % (name, ", ".join(sorted(knobs.writable_names()))))


def parse_number(name: str, value: object, allowed: str) -> int:
    """The integer a person or a policy meant, or UsageError naming knob, value and range."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return int(value.strip())
    raise UsageError("%s: %r is not a whole number; allowed: %s" % (name, value, allowed))


def validate_value(name: str, value: object, state: Optional[KsmState] = None) -> KnobValue:
    """The value as the kernel will take it, or UsageError naming knob, value and range."""
    k = knobs.find(name)
    if k is None or not k.writable:
        raise _unknown(name)
    if state is not None and name in state.unsupported:
        raise UsageError("%s is not supported by this kernel" % name)
    if k.kind is Kind.CHOICE:
        allowed = (state.advisor_modes if state is not None and state.advisor_modes else k.choices)
        if value not in allowed:
            raise UsageError("%s: %r is not allowed; allowed: %s" % (name, value, ", ".join(allowed)))
        return str(value)
    number = parse_number(name, value, k.range_text())
    if not k.lo <= number <= k.hi:
        raise UsageError("%s: %d is out of range; allowed: %s" % (name, number, k.range_text()))
    return number


def unmerge_margin(meminfo: MemInfo) -> int:
    """What MemAvailable must keep after an unmerge (host-wide or one guest's)."""
    return max(int(meminfo.total * UNMERGE_MARGIN_FRACTION), UNMERGE_MARGIN_MIN)


def unmerge_need(state: KsmState, meminfo: MemInfo) -> Tuple[int, int]:
    """(bytes unmerging would allocate, bytes of safety margin). Refused when a counter
    it adds up cannot be read: a missing count must not read as "nothing is merged"."""
    for name in ("pages_sharing", "ksm_zero_pages"):
        if name in state.values or (name in state.unsupported and name != "pages_sharing"):
            continue
        why = state.unreadable.get(name, "%s is not available" % name)
        raise Refused("refusing to unmerge: cannot tell how much memory it would allocate (%s)" % why)
    return state.saved_bytes, unmerge_margin(meminfo)


def unmerge_refusal(state: KsmState, meminfo: MemInfo) -> Optional[str]:
    """Why the memory guard refuses run=2 now, or None when the host can absorb it."""
    need, margin = unmerge_need(state, meminfo)
    if need + margin <= meminfo.available:
        return None
    return ("refusing to unmerge: it would allocate %s (pages_sharing + ksm_zero_pages) and keep a margin "
            "of %s, but MemAvailable is %s. Free memory first, or use --force to risk the OOM killer."
            % (format_bytes(need), format_bytes(margin), format_bytes(meminfo.available)))


class KsmWriter:
    """Writes /sys/kernel/mm/ksm through a KsmSysfs (so tests can aim it at a fixture tree)."""

    def __init__(self, sysfs: KsmSysfs, dry_run: bool = False) -> None:
        self.sysfs = sysfs
        self.dry_run = dry_run

    def plan(self, targets: Mapping[str, object], state: KsmState) -> List[Change]:
        """Validated changes, in write order; knobs already at their target are left out."""
        checked = {}
        for name, value in targets.items():
            if name in state.unsupported:
                continue  # e.g. advisor_mode on a pre-6.9 kernel: nothing to hold there
            checked[name] = validate_value(name, value, state)
        changes = []
        for name in sorted(checked, key=lambda n: knobs.knob(n).write_order(checked[n])):
            cur = state.current(name)
            if cur != checked[name]:
                changes.append(Change(name, cur, checked[name]))
        return changes

    def apply(self, targets: Mapping[str, object], state: KsmState,
              wrote: Optional[Callable[[Change], None]] = None) -> List[Change]:
        """Write the plan (dry run: only return it). `wrote` hears of each write as it
        succeeds, so a refusal halfway still leaves the earlier ones on record.
        run=2 is refused: see unmerge()."""
        changes = self.plan(targets, state)
        if any(c.knob == "run" and c.new == RUN_UNMERGE for c in changes):
            raise Refused("run=2 (unmerge) goes through KsmWriter.unmerge(), which checks memory first")
        if not self.dry_run:
            for c in changes:
                self._write(c.knob, c.new, state)
                if wrote is not None:
                    wrote(c)
        return changes

    def unmerge(self, state: KsmState, meminfo: MemInfo, force: bool = False) -> Tuple[int, int]:
        """run=2: break every merged page apart. Refused unless MemAvailable can absorb
        the copies plus a margin, because on a host without swap that is an OOM."""
        refusal = unmerge_refusal(state, meminfo)
        if refusal is not None and not force:
            raise Refused(refusal)
        if not self.dry_run:
            self._write("run", RUN_UNMERGE, state)
        return unmerge_need(state, meminfo)

    def _write(self, name: str, value: KnobValue, state: Optional[KsmState]) -> None:
        try:
            with open(self.sysfs.path(name), "w") as f:
                f.write("%s\n" % value)
        except OSError as e:
            err = self._explain(name, value, e, state)
            err.knob = name
            raise err from None

    def _explain(self, name: str, value: KnobValue, e: OSError, state: Optional[KsmState]) -> KsmctlError:
        path = self.sysfs.path(name)
        k = knobs.find(name)
        if e.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
            return PermissionDenied("requires root to write %s (writing %s=%s to %s: %s)"
                                    % (self.sysfs.dir, name, value, path, e.strerror))
        if e.errno == errno.EINVAL and name == "pages_to_scan":
            return KernelWriteError("the kernel refused pages_to_scan=%s: while advisor_mode is scan-time the "
                                    "kernel's advisor owns the scan rate; set advisor_mode=none first" % value)
        if e.errno == errno.EBUSY and k is not None and k.needs_unmerged:
            shared = state.values.get("pages_shared") if state is not None else None
            return KernelWriteError("the kernel refused %s=%s: it cannot change while pages are merged "
                                    "(pages_shared=%s); unmerge first with `ksmctl unmerge`" % (name, value, shared))
        if e.errno == errno.ENOENT:
            return UsageError("%s is not supported by this kernel (%s does not exist)" % (name, path))
        return KernelWriteError("the kernel refused %s=%s (%s: %s)" % (name, value, path, e.strerror or e))
