"""`ksmctl set` and `ksmctl unmerge`: manual, validated writes of the KSM knobs.

Both fail closed: run=2 only through `unmerge`, however it is spelled; `unmerge` asks
first (or needs --yes), and refuses when it cannot tell how much it would allocate.
"""
from __future__ import annotations

import sys
from typing import Dict, List, Tuple

import click
from click.shell_completion import CompletionItem

from ksmctl.errors import ReadError, Refused, UsageError
from ksmctl.kernel import knobs
from ksmctl.kernel.knobs import RUN_UNMERGE, Kind
from ksmctl.kernel.writer import KsmWriter, unmerge_need, unmerge_refusal, validate_value
from ksmctl.units import format_bytes

from .context import CliContext, pass_cli


class KnobsCommand(click.Command):
    """Its --help ends with the writable knobs and their ranges, read from the table
    when the help is shown."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Knobs"):
            formatter.write_dl([(k.name, k.range_text()) for k in knobs.writable()])
        super().format_epilog(ctx, formatter)


def complete_assignment(ctx: click.Context, param: click.Parameter, incomplete: str) -> List[CompletionItem]:
    """Shell completion of KEY=VALUE: the writable knob names, and the words a choice knob takes."""
    key, sep, value = incomplete.partition("=")
    if not sep:
        return [CompletionItem(name + "=") for name in knobs.writable_names() if name.startswith(key)]
    k = knobs.find(key)
    if k is None or k.kind is not Kind.CHOICE:
        return []
    return [CompletionItem("%s=%s" % (key, w)) for w in k.choices if w.startswith(value)]


def _parse_assignments(pairs: Tuple[str, ...]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key or not value:
            raise UsageError("expected KEY=VALUE, found %r; keys: %s" % (p, ", ".join(sorted(knobs.writable_names()))))
        key = key.strip()
        if key in out:
            raise UsageError("%s is given twice (%s=%s and %s); give each knob once" % (key, key, out[key], p))
        out[key] = value.strip()
    return out


@click.command("set", cls=KnobsCommand)
@click.argument("assignments", nargs=-1, required=True, metavar="KEY=VALUE...",
                shell_complete=complete_assignment)
@click.option("--dry-run", is_flag=True, help="Validate and show, do not write.")
@pass_cli
def set_cmd(c: CliContext, assignments: Tuple[str, ...], dry_run: bool) -> None:
    """Write KSM knobs, validated first: e.g. `ksmctl set pages_to_scan=1000 run=1`.

    Values are whole numbers in ASCII digits (or a listed word). run=2 (unmerge) is not
    accepted here: use `ksmctl unmerge`, which checks that the host can absorb the
    unmerged pages. A running daemon will notice the change and follow its policy's
    on_external_change (re-assert or back off).
    """
    sysfs = c.sysfs()
    state = sysfs.read()
    targets = {k: validate_value(k, v, state) for k, v in _parse_assignments(assignments).items()}
    if targets.get("run") == RUN_UNMERGE:  # checked on the parsed value: "02", "2 " are 2 too
        raise UsageError("run=2 unmerges every merged page: use `ksmctl unmerge`, which checks memory first")
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
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (needed when stdin is not a terminal).")
@click.option("--dry-run", is_flag=True, help="Say what unmerging would allocate and whether the memory "
              "guard allows it; write nothing (exit 4 when it would refuse).")
@pass_cli
def unmerge(c: CliContext, force: bool, yes: bool, dry_run: bool) -> None:
    """Break all merged pages apart (run=2), if the host can absorb the copies."""
    sysfs = c.sysfs()
    state = sysfs.read()
    try:
        meminfo = c.procfs().meminfo()
    except ReadError as e:
        raise Refused("refusing to unmerge: cannot tell whether the host can absorb it (%s)" % e.message) from None
    need, margin = unmerge_need(state, meminfo)
    refusal = unmerge_refusal(state, meminfo)
    click.echo("Unmerging allocates %s (pages_sharing + ksm_zero_pages); MemAvailable %s, margin %s."
               % (format_bytes(need), format_bytes(meminfo.available), format_bytes(margin)))
    if refusal is not None and not force:
        raise Refused(refusal + (" (dry run: nothing written)" if dry_run else ""))
    if refusal is not None:
        click.echo("WARNING: this host cannot absorb that: processes may be OOM-killed.", err=True)
    if dry_run:
        click.echo("dry run: the memory guard %s; nothing written"
                   % ("allows it" if refusal is None else "refuses it, --force overrides"))
        return
    if not yes:
        if sys.stdin is None or not sys.stdin.isatty():
            raise Refused("stdin is not a terminal: pass --yes to unmerge without confirmation")
        click.confirm("Unmerge now?", abort=True)
    KsmWriter(sysfs).unmerge(state, meminfo, force=force)
    click.echo("unmerged: run=2 (ksmd stopped; set run=1 or start the daemon to merge again)")
