"""`ksmctl daemon`: run the controller in the foreground (what the unit's ExecStart runs)."""
from __future__ import annotations

from typing import Optional

import click

from ksmctl.logsetup import configure_logging

from .context import CliContext, pass_cli


@click.command()
@click.option("--policy", "policy_name", help="Policy name or file (overrides the config).")
@click.option("--dry-run", is_flag=True, help="Decide and log, never write /sys/kernel/mm/ksm.")
@click.option("--force", is_flag=True, help="Start even if another KSM writer (ksmtuned, the kernel advisor) is active.")
@click.option("--once", is_flag=True, help="Run one tick and exit (restoring nothing).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None)
@pass_cli
def daemon(c: CliContext, policy_name: Optional[str], dry_run: bool, force: bool, once: bool,
           log_level: Optional[str]) -> None:
    """Run the controller: read, decide, write, every policy interval.

    SIGHUP reloads config and policy; SIGTERM/SIGINT stop (restoring the original
    knobs when restore_on_exit is set)."""
    from ksmctl.service.wiring import build_daemon
    config = c.config
    configure_logging(log_level or config.log_level)
    d = build_daemon(config, c.config_path, policy_name, dry_run=dry_run, force=force, once=once)
    d.install_signal_handlers()
    d.run(max_ticks=1 if once else None)

