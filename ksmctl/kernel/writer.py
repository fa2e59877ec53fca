"""Where the kernel is written: the one writer of every KSM knob.

It validates each value against what mm/ksm.c accepts, writes only what changed, in
an order the kernel accepts (advisor off before pages_to_scan, run last), turns the
kernel's refusals into messages that say what to do, and remembers the values it
found so they can be put back on stop (as tuned does).
"""
from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

from ksmctl.kernel.sysfs import KsmSysfs
from ksmctl.errors import KernelWriteError, PermissionDenied, Refused, UsageError
from ksmctl.readings import KsmState, MemInfo
from ksmctl.units import format_bytes

log = logging.getLogger("ksmctl.writer")

U32 = 2 ** 32 - 1
# knob -> (min, max) as the kernel accepts them (mm/ksm.c *_store functions).
NUMERIC_KNOBS: Dict[str, Tuple[int, int]] = {
    "run": (0, 2),
    "pages_to_scan": (0, U32),
    "sleep_millisecs": (0, U32),
    "use_zero_pages": (0, 1),
    "merge_across_nodes": (0, 1),
    "max_page_sharing": (2, 2 ** 31 - 1),
    "stable_node_chains_prune_millisecs": (0, U32),
    "smart_scan": (0, 1),
    "advisor_target_scan_time": (1, 2 ** 63 - 1),
    "advisor_max_cpu": (1, 100),
    "advisor_min_pages_to_scan": (1, 2 ** 63 - 1),
    "advisor_max_pages_to_scan": (1, 2 ** 63 - 1),
}
KNOBS = tuple(NUMERIC_KNOBS) + ("advisor_mode",)


def _write_order(knob: str, value: object) -> int:
    """advisor_mode=none before pages_to_scan (the advisor blocks it), scan-time after
    the scan knobs, run last so ksmd starts with the new settings."""
    if knob == "advisor_mode":
        return 0 if value == "none" else 2
    return 3 if knob == "run" else 1

UNMERGE_MARGIN_FRACTION = 0.05
UNMERGE_MARGIN_MIN = 256 * 1024 * 1024


@dataclass(frozen=True)
class Change:
    knob: str
    old: object
    new: object


def validate_value(knob: str, value: object, state: Optional[KsmState] = None) -> object:
    """The value as the kernel will take it, or UsageError naming knob, value and range."""
    if knob not in KNOBS:
        raise UsageError("unknown KSM knob %r; writable knobs: %s" % (knob, ", ".join(sorted(KNOBS))))
    if state is not None and knob in state.unsupported:
        raise UsageError("%s is not supported by this kernel" % knob)
    if knob == "advisor_mode":
        allowed = (state.advisor_modes if state is not None and state.advisor_modes else ("none", "scan-time"))
        if value not in allowed:
            raise UsageError("advisor_mode: %r is not allowed; allowed: %s" % (value, ", ".join(allowed)))
        return value
    lo, hi = NUMERIC_KNOBS[knob]
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip(), 10)
        except ValueError:
            raise UsageError("%s: %r is not a whole number; allowed: %d..%d" % (knob, value, lo, hi)) from None
    if not isinstance(value, int):
        raise UsageError("%s: %r is not a whole number; allowed: %d..%d" % (knob, value, lo, hi))
    if not lo <= value <= hi:
        raise UsageError("%s: %d is out of range; allowed: %d..%d" % (knob, value, lo, hi))
    return value


def _current(state: KsmState, knob: str) -> object:
    return state.advisor_mode if knob == "advisor_mode" else state.values.get(knob)


def unmerge_need(state: KsmState, meminfo: MemInfo) -> Tuple[int, int]:
    """(bytes unmerging would allocate, bytes of safety margin)."""
    need = state.saved_bytes
    margin = max(int(meminfo.total * UNMERGE_MARGIN_FRACTION), UNMERGE_MARGIN_MIN)
    return need, margin


class KsmWriter:
    """Writes /sys/kernel/mm/ksm through a KsmSysfs (so tests can aim it at a fixture tree)."""

    def __init__(self, sysfs: KsmSysfs, dry_run: bool = False) -> None:
        self.sysfs = sysfs
        self.dry_run = dry_run
        self.original: Dict[str, object] = {}  # first-seen value of every knob we changed
        self.last_written: Dict[str, object] = {}

    def plan(self, targets: Mapping[str, object], state: KsmState) -> List[Change]:
        """Validated changes, in write order; knobs already at their target are left out."""
        changes = []
        for knob in sorted(targets, key=lambda k: _write_order(k, targets[k])):
            if knob in state.unsupported:
                continue  # e.g. advisor_mode on a pre-6.9 kernel: nothing to hold there
            value = validate_value(knob, targets[knob], state)
            cur = _current(state, knob)
            if cur != value:
                changes.append(Change(knob, cur, value))
        return changes

    def apply(self, targets: Mapping[str, object], state: KsmState) -> List[Change]:
        changes = self.plan(targets, state)
        if any(c.knob == "run" and c.new == 2 for c in changes):
            raise Refused("run=2 (unmerge) goes through KsmWriter.unmerge(), which checks memory first")
        for c in changes:
            self.original.setdefault(c.knob, c.old)
            if not self.dry_run:
                self._write(c.knob, c.new, state)
            self.last_written[c.knob] = c.new
        return changes

    def _write(self, knob: str, value: object, state: Optional[KsmState]) -> None:
        path = self.sysfs.path(knob)
        try:
            with open(path, "w") as f:
                f.write("%s\n" % value)
        except OSError as e:
            raise self._explain(knob, value, e, state) from None

    def _explain(self, knob: str, value: object, e: OSError, state: Optional[KsmState]) -> Exception:
        path = self.sysfs.path(knob)
        if e.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
            return PermissionDenied("requires root to write /sys/kernel/mm/ksm (writing %s=%s to %s: %s)"
                                    % (knob, value, path, e.strerror))
        if e.errno == errno.EINVAL and knob == "pages_to_scan":
            return KernelWriteError("the kernel refused pages_to_scan=%s: while advisor_mode is scan-time the "
                                    "kernel's advisor owns the scan rate; set advisor_mode=none first" % value)
        if e.errno == errno.EBUSY and knob in ("merge_across_nodes", "max_page_sharing"):
            shared = state.values.get("pages_shared") if state is not None else None
            return KernelWriteError("the kernel refused %s=%s: it cannot change while pages are merged "
                                    "(pages_shared=%s); unmerge first with `ksmctl unmerge`" % (knob, value, shared))
        if e.errno == errno.ENOENT:
            return UsageError("%s is not supported by this kernel (%s does not exist)" % (knob, path))
        return KernelWriteError("the kernel refused %s=%s (%s: %s)" % (knob, value, path, e.strerror or e))

    def unmerge(self, state: KsmState, meminfo: MemInfo, force: bool = False) -> Tuple[int, int]:
        """run=2: break every merged page apart. Refused unless MemAvailable can absorb
        the copies plus a margin, because on a host without swap that is an OOM."""
        need, margin = unmerge_need(state, meminfo)
        if need + margin > meminfo.available and not force:
            raise Refused(
                "refusing to unmerge: it would allocate %s (pages_sharing + ksm_zero_pages) and keep a margin "
                "of %s, but MemAvailable is %s. Free memory first, or use --force to risk the OOM killer."
                % (format_bytes(need), format_bytes(margin), format_bytes(meminfo.available)))
        self.original.setdefault("run", state.values.get("run"))
        if not self.dry_run:
            self._write("run", 2, state)
        self.last_written["run"] = 2
        return need, margin

    def restore(self, state: KsmState) -> List[Change]:
        """Put back the values found before our first write. Never unmerges: if KSM was
        off, run=0 stops ksmd and merged pages stay merged until they are written."""
        targets = {k: v for k, v in self.original.items() if v is not None and k != "run"}
        if targets.get("advisor_mode") == "scan-time":
            targets.pop("pages_to_scan", None)  # the kernel's advisor sets it again
        if self.original.get("run") is not None:
            targets["run"] = 0 if self.original["run"] == 2 else self.original["run"]
        changes = []
        try:
            changes = self.apply(targets, state)
        finally:
            self.original.clear()
        return changes
