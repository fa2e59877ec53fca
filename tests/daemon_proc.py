"""Runs `ksmctl daemon` as a real subprocess with a temp config, for integration tests."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

REPO = Path(__file__).resolve().parent.parent

ALWAYS_ON_POLICY = """
name: test-on
interval: 0.3s
run:
  mode: conditional
  start_when: [{signal: memory_available, below: 100%}]
  stop_when: [{signal: memory_available, above: 100%}]
scan:
  strategy: step
  pages_to_scan: {initial: 5000, min: 5000, max: 5000, boost: 0, decay: 0}
  sleep_millisecs: {base: 10, floor: 10}
"""
# Its stop condition holds on any host and its start condition on none.
STOP_POLICY = ALWAYS_ON_POLICY.replace("name: test-on", "name: test-stop").replace(
    "stop_when: [{signal: memory_available, above: 100%}]", "stop_when: [{signal: memory_available, above: 0%}]"
).replace("start_when: [{signal: memory_available, below: 100%}]", "start_when: [{signal: memory_available, below: 0%}]")


def adaptive_on_policy(name: str, adaptive: str) -> str:
    """A policy whose start condition holds on any host, scanning with `adaptive` (the
    flow mapping's inside) at up to 20000 pages per 10 ms, idling at 100 per second."""
    return ("name: %s\ninterval: 0.5s\nrun:\n  mode: conditional\n"
            "  start_when: [{signal: memory_available, below: 100%%}]\n"
            "  stop_when: [{signal: memory_available, above: 100%%}]\n"
            "scan:\n  strategy: adaptive\n  pages_to_scan: {min: 100, max: 20000}\n"
            "  sleep_millisecs: {base: 10, floor: 10}\n"
            "  adaptive: {idle: {pages_to_scan: 100, sleep_millisecs: 1000}, %s}\n" % (name, adaptive))


class DaemonProc:
    def __init__(self, tmp: Path, policy_text: str, extra_config: Optional[Dict[str, Any]] = None,
                 args: Optional[List[str]] = None, env: Optional[Dict[str, str]] = None) -> None:
        self.tmp = tmp
        self.policy = tmp / "policy.yaml"
        self.policy.write_text(policy_text)
        self.state_file = tmp / "state.json"  # the config's; a --dry-run daemon writes state-dry-run.json
        self.log = tmp / "daemon.log"
        cfg: Dict[str, Any] = {"policy": str(self.policy), "state_file": str(self.state_file),
                               "exporter": {"enabled": False}, "libvirt": False, "log_level": "debug"}
        for k, v in (extra_config or {}).items():
            if isinstance(v, dict) and isinstance(cfg.get(k), dict):
                cfg[k].update(v)
            else:
                cfg[k] = v
        self.config = tmp / "config.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.args = args or []
        if "--dry-run" in self.args:
            self.state_file = tmp / "state-dry-run.json"
        self.env = dict(os.environ, **(env or {}))
        self.env.pop("NOTIFY_SOCKET", None) if "NOTIFY_SOCKET" not in (env or {}) else None
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "DaemonProc":
        self._logf = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "ksmctl", "--config", str(self.config), "daemon"]
                                     + self.args, stdout=self._logf, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=str(REPO))
        return self

    def state(self) -> Optional[Dict[str, Any]]:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None

    def log_text(self) -> str:
        return self.log.read_text()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()
        return self.proc.returncode

    def __enter__(self) -> "DaemonProc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def ticks(d: DaemonProc) -> int:
    s = d.state()
    return s["ticks"] if s else 0


def wait_ticks(d: DaemonProc, n: int, timeout: float = 30) -> Dict[str, Any]:
    end = time.monotonic() + timeout
    start = ticks(d)
    while time.monotonic() < end:
        assert d.alive(), "daemon exited:\n" + d.log_text()
        s = d.state()
        if s and s["ticks"] >= start + n:
            return s
        time.sleep(0.05)
    raise AssertionError("daemon did not tick %d times in %ss:\n%s" % (n, timeout, d.log_text()))
