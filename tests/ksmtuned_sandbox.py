"""Debian's real /usr/sbin/ksmtuned in a private sandbox, stepped one tick at a time.

Used by tests/test_ksmtuned_real.py (its docstring explains the design). The sandbox is
a PID + mount namespace whose PID 1 is tests/ksmtuned_ns.py; inside it:

  /sys/kernel/mm/ksm   a fake directory (tests.fixtures.make_sys), bind-mounted
  /proc/meminfo        a fake file, rewritten in place before every tick
  /etc/ksmtuned.conf   a private one: the script's own defaults, plus DEBUG/LOGFILE
  `sleep`              a shim first on ksmtuned's PATH: it reports "tick done" on one
                       FIFO and blocks on another until the test says "next"

Nothing here ever writes the host's /sys/kernel/mm/ksm: before ksmtuned starts, the
sandbox checks (from inside, and again from outside through /proc/PID/root) that every
path ksmtuned touches is the fake (same st_dev and st_ino), and that a marker written to
the fake run file reads back through the namespace's /sys/kernel/mm/ksm/run.
"""
from __future__ import annotations

import errno
import json
import os
import select
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from tests.fixtures import make_sys
from tests.support import wait_for

KSMTUNED = "/usr/sbin/ksmtuned"
KSMTUNED_CONF = "/etc/ksmtuned.conf"
NS_SCRIPT = str(Path(__file__).with_name("ksmtuned_ns.py"))
KNOBS = ("run", "pages_to_scan", "sleep_millisecs")  # all that ksmtuned ever writes
UNWRITTEN = "unwritten"  # put in each knob before a tick: anything else afterwards was written
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
TIMEOUT = 15.0  # seconds for any one step (a tick takes tens of milliseconds)

# KSM as the kernel boots it: off, with its default scan rate.
BOOT_KNOBS = {"run": "0", "pages_to_scan": "100", "sleep_millisecs": "20"}

SHIM = """#!/bin/sh
# ksmtuned's `sleep` in the sandbox: report that the tick is done (and the interval
# ksmtuned asked for), then wait until the test says "next".
echo "$*" > '{ready}'
read next < '{go}'
"""

CONF = """# Private ksmtuned.conf for tests/test_ksmtuned_real.py: no KSM_* settings, so the
# script's own defaults apply; only its debug log, which shows what it saw and decided.
DEBUG=1
LOGFILE={log}
"""


@dataclass(frozen=True)
class Tick:
    writes: Dict[str, int]       # knob -> value ksmtuned wrote this tick
    debug: Tuple[str, ...]       # ksmtuned's debug lines of this tick (dates stripped)
    next_sleep: str              # the argument of the `sleep` that ended the tick


class SandboxError(AssertionError):
    pass


class Sandbox:
    """One ksmtuned run: make the fakes, enter the namespace, start(), tick() ..., close()."""

    def __init__(self, root: Path, meminfo: str) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ksm_dir = make_sys(root / "sys", overrides=BOOT_KNOBS) / "kernel" / "mm" / "ksm"
        self.meminfo = root / "meminfo"
        self.meminfo.write_text(meminfo)
        self.debug_log = root / "ksmtuned.debug"
        self.debug_log.touch()
        self.out_log = root / "ksmtuned.out"  # ksmtuned's stdout and stderr
        self.conf = root / "ksmtuned.conf"
        self.conf.write_text(CONF.format(log=self.debug_log))
        self.ready_fifo, self.go_fifo = root / "tick-done", root / "tick-next"
        os.mkfifo(self.ready_fifo)
        os.mkfifo(self.go_fifo)
        bin_dir = root / "bin"
        bin_dir.mkdir()
        shim = bin_dir / "sleep"
        shim.write_text(SHIM.format(ready=self.ready_fifo, go=self.go_fifo))
        shim.chmod(0o755)
        self.guest_bin = root / "guest-bin"  # see ksmtuned_ns._spawn_guest
        self.guest_bin.mkdir()
        (self.guest_bin / "qemu-system-x86_64").symlink_to(os.path.realpath(sys.executable))
        self.env = {"PATH": "%s:/usr/sbin:/usr/bin:/sbin:/bin" % bin_dir, "LANG": "C", "LC_ALL": "C",
                    "TZ": "UTC", "PIDFILE": str(root / "ksmtune.pid")}
        self.binds = [(str(self.ksm_dir), "/sys/kernel/mm/ksm"), (str(self.meminfo), "/proc/meminfo"),
                      (str(self.conf), KSMTUNED_CONF)]
        # O_RDWR keeps each FIFO open at both ends: the shim's opens never block or see EOF.
        self._ready = os.open(self.ready_fifo, os.O_RDWR | os.O_NONBLOCK)
        self._go = os.open(self.go_fifo, os.O_RDWR)
        self._ready_buf = b""
        self._out_buf = b""
        self._log_offset = 0
        self.proc: Optional[subprocess.Popen] = None
        self.host_pid: Optional[int] = None
        self.namespaces: Dict[str, str] = {}
        self.startup: Tuple[str, ...] = ()

    # -- the namespace ------------------------------------------------------------

    def enter(self) -> None:
        """Start the namespace's PID 1 and check the mounts from outside as well."""
        config = self.root / "ns.json"
        config.write_text(json.dumps({"binds": self.binds, "ksmtuned": KSMTUNED, "env": self.env,
                                      "log": str(self.out_log),
                                      "guest_bin": str(self.guest_bin)}))
        with open(self.root / "ns.err", "wb") as err:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
                 "--mount-proc", sys.executable, "-I", NS_SCRIPT, "init", str(config)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        hello = self._recv("the namespace to mount its fakes")
        if "error" in hello:
            raise SandboxError(hello["error"])
        self.host_pid = int(wait_for(self._ns_init_pid, TIMEOUT, "the namespace's PID 1"))
        for kind in ("mnt", "pid"):
            self.namespaces[kind] = os.readlink("/proc/%d/ns/%s" % (self.host_pid, kind))
        self._check_mounts()

    def _ns_init_pid(self) -> Optional[int]:
        """unshare's one child (found by its parent pid where /proc has no children file)."""
        assert self.proc is not None
        me = self.proc.pid
        try:
            children = Path("/proc/%d/task/%d/children" % (me, me)).read_text().split()
        except OSError:
            children = []
            for entry in os.listdir("/proc"):
                try:
                    stat = Path("/proc/%s/stat" % entry).read_text() if entry.isdigit() else ""
                except OSError:
                    continue
                if stat and int(stat.rsplit(")", 1)[1].split()[1]) == me:
                    children.append(entry)
        return int(children[0]) if children else None

    def _check_mounts(self) -> None:
        """Each real path, as the namespace sees it, is the fake; the host's are not."""
        inside = "/proc/%d/root" % self.host_pid
        for src, dst in self.binds:
            names = [""] + (sorted(os.listdir(src)) if os.path.isdir(src) else [])
            for n in names:
                s, d = os.path.join(src, n) if n else src, os.path.join(dst, n) if n else dst
                fake, seen, host = os.stat(s), os.stat(inside + d), os.stat(d)
                if (seen.st_dev, seen.st_ino) != (fake.st_dev, fake.st_ino):
                    raise SandboxError("inside the sandbox %s is not the fake %s" % (d, s))
                if (host.st_dev, host.st_ino) == (fake.st_dev, fake.st_ino):
                    raise SandboxError("the fake %s leaked onto the host's %s" % (s, d))
        marker = "marker-%s" % uuid.uuid4().hex
        run = self.ksm_dir / "run"
        run.write_text(marker + "\n")
        try:
            seen_run = Path(inside + "/sys/kernel/mm/ksm/run").read_text().strip()
        finally:
            run.write_text(BOOT_KNOBS["run"] + "\n")
        if seen_run != marker:
            raise SandboxError("the sandbox's /sys/kernel/mm/ksm/run reads %r, not the marker" % seen_run)

    def _send(self, cmd: dict, what: str) -> dict:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        reply = self._recv(what)
        if "error" in reply:
            raise SandboxError("%s: %s%s" % (what, reply["error"], self._logs()))
        return reply

    def _recv(self, what: str) -> dict:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        line, self._out_buf = _read_line(fd, self._out_buf, TIMEOUT, what, self._logs)
        return json.loads(line)

    def _logs(self) -> str:
        parts = []
        for name in ("ns.err", "ksmtuned.out"):
            p = self.root / name
            text = p.read_text(errors="replace").strip() if p.exists() else ""
            if text:
                parts.append("\n%s:\n%s" % (name, text[-2000:]))
        return "".join(parts)

    # -- guests ---------------------------------------------------------------------

    def spawn_guest(self, kib: int) -> int:
        """A stand-in QEMU holding about `kib` KiB more than an idle Python; its namespace pid."""
        return int(self._send({"op": "guest", "kib": kib}, "a guest of %d KiB" % kib)["pid"])

    def stop_guest(self, pid: int) -> None:
        self._send({"op": "stop_guest", "pid": pid}, "guest %d to exit" % pid)

    def guest_rss(self) -> Dict[int, int]:
        """pid -> RSS in bytes, read as ksmctl's collectors read it (/proc/PID/statm
        resident pages x page size) from the namespace's /proc."""
        statm = self._send({"op": "statm"}, "the guests' statm")["statm"]
        return {int(pid): int(text.split()[1]) * PAGE_SIZE for pid, text in statm.items()}

    # -- ksmtuned -------------------------------------------------------------------

    def start(self) -> str:
        """Start ksmtuned; return once its loop sits in its first `sleep` (the argument)."""
        self._check_mounts()
        rc = self._send({"op": "start"}, "ksmtuned to start")["rc"]
        if rc != 0:
            raise SandboxError("ksmtuned exited %d%s" % (rc, self._logs()))
        interval = self._wait_tick_done("ksmtuned's first sleep")
        self.startup = self._new_debug()
        return interval

    def write_meminfo(self, text: str) -> None:
        self.meminfo.write_text(text)  # in place: the bind mount holds this inode

    def ksm_files(self) -> Dict[str, str]:
        return {p.name: p.read_text() for p in sorted(self.ksm_dir.iterdir())}

    def tick(self) -> Tick:
        """Let ksmtuned run one adjust(); return what it wrote and logged."""
        before = self.ksm_files()
        for k in KNOBS:
            (self.ksm_dir / k).write_text(UNWRITTEN + "\n")
        os.write(self._go, b"next\n")
        next_sleep = self._wait_tick_done("ksmtuned to finish a tick")
        after = self.ksm_files()
        writes = {}
        for k in KNOBS:
            value = after[k].strip()
            if value == UNWRITTEN:
                (self.ksm_dir / k).write_text(before[k])  # what the "kernel" still holds
            else:
                writes[k] = int(value)
        changed = [n for n in after if n not in KNOBS and after[n] != before[n]]
        if changed or set(after) != set(before):
            raise SandboxError("ksmtuned touched more than %s: %s" % (", ".join(KNOBS), changed))
        return Tick(writes, self._new_debug(), next_sleep)

    def _wait_tick_done(self, what: str) -> str:
        line, self._ready_buf = _read_line(self._ready, self._ready_buf, TIMEOUT, what, self._logs)
        return line.strip()

    def _new_debug(self) -> Tuple[str, ...]:
        with open(self.debug_log, "rb") as f:
            f.seek(self._log_offset)
            data = f.read()
        self._log_offset += len(data)
        # debug() writes "`/bin/date`: message"; the date holds no ": " (LANG=C).
        return tuple(line.split(": ", 1)[-1] for line in data.decode().splitlines())

    # -- the end ----------------------------------------------------------------------

    def close(self) -> None:
        """End the namespace (closing PID 1's stdin; SIGKILL if it lingers) and check that
        no process is left in it, so its mounts are gone too."""
        try:
            if self.proc is not None:
                try:
                    if self.proc.stdin:
                        self.proc.stdin.close()
                except OSError:
                    pass
                try:
                    self.proc.wait(timeout=TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.proc.kill()  # unshare --kill-child passes SIGKILL on to PID 1
                    self.proc.wait(timeout=TIMEOUT)
                if self.proc.stdout:
                    self.proc.stdout.close()
                if self.namespaces:
                    wait_for(lambda: not self._members(), TIMEOUT, "the sandbox's namespaces to empty")
        finally:
            os.close(self._ready)
            os.close(self._go)

    def _members(self) -> List[int]:
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if any(os.readlink("/proc/%s/ns/%s" % (entry, k)) == v for k, v in self.namespaces.items()):
                    out.append(int(entry))
            except OSError:
                continue
        return out

    def __enter__(self) -> "Sandbox":
        try:
            self.enter()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_line(fd: int, buf: bytes, timeout: float, what: str, logs) -> Tuple[str, bytes]:
    """One line from a non-blocking or pipe fd, within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SandboxError("timed out after %.0fs waiting for %s%s" % (timeout, what, logs()))
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError as e:
            if e.errno == errno.EAGAIN:
                continue
            raise
        if not chunk:
            raise SandboxError("end of file waiting for %s%s" % (what, logs()))
        buf += chunk
    line, _, rest = buf.partition(b"\n")
    return line.decode(), rest
