"""The real `ksmctl daemon` process as systemd runs it: a NOTIFY_SOCKET that is a real
AF_UNIX datagram socket, signals, other KSM writers, and knobs changed behind its back."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import List

import pytest

from ksmctl.service import install as inst
from ksmctl.errors import EXIT_REFUSED
from tests.ksmlock import KSM, ksm_exclusive
from tests.support import need, need_root, terminate, wait_for
from tests.test_coexist import real_ksmtuned  # noqa: F401  (fixture)

POLICY = """\
name: {name}
interval: {interval}
run:
  mode: always
scan:
  strategy: step
  pages_to_scan: {{initial: {pages}, min: {pages}, max: {pages}, boost: 0, decay: 0}}
  sleep_millisecs: {{base: 50, floor: 50, ceiling: 50}}
ownership:
  on_external_change: reassert
"""


class Receiver:
    """systemd's end of the notify socket: collects datagrams in arrival order."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.address = str(path)
        self.messages: List[str] = []

    def drain(self) -> List[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def count(self, prefix: str) -> int:
        return sum(1 for m in self.drain() if m.startswith(prefix))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def service(tmp_path):
    """Start `ksmctl --config FILE daemon ...` with NOTIFY_SOCKET; stop it afterwards."""
    procs = []
    rx = Receiver(tmp_path / "notify.sock")

    def start(*args: str, pages: int = 321, name: str = "e2e-a", notify: bool = True,
              interval: float = 0.3, extra_env=None):
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY.format(name=name, pages=pages, interval=interval))
        config = tmp_path / "config.yaml"
        config.write_text("policy: %s\nlibvirt: false\nstate_file: %s\nexporter:\n  enabled: false\n"
                          % (policy, tmp_path / "state.json"))
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        if notify:
            env["NOTIFY_SOCKET"] = rx.address
        env.update(extra_env or {})
        log = (tmp_path / "daemon.log").open("w")
        p = subprocess.Popen([inst.find_executable(), "--config", str(config), "daemon",
                              "--log-level", "debug", *args],
                             env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        p.policy, p.log = policy, tmp_path / "daemon.log"
        procs.append(p)
        return p

    yield start, rx
    for p in procs:
        terminate(p)
    rx.close()


def _statuses(rx: Receiver) -> List[str]:
    return [m[len("STATUS="):] for m in rx.drain() if m.startswith("STATUS=")]


def _log(p) -> str:
    return p.log.read_text()


def test_ready_status_watchdog_reload_and_invalid_reload_in_order(service):
    start, rx = service
    p = start("--dry-run")
    wait_for(lambda: rx.count("READY=1") >= 1 or p.poll() is not None, 30, "READY=1")
    assert p.poll() is None, _log(p)
    wait_for(lambda: rx.count("WATCHDOG=1") >= 3, 30, "three ticks")
    msgs = rx.drain()
    # READY after the first successful tick, then STATUS + WATCHDOG every tick.
    assert msgs[0] == "READY=1", msgs
    assert msgs[1].startswith("STATUS=") and msgs[2] == "WATCHDOG=1", msgs
    assert msgs[3].startswith("STATUS=") and msgs[4] == "WATCHDOG=1", msgs
    assert "policy e2e-a" in msgs[1] and "321 pages/50 ms" in msgs[1], msgs[1]

    # A valid reload: RELOADING=1 (with MONOTONIC_USEC) then READY=1, new policy in STATUS.
    p.policy.write_text(POLICY.format(name="e2e-b", pages=456, interval=0.3))
    seen = len(rx.drain())
    p.send_signal(signal.SIGHUP)
    wait_for(lambda: any("policy e2e-b" in s for s in _statuses(rx)), 30, "STATUS with the new policy")
    after = rx.drain()[seen:]
    reload_at = next(i for i, m in enumerate(after) if m.startswith("RELOADING=1"))
    assert after[reload_at].split("\n")[1].startswith("MONOTONIC_USEC="), after
    assert after[reload_at + 1] == "READY=1", after
    assert all("e2e-b" not in m for m in after[:reload_at]), after

    # An invalid policy: still RELOADING=1 then READY=1; the running policy stays.
    p.policy.write_text("name: e2e-c\nscan: {strategy: warp}\n")
    seen = len(rx.drain())
    p.send_signal(signal.SIGHUP)

    def tick_after_ready():
        after = rx.drain()[seen:]
        return "READY=1" in after and "WATCHDOG=1" in after[after.index("READY=1"):]

    wait_for(tick_after_ready, 30, "READY=1 and a tick after the rejected reload")
    after = rx.drain()[seen:]
    reload_at = next(i for i, m in enumerate(after) if m.startswith("RELOADING=1"))
    assert after[reload_at + 1] == "READY=1", after
    assert "policy e2e-b" in _statuses(rx)[-1]
    assert all("e2e-c" not in m for m in after)
    assert p.poll() is None
    assert "scan.strategy" in _log(p) or "strategy" in _log(p)

    # Stop: STOPPING=1 and a clean exit.
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 0, _log(p)
    assert rx.drain()[-1] == "STOPPING=1"


def test_watchdog_pinged_within_half_of_watchdog_usec_with_a_long_interval(service):
    """systemd kills a service that misses WatchdogSec: a 30 s policy interval under a
    2 s watchdog still needs a ping at least every second."""
    start, rx = service
    p = start("--dry-run", interval=30, extra_env={"WATCHDOG_USEC": "2000000"})
    wait_for(lambda: rx.count("READY=1") or p.poll() is not None, 30, "READY=1")
    assert p.poll() is None, _log(p)
    pings = rx.count("WATCHDOG=1")
    wait_for(lambda: rx.count("WATCHDOG=1") >= pings + 3, 5,
             "three WATCHDOG=1 within 5 s although the next tick is 30 s away")
    assert len(_statuses(rx)) == 1  # pings between ticks are not ticks


def test_silent_without_notify_socket(service):
    start, rx = service
    p = start("--dry-run", notify=False)
    wait_for(lambda: (p.log.exists() and "policy e2e-a" in _log(p)) or p.poll() is not None,
             30, "the daemon to start")
    wait_for(lambda: Path(str(p.policy.parent / "state-dry-run.json")).exists(), 30, "a first tick")
    assert p.poll() is None, _log(p)
    assert rx.drain() == []


@pytest.mark.kernel
def test_start_refused_while_ksmtuned_runs(service, real_ksmtuned):  # noqa: F811
    need_root()
    start, rx = service
    with ksm_exclusive():
        p = start("--once")
        rc = p.wait(timeout=60)
        out = _log(p)
    assert rc == EXIT_REFUSED, out
    assert "ksmtuned is running (pid" in out and "systemctl stop ksmtuned" in out, out
    assert "READY=1" not in rx.drain()


@pytest.mark.kernel
def test_external_write_between_ticks_is_detected_and_reasserted(service):
    need_root()
    need((KSM / "pages_to_scan").exists(), "no KSM in this kernel")
    start, rx = service
    pages = KSM / "pages_to_scan"
    with ksm_exclusive():
        if (KSM / "advisor_mode").exists():
            (KSM / "advisor_mode").write_text("none")
        p = start(pages=321)
        wait_for(lambda: rx.count("READY=1") or p.poll() is not None, 30, "READY=1")
        assert p.poll() is None, _log(p)
        wait_for(lambda: pages.read_text().strip() == "321", 30, "the daemon's pages_to_scan")
        subprocess.run(["sh", "-c", "echo 1250 > %s" % pages], check=True)  # another writer
        wait_for(lambda: "pages_to_scan was changed by another writer" in _log(p), 30,
                 "the daemon to notice the external write")
        wait_for(lambda: pages.read_text().strip() == "321", 30, "the policy's re-assert")
        ticks = rx.count("WATCHDOG=1")
        wait_for(lambda: rx.count("WATCHDOG=1") >= ticks + 3, 30, "three more ticks")
        assert _log(p).count("pages_to_scan was changed by another writer") == 1, _log(p)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0, _log(p)
