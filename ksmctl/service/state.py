"""The daemon's state file (/run/ksmctl/state.json): what the CLI shows about a running
daemon. Written atomically (temp file + rename) so a reader never sees half a file.

Ownership: the file carries "format": "ksmctl-state", and ksmctl never replaces or
deletes a file at that path that does not (a path typed wrong in the config must not
cost someone their file). One daemon per state file: the daemon holds an flock on
"<state file>.lock", which also holds its pid, so a second one is refused naming it.
A --dry-run daemon writes "<name>-dry-run.json" beside the service's file, never the
service's own; readers (status, vms) fall back to it when no service daemon runs.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ksmctl.errors import Refused, UsageError
from ksmctl.fsutil import atomic_write, read_input
from ksmctl.readings import (KSM_FIELDS, MAX_WALL, PAGE_SIZE_MAX, PAGE_SIZE_MIN, VM_FIELDS, VmReading, ksm_cell,
                              vm_dicts, vm_head)

STATE_FORMAT = "ksmctl-state"
MAX_STATE_BYTES = 64 * 1024 * 1024  # ~100x the file of a 500-VM host
PID_MAX = 2 ** 31 - 1                 # pid_t; 0 and -1 would mean "every process" to kill()
_BIG = 2 ** 63
# Keys every state file ksmctl has written carries: files from before the format key
# are still ksmctl's own.
_LEGACY_KEYS = frozenset(("version", "pid", "started", "updated", "ticks", "policy"))


def dry_run_path(path: str) -> str:
    """/run/ksmctl/state.json -> /run/ksmctl/state-dry-run.json"""
    p = Path(path)
    return str(p.with_name(p.stem + "-dry-run" + p.suffix))


# -- reading: the shape the CLI relies on, checked before anything uses it ----------------
class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


_Int = Field(default=None, ge=0, le=_BIG)


class _KsmStatDoc(_Doc):
    rmap_items: Optional[int] = _Int
    zero_pages: Optional[int] = _Int
    merging_pages: Optional[int] = _Int
    process_profit: Optional[int] = Field(default=None, ge=-_BIG, le=_BIG)
    merge_any: Optional[bool] = None
    mergeable: Optional[bool] = None


class _VmDoc(_Doc):
    uuid: str = ""
    name: str = ""
    state: str = "running"
    pid: Optional[int] = Field(default=None, ge=1, le=PID_MAX)
    source: str = "libvirt"
    balloon_current: Optional[int] = _Int
    balloon_maximum: Optional[int] = _Int
    rss: Optional[int] = _Int
    anon_rss: Optional[int] = _Int
    guest_available: Optional[int] = _Int
    guest_usable: Optional[int] = _Int
    guest_unused: Optional[int] = _Int
    guest_swap_in: Optional[int] = _Int
    guest_swap_out: Optional[int] = _Int
    guest_major_faults: Optional[int] = _Int
    ksm: Optional[_KsmStatDoc] = None
    excluded: bool = False


class _KsmDoc(_Doc):
    values: Dict[str, int] = {}
    page_size: int = Field(default=4096, ge=PAGE_SIZE_MIN, le=PAGE_SIZE_MAX)


class _ReadingsDoc(_Doc):
    ksm: Optional[_KsmDoc] = None
    vms: Union[None, List[Dict[str, Any]], Dict[str, Any]] = None


class _PolicyDoc(_Doc):
    name: Optional[str] = None
    path: Optional[str] = None
    sha256: Optional[str] = None
    interval: Optional[float] = None


class DecisionDoc(_Doc):
    """A decision as the state file and traces hold it (trace.decision_to_dict)."""

    run_rule: str
    scan_rule: str
    reasons: List[str] = []
    targets: Dict[str, Union[int, str]] = {}
    ksmd_cpu_percent: Optional[float] = None


class ReloadDoc(_Doc):
    count: int = Field(ge=0, le=_BIG)
    ok: bool
    message: str = ""
    at: Optional[float] = None


class _StateDoc(_Doc):
    format: Optional[Literal["ksmctl-state"]] = None
    pid: Optional[int] = Field(default=None, ge=1, le=PID_MAX)
    updated: Optional[float] = Field(default=None, ge=0, le=MAX_WALL)
    started: Optional[float] = None
    dry_run: bool = False
    status: Optional[str] = None
    policy: Optional[_PolicyDoc] = None
    decision: Optional[DecisionDoc] = None
    readings: Optional[_ReadingsDoc] = None
    reload: Optional[ReloadDoc] = None


def _problem(e: ValidationError) -> str:
    """The first problem's key and pydantic's message, never the value (the file may be
    anything)."""
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "top level"
    return "%s: %s" % (key, err["msg"])


def parse_state(text: str, path: str) -> Dict[str, Any]:
    """The state document, checked: every field the CLI reads has its type. A file of
    any other shape is a UsageError (exit 2) naming the file and the key."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        where = " (line %d, column %d)" % (e.lineno, e.colno) if isinstance(e, json.JSONDecodeError) else ""
        raise UsageError("%s: not a ksmctl state file: not JSON%s" % (path, where)) from None
    if not isinstance(data, dict):
        raise UsageError("%s: not a ksmctl state file: the top level is not an object" % path)
    try:
        _StateDoc.model_validate(data)
        readings = data.get("readings")
        if isinstance(readings, dict) and readings.get("vms") is not None:
            rows = vm_dicts(readings["vms"])
            if rows is None:
                raise UsageError("%s: not a ksmctl state file: readings.vms: neither a table nor a list" % path)
            for row in rows:
                _VmDoc.model_validate(row)
    except ValidationError as e:
        raise UsageError("%s: not a ksmctl state file: %s" % (path, _problem(e))) from None
    except RecursionError:
        raise UsageError("%s: not a ksmctl state file: nested too deeply" % path) from None
    return data


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except PermissionError:
        return True
    except (OSError, ValueError, TypeError, OverflowError):
        return False


def read_state(path: str, require_alive: bool = True) -> Optional[Dict[str, Any]]:
    """The daemon's last state (checked by parse_state), or None when there is no file,
    it may not be read (not root), or the daemon that wrote it is gone (a stale file
    after a crash is not a running daemon). Anything else is a UsageError."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    except OSError as e:
        raise UsageError("%s: cannot read state file: %s" % (path, e.strerror or e)) from None
    if stat.S_ISREG(st.st_mode) and not os.access(path, os.R_OK):
        return None  # not root: no daemon visible, as before
    data = parse_state(read_input(path, "ksmctl state", MAX_STATE_BYTES).text, path)
    if require_alive and not _alive(data.get("pid")):
        return None
    return data


def find_state(path: str) -> Optional[Dict[str, Any]]:
    """The service daemon's state, else a dry-run daemon's beside it (dry_run: true)."""
    if "\0" in path or not Path(path).name:  # "", "/": no file name to put "-dry-run" in
        raise UsageError("%r: not a state file path (expected the path of a file)" % path[:80])
    state = read_state(path)
    return state if state is not None else read_state(dry_run_path(path))


# -- writing: one daemon, and only over its own file ---------------------------------------
def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


class VmRows:
    """readings.vms in the state file (readings.vms_table's form), encoded row by row and
    each row once per VmReading object: the collectors hand out the same object while a
    guest's figures are unchanged. When a guest's reading is new but only its ksm cell
    changed (KSM merging), the rest of its row is reused. The same bytes json.dumps writes
    for vms_table; holds only the last write's VMs."""

    def __init__(self) -> None:
        self._head = '{"fields":%s,"ksm_fields":%s,"rows":[' % (_dumps(list(VM_FIELDS) + ["ksm"]),
                                                                 _dumps(list(KSM_FIELDS)))
        # uuid -> (vm, its VM_FIELDS cells, their JSON without the closing bracket, the row)
        self._cache: Dict[str, Tuple[VmReading, Tuple[Any, ...], str, str]] = {}

    def encode(self, vms: Sequence[VmReading]) -> str:
        old, new = self._cache, {}
        rows = []
        for vm in vms:
            hit = old.get(vm.uuid)
            if hit is None or hit[0] is not vm:
                cells = vm_head(vm)
                prefix = hit[2] if hit is not None and hit[1] == cells else _dumps(list(cells))[:-1]
                hit = (vm, cells, prefix, "%s,%s]" % (prefix, _dumps(ksm_cell(vm.ksm))))
            new[vm.uuid] = hit
            rows.append(hit[3])
        self._cache = new
        return self._head + ",".join(rows) + "]}"


class StateFile:
    """The state file one daemon writes. acquire() takes the lock (Refused, exit 4, when
    another daemon holds it) and refuses a file at the path that ksmctl did not write."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock_path = path + ".lock"
        self._lock_fd: Optional[int] = None
        self._written: Optional[Tuple[int, int]] = None  # (st_dev, st_ino) of our last write
        self._rows = VmRows()
        self._slot = "ksmctl-vm-rows-" + secrets.token_hex(16)  # where write() splices them in

    def acquire(self) -> "StateFile":
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        fd = self._open_lock()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise Refused("another ksmctl daemon%s is using the state file %s (it holds %s); stop it, or give "
                          "this one its own state_file" % (" (pid %s)" % holder if holder else "", self.path,
                                                           self.lock_path)) from None
        if _read_pid(fd, strict=True) is False:
            os.close(fd)
            raise Refused("%s: not a ksmctl lock file (it holds something else); left alone, move it away"
                          % self.lock_path)
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"%d\n" % os.getpid(), 0)
        self._lock_fd = fd
        if not self._ours():
            self.release()
            raise Refused("%s: exists and was not written by ksmctl; left alone: move it away, or set another "
                          "state_file" % self.path)
        return self

    def _open_lock(self) -> int:
        try:
            st = os.lstat(self.lock_path)
            if not stat.S_ISREG(st.st_mode):
                raise Refused("%s: not a regular file; ksmctl's lock file must be one" % self.lock_path)
        except FileNotFoundError:
            pass
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         0o644)
        except OSError as e:
            raise Refused("%s: cannot open the state file's lock: %s" % (self.lock_path, e.strerror or e)) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise Refused("%s: not a regular file; ksmctl's lock file must be one" % self.lock_path)
        return fd

    def _ours(self) -> bool:
        """Whether the path may be replaced or deleted: absent, our last write, or a
        ksmctl state file (format key, or the keys of one from before it)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return True
        if not stat.S_ISREG(st.st_mode):
            return False
        if (st.st_dev, st.st_ino) == self._written:
            return True
        try:
            data = json.loads(read_input(self.path, "ksmctl state", MAX_STATE_BYTES).text)
        except (UsageError, ValueError, RecursionError):
            return False
        return isinstance(data, dict) and (data.get("format") == STATE_FORMAT or _LEGACY_KEYS <= set(data))

    def write(self, state: Dict[str, Any], vms: Optional[Sequence[VmReading]] = None) -> None:
        """OSError (EEXIST) when the file there now is not ksmctl's: the daemon logs it.
        vms: state["readings"]["vms"] as VmReadings, written in vms_table's form (VmRows)."""
        if not self._ours():
            raise OSError(errno.EEXIST, "it exists and was not written by ksmctl (left alone)", self.path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        doc = {"format": STATE_FORMAT, **state}
        readings = doc.get("readings")
        if vms is None or not isinstance(readings, dict):
            text = _dumps(doc)
        else:
            doc["readings"] = dict(readings, vms=self._slot)
            text = _dumps(doc).replace('"%s"' % self._slot, self._rows.encode(vms), 1)
        atomic_write(self.path, text.encode())
        st = os.stat(self.path)
        self._written = (st.st_dev, st.st_ino)

    def remove(self) -> None:
        """On stop: delete the file, if it is still ours."""
        if self._ours():
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock; the lock file stays
            self._lock_fd = None


def _read_pid(fd: int, strict: bool = False) -> Union[int, None, bool]:
    """The pid a lock file holds; None when empty; with strict, False when it holds
    anything but a pid (then it is not ours to truncate)."""
    try:
        raw = os.pread(fd, 64, 0)
    except OSError:
        return None
    if not raw.isascii():
        return False if strict else None
    text = raw.decode("ascii").strip()
    if not text:
        return None
    if text.isdigit() and len(text) <= 8:
        return int(text)
    return False if strict else None


def write_state(path: str, state: Dict[str, Any]) -> None:
    """One write without the lock (tests and tools); refuses a file ksmctl did not write."""
    StateFile(path).write(state)
