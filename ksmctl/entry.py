"""The `ksmctl` executable's first code. Under systemd, `systemctl reload` can send SIGHUP
while the daemon is still importing and loading its config and policy, and SIGHUP's
default action kills the process. So before any import that takes time, a `daemon`
invocation queues SIGHUP, SIGTERM and SIGINT; Daemon.install_signal_handlers() takes the
queue over and acts on what arrived meanwhile (reload, or stop)."""
from __future__ import annotations

import signal
import sys
from typing import Any, List

EARLY_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
# Signals are process-wide, so is the queue of those that came before the daemon existed.
pending: List[int] = []


def _queue(signum: int, _frame: Any) -> None:
    pending.append(signum)


def hold_signals() -> None:
    for s in EARLY_SIGNALS:
        signal.signal(s, _queue)


def main() -> None:
    if "daemon" in sys.argv[1:]:
        hold_signals()
    from ksmctl.cli import main as cli_main
    cli_main()
