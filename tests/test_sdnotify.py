"""The notify protocol against a real AF_UNIX datagram socket, as systemd listens."""
from __future__ import annotations

import os
import socket
import time
import uuid

import pytest

from ksmctl.service.sdnotify import Notifier


def _receiver(tmp_path, abstract: bool):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = "ksmctl-test-%s" % uuid.uuid4().hex
        sock.bind("\0" + name)
        env_value = "@" + name
    else:
        path = str(tmp_path / "notify.sock")
        sock.bind(path)
        env_value = path
    sock.settimeout(5)
    return sock, env_value


def _fields(datagram: bytes):
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_messages_arrive_in_order(tmp_path, abstract):
    sock, addr = _receiver(tmp_path, abstract)
    with sock:
        n = Notifier({"NOTIFY_SOCKET": addr})
        assert n.enabled
        before = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
        assert n.ready()
        assert n.status("saving 3.2 GiB, policy default,\nscanning 800 pages/20 ms")
        assert n.watchdog()
        assert n.reloading()
        assert n.ready()
        assert n.stopping()
        got = [sock.recv(4096) for _ in range(6)]
        after = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
        n.close()

    assert got[0] == b"READY=1"
    # A newline in the text would start a new protocol field: it is folded.
    assert got[1] == b"STATUS=saving 3.2 GiB, policy default, scanning 800 pages/20 ms"
    assert got[2] == b"WATCHDOG=1"
    reload_fields = _fields(got[3])
    assert list(reload_fields) == ["RELOADING", "MONOTONIC_USEC"]
    assert reload_fields["RELOADING"] == "1"
    assert before <= int(reload_fields["MONOTONIC_USEC"]) <= after
    assert got[4] == b"READY=1"
    assert got[5] == b"STOPPING=1"


def test_silent_without_notify_socket():
    n = Notifier({})
    assert not n.enabled
    assert n.ready() is False
    assert n.status("x") is False
    assert n.watchdog() is False
    assert n.reloading() is False
    assert n.watchdog_interval() is None


def test_default_env_is_process_environment(monkeypatch, tmp_path):
    sock, addr = _receiver(tmp_path, abstract=False)
    with sock:
        monkeypatch.setenv("NOTIFY_SOCKET", addr)
        n = Notifier()
        assert n.ready()
        assert sock.recv(64) == b"READY=1"


def test_send_errors_never_raise(tmp_path, caplog):
    # The manager went away: the socket path no longer exists.
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.enabled
    caplog.set_level("DEBUG", logger="ksmctl.service.sdnotify")
    assert n.ready() is False
    assert n.watchdog() is False
    assert "gone.sock" in caplog.text
    # A receiver appearing later is reached again (the socket is recreated).
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sock:
        sock.bind(str(tmp_path / "gone.sock"))
        sock.settimeout(5)
        assert n.watchdog() is True
        assert sock.recv(64) == b"WATCHDOG=1"


def test_unsupported_address_is_disabled():
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_watchdog_interval_is_half_of_watchdog_usec():
    pid = str(os.getpid())
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval() == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}).watchdog_interval() == 15.0
    # Meant for another process (we were forked from the service's main process).
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval() is None
    assert Notifier({"WATCHDOG_USEC": "soon"}).watchdog_interval() is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval() is None
