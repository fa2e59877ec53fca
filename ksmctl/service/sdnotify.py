"""The systemd notify protocol (sd_notify(3)) without libsystemd.

The daemon runs as Type=notify: systemd waits for READY=1, shows STATUS= in
`systemctl status`, kills and restarts the service when WATCHDOG=1 pings stop,
and holds `systemctl reload` until READY=1 follows RELOADING=1. Outside systemd
(no NOTIFY_SOCKET) every call is a silent no-op, so the daemon calls these
unconditionally. A failed send never reaches the caller: losing a status line
must not stop KSM management.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Mapping, Optional

log = logging.getLogger(__name__)


def _monotonic_usec() -> int:
    # CLOCK_MONOTONIC, the clock systemd compares MONOTONIC_USEC against.
    return int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000)


def _address(value: str) -> Optional[str]:
    """NOTIFY_SOCKET is a filesystem path or '@name' for the abstract namespace."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # vsock: addresses (systemd >= 254, for VMs) are not used for host services.
    return None


class Notifier:
    """Sends state changes to the service manager named by NOTIFY_SOCKET."""

    def __init__(self, env: Optional[Mapping[str, str]] = None) -> None:
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        self._addr = _address(raw) if raw else None
        if raw and self._addr is None:
            log.debug("NOTIFY_SOCKET=%r is not a unix socket address; notifications off", raw)
        self._env = dict(env)
        self._sock: Optional[socket.socket] = None

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def send(self, *fields: str) -> bool:
        """Send one datagram of newline-separated KEY=VALUE fields; True if it went out."""
        if self._addr is None:
            return False
        message = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self._addr)
            return True
        except OSError as exc:
            log.debug("sd_notify %r to %r failed: %s", fields, self._addr, exc)
            self._close_socket()
            return False

    def ready(self) -> bool:
        return self.send("READY=1")

    def status(self, text: str) -> bool:
        # STATUS= is one line in systemctl status; a newline would start a new field.
        return self.send("STATUS=" + " ".join(str(text).splitlines()))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def reloading(self) -> bool:
        # systemd >= 253 requires MONOTONIC_USEC with RELOADING=1 (Type=notify-reload);
        # older versions ignore the extra field.
        return self.send("RELOADING=1", "MONOTONIC_USEC=%d" % _monotonic_usec())

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog_interval(self) -> Optional[float]:
        """Seconds between required WATCHDOG=1 pings (half of WatchdogSec), or None.

        As sd_watchdog_enabled(3): WATCHDOG_USEC applies only when WATCHDOG_PID is
        unset or names this process, so a child does not inherit the duty.
        """
        usec = self._env.get("WATCHDOG_USEC", "")
        if not usec:
            return None
        pid = self._env.get("WATCHDOG_PID", "")
        try:
            if pid and int(pid) != os.getpid():
                return None
            value = int(usec)
        except ValueError:
            log.debug("ignoring malformed WATCHDOG_USEC=%r / WATCHDOG_PID=%r", usec, pid)
            return None
        if value <= 0:
            return None
        return value / 2_000_000

    def close(self) -> None:
        self._close_socket()

    def _close_socket(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
