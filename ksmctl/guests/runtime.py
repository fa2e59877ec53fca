"""The merge settings ksmctl changed on running guests, kept under the state dir.

A QEMU process forgets nothing while it runs, but ksmctl may restart: this file lets a
restarted daemon know which settings were its own (to restore them at stop when
restore_on_exit says so) and lets `ksmctl merge` and the daemon see each other's changes.
An entry belongs to one QEMU process (its pid): when the guest's QEMU restarts, the new
process starts from its domain XML again and the entry is dropped.
"""
from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from ksmctl.errors import StrEnum, UsageError
from ksmctl.fsutil import atomic_write

FILE_NAME = "merge-runtime.json"
VERSION = 1


class ChangedBy(StrEnum):
    CLI = "cli"         # `ksmctl merge on|off`: the operator's, kept until `merge` again or QEMU restarts
    POLICY = "policy"   # the daemon, applying the policy's vms section


@dataclass(frozen=True)
class RuntimeChange:
    uuid: str
    name: str
    pid: int
    merge: bool                     # what ksmctl set
    by: ChangedBy
    why: str = ""                   # the rule, or the command
    original: Dict[str, Optional[bool]] = field(default_factory=dict)  # backend id -> merge before ksmctl

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "pid": self.pid, "merge": self.merge, "by": str(self.by), "why": self.why,
                "original": dict(self.original)}


def _parse(uuid: str, d: Any, where: str) -> RuntimeChange:
    try:
        orig = d.get("original") or {}
        if not isinstance(orig, dict) or not all(v is None or isinstance(v, bool) for v in orig.values()):
            raise ValueError("original")
        if not isinstance(d["merge"], bool) or isinstance(d["pid"], bool) or not isinstance(d["pid"], int):
            raise ValueError("merge/pid")
        return RuntimeChange(uuid=uuid, name=str(d["name"]), pid=d["pid"], merge=d["merge"],
                             by=ChangedBy(d["by"]), why=str(d.get("why", "")),
                             original={str(k): v for k, v in orig.items()})
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UsageError("%s: guest %s: not a ksmctl runtime merge entry (expected name, pid, merge: true|false, "
                         "by: cli|policy, original); move the file away to start afresh" % (where, uuid)) from None


class RuntimeChanges:
    """Read-modify-write under an flock, so the CLI and the daemon never lose each other's entries."""

    def __init__(self, state_dir: str) -> None:
        self.path = Path(state_dir) / FILE_NAME
        self._cache: Optional[Dict[str, RuntimeChange]] = None
        self._stamp: Optional[tuple] = None

    def _stat(self) -> Optional[tuple]:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def load(self) -> Dict[str, RuntimeChange]:
        """Entries by UUID; re-read only when the file changed (the daemon asks every tick)."""
        stamp = self._stat()
        if self._cache is not None and stamp == self._stamp:
            return dict(self._cache)
        self._cache, self._stamp = self._read(), stamp
        return dict(self._cache)

    def _read(self) -> Dict[str, RuntimeChange]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise UsageError("cannot read %s: %s" % (self.path, e.strerror)) from None
        try:
            data = json.loads(text)
        except ValueError:
            raise UsageError("%s: not JSON; move it away to start afresh" % self.path) from None
        if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("guests"), dict):
            raise UsageError("%s: expected {\"version\": %d, \"guests\": {...}}" % (self.path, VERSION))
        return {u: _parse(u, d, str(self.path)) for u, d in data["guests"].items()}

    @contextmanager
    def edit(self) -> Iterator[Dict[str, RuntimeChange]]:
        """The entries to change in place; written back (atomically) on success."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            entries = self._read()
            before = dict(entries)
            yield entries
            if entries != before:
                body = {"version": VERSION, "guests": {u: c.to_dict() for u, c in sorted(entries.items())}}
                atomic_write(self.path, (json.dumps(body, indent=1) + "\n").encode(), 0o600)
            self._cache, self._stamp = entries, self._stat()
        finally:
            os.close(fd)
