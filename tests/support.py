"""Test helpers shared across the suite."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from typing import Callable, Optional

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition: bool, why: str) -> None:
    """Skip locally when a real component is missing; in CI (CI=true) fail instead.

    CI installs everything the suite needs, so a missing component there is a broken
    setup, never a reason to pass quietly.
    """
    if condition:
        return
    if IN_CI:
        pytest.fail("required component missing in CI: " + why)
    pytest.skip(why)


def need_root() -> None:
    need(os.geteuid() == 0, "needs root to write /sys/kernel/mm/ksm")


def need_tool(name: str) -> str:
    path = shutil.which(name)
    need(path is not None, "%s is not installed" % name)
    return path  # type: ignore[return-value]


def wait_for(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll cond() until it returns something truthy; fail with `what` after timeout seconds."""
    end = time.monotonic() + timeout
    last: Optional[object] = None
    while time.monotonic() < end:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError("timed out after %.1fs waiting for %s (last: %r)" % (timeout, what, last))


def terminate(p: "subprocess.Popen", timeout: float = 30, sig: int = signal.SIGTERM) -> None:
    """Stop a child we started: `sig` (SIGTERM) first, SIGKILL if it outlives `timeout`."""
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
