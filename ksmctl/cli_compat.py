"""`ksmctl start` and `ksmctl stop`: what Debian's ksmtuned package's helper did.

That package (which the ksmctl Debian package replaces: docs/service.md) ships a small
C program as /usr/sbin/ksmctl; its ksm.service runs `ksmctl start` (run=1) at boot and
`ksmctl stop` (run=0) when stopped, and scripts and people type the same. ksmctl keeps
both meanings, so whatever called the old helper keeps working. `stop` writes run=0,
which stops ksmd and leaves merged pages merged: like the old helper, it never unmerges.

Registered by the main CLI with cli.add_command(start) and cli.add_command(stop).
"""
from __future__ import annotations

import click

from .collectors.sysfs import KsmSysfs
from .ksm_writer import KsmWriter
from .state import read_state

HELPER_NOTE = ("Compatibility with the `ksmctl start|stop` helper of Debian's ksmtuned "
               "package (its ksm.service).")


def _set_run(value: int) -> None:
    ctx = click.get_current_context()
    sys_root = getattr(ctx.obj, "sys_root", "/sys")
    sysfs = KsmSysfs(sys_root)
    sysfs.require()
    changes = KsmWriter(sysfs).apply({"run": value}, sysfs.read())
    for ch in changes:
        click.echo("%s: %s -> %s" % (ch.knob, ch.old, ch.new))
    if not changes:
        click.echo("run is already %d" % value)
    state_file = getattr(ctx.obj, "state_file", None)
    if changes and state_file is not None and read_state(state_file()) is not None:
        click.echo("note: the ksmctl daemon is running; its policy decides whether this change stays",
                   err=True)


@click.command("start", help="Start KSM (run=1). " + HELPER_NOTE)
def start() -> None:
    _set_run(1)


@click.command("stop", help="Stop KSM (run=0; merged pages stay merged). " + HELPER_NOTE)
def stop() -> None:
    _set_run(0)
