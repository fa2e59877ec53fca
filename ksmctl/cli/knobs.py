"""`ksmctl set` and `ksmctl unmerge`: manual, validated writes of the KSM knobs."""
from __future__ import annotations

import sys
from typing import Dict, Tuple

import click

from ksmctl.errors import UsageError
from ksmctl.kernel.writer import KNOBS, KsmWriter, unmerge_need, validate_value
from ksmctl.units import format_bytes

from .context import CliContext, pass_cli


def _parse_assignments(pairs: Tuple[str, ...]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key or not value:
            raise UsageError("expected KEY=VALUE, found %r; keys: %s" % (p, ", ".join(sorted(KNOBS))))
        out[key.strip()] = value.strip()
    return out


@click.command("set")
@click.argument("assignments", nargs=-1, required=True, metavar="KEY=VALUE...")
@click.option("--dry-run", is_flag=True, help="Validate and show, do not write.")
@pass_cli
def set_cmd(c: CliContext, assignments: Tuple[str, ...], dry_run: bool) -> None:
    """Write KSM knobs, validated first: e.g. `ksmctl set pages_to_scan=1000 run=1`.

    run=2 (unmerge) is not accepted here: use `ksmctl unmerge`, which checks that the
    host can absorb the unmerged pages. A running daemon will notice the change and
    follow its policy's on_external_change (re-assert or back off).
    """
    sysfs = c.sysfs()
    state = sysfs.read()
    wanted = _parse_assignments(assignments)
    if wanted.get("run") == "2":
        raise UsageError("run=2 unmerges every merged page: use `ksmctl unmerge`, which checks memory first")
    targets = {k: validate_value(k, v, state) for k, v in wanted.items()}
    writer = KsmWriter(sysfs, dry_run=dry_run)
    changes = writer.apply(targets, state)
    for ch in changes:
        click.echo("%s: %s -> %s%s" % (ch.knob, ch.old, ch.new, " (dry run)" if dry_run else ""))
    if not changes:
        click.echo("nothing to change")
    if c.daemon_state() is not None and changes and not dry_run:
        click.echo("note: the ksmctl daemon is running; its policy decides whether this change stays", err=True)


@click.command()
@click.option("--force", is_flag=True, help="Unmerge even when MemAvailable cannot absorb it (risks OOM).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_cli
def unmerge(c: CliContext, force: bool, yes: bool) -> None:
    """Break all merged pages apart (run=2), if the host can absorb the copies."""
    sysfs = c.sysfs()
    state = sysfs.read()
    meminfo = c.procfs().meminfo()
    need, margin = unmerge_need(state, meminfo)
    fits = need + margin <= meminfo.available
    click.echo("Unmerging allocates %s (pages_sharing + ksm_zero_pages); MemAvailable %s, margin %s."
               % (format_bytes(need), format_bytes(meminfo.available), format_bytes(margin)))
    if not fits and force:
        click.echo("WARNING: this host cannot absorb that: processes may be OOM-killed.", err=True)
    if not yes and sys.stdin.isatty():
        click.confirm("Unmerge now?", abort=True)
    KsmWriter(sysfs).unmerge(state, meminfo, force=force)
    click.echo("unmerged: run=2 (ksmd stopped; set run=1 or start the daemon to merge again)")

