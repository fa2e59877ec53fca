"""`ksmctl reload`: SIGHUP to the daemon, then wait until it has switched or refused.

A bare `kill -HUP` returns before the daemon has read anything, so under systemd 252
(Debian 12, RHEL 9) `systemctl reload` would report done while the old policy still runs.
The unit's ExecReload runs this instead; it returns when the daemon's state file shows
the reload's outcome, and fails (exit 2) when the new config or policy was rejected.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any, Dict, Optional

import click

from ksmctl.errors import KsmctlError, PermissionDenied, UsageError
from ksmctl.service.state import PID_MAX, dry_run_path, read_state

from .context import CliContext, FiniteFloatRange, pass_cli

POLL_SECONDS = 0.1


def _state_of(path: str, pid: Optional[int]) -> Optional[Dict[str, Any]]:
    """The live daemon's state (service or dry-run file): the one of `pid` when given."""
    for p in (path, dry_run_path(path)):
        s = read_state(p)
        if s is not None and (pid is None or s.get("pid") == pid):
            return s
    return None


def _count(state: Optional[Dict[str, Any]]) -> int:
    r = state.get("reload") if state else None
    return int(r["count"]) if isinstance(r, dict) else 0


def _is_ksmctl_daemon(c: CliContext, pid: int) -> bool:
    argv = c.procfs().cmdline(pid) or ()
    return "daemon" in argv and any("ksmctl" in a for a in argv)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@click.command("reload")
@click.option("--pid", type=click.IntRange(1, PID_MAX), default=None,
              help="The daemon's pid (the unit passes $MAINPID) [default: the one in the state file].")
@click.option("--timeout", type=FiniteFloatRange(0.1, 3600), default=90.0, show_default=True,
              help="Seconds to wait for the daemon (it reloads after its current tick).")
@pass_cli
def reload(c: CliContext, pid: Optional[int], timeout: float) -> None:
    """Reload the running daemon's config and policy and wait for the outcome.

    Exit 0 when the daemon runs the new files (or found them unchanged), 2 when it
    rejected them and keeps the running ones (the reason is printed), 1 when it did not
    answer within --timeout or exited."""
    path = c.state_file()
    running = _state_of(path, None)
    if pid is None:
        if running is None:
            raise KsmctlError("no running ksmctl daemon (no live state file %s)" % path)
        pid = int(running["pid"])
    before = _state_of(path, pid)
    if before is None and running is not None:
        raise UsageError("--pid %d: the running ksmctl daemon is pid %d (state file %s)" % (pid, running["pid"], path))
    if not _is_ksmctl_daemon(c, pid):
        raise UsageError("--pid %d: not a running `ksmctl daemon` process" % pid)
    seen = _count(before)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise KsmctlError("daemon pid %d is gone" % pid) from None
    except PermissionError:
        raise PermissionDenied("not permitted to signal the daemon (pid %d): run as root" % pid) from None
    deadline = time.monotonic() + timeout
    while True:
        now = _state_of(path, pid)
        if now is not None and _count(now) > seen:
            break
        if now is None and not _alive(pid):
            raise KsmctlError("daemon pid %d exited during the reload" % pid)
        if time.monotonic() >= deadline:
            raise KsmctlError("daemon pid %d did not confirm the reload within %gs (state file %s)"
                              % (pid, timeout, path))
        time.sleep(POLL_SECONDS)
    outcome = now["reload"]
    policy = now.get("policy") or {}
    if not outcome["ok"]:
        raise UsageError("reload rejected, the daemon keeps policy %s: %s" % (policy.get("name"), outcome["message"]))
    click.echo("reloaded: policy %s (sha256 %s)" % (policy.get("name"), str(policy.get("sha256", ""))[:12]))
