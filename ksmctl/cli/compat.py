"""`ksmctl start` and `ksmctl stop`: what Debian's ksmtuned package's helper did.

That package (which the ksmctl Debian package replaces: docs/service.md) ships a small
C program as /usr/sbin/ksmctl; its ksm.service runs `ksmctl start` (run=1) at boot and
`ksmctl stop` (run=0) when stopped, and scripts and people type the same. ksmctl keeps
both meanings, so whatever called the old helper keeps working. `stop` writes run=0,
which stops ksmd and leaves merged pages merged: like the old helper, it never unmerges.
"""
from __future__ import annotations

import click

from ksmctl.kernel.writer import KsmWriter

from .context import CliContext, pass_cli

HELPER_NOTE = ("Compatibility with the `ksmctl start|stop` helper of Debian's ksmtuned "
               "package (its ksm.service).")


def _set_run(c: CliContext, value: int) -> None:
    sysfs = c.sysfs()
    changes = KsmWriter(sysfs).apply({"run": value}, sysfs.read())
    for ch in changes:
        click.echo("%s: %s -> %s" % (ch.knob, ch.old, ch.new))
    if not changes:
        click.echo("run is already %d" % value)
    if changes and c.daemon_state() is not None:
        click.echo("note: the ksmctl daemon is running; its policy decides whether this change stays", err=True)


@click.command("start", help="Start KSM (run=1). " + HELPER_NOTE)
@pass_cli
def start(c: CliContext) -> None:
    _set_run(c, 1)


@click.command("stop", help="Stop KSM (run=0; merged pages stay merged). " + HELPER_NOTE)
@pass_cli
def stop(c: CliContext) -> None:
    _set_run(c, 0)
