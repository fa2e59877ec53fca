"""`ksmctl install` and `ksmctl uninstall`: the system-service files (see docs/service.md).

Registered by the CLI group (ksmctl/cli/__init__.py).
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, Optional

import click

from ksmctl.service import install as _install
from ksmctl.errors import KsmctlError

NEXT_STEPS = """\
next steps:
  systemctl daemon-reload
  systemctl disable --now ksmtuned.service ksm.service   # other KSM writers, if installed
  systemctl enable --now ksmctl.service"""


def _reported(fn: Callable) -> Callable:
    """Bad input or a failed write becomes a message and an exit code, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        root = kwargs.get("root", "/")
        try:
            return fn(*args, **kwargs)
        except KsmctlError as exc:
            click.echo("ksmctl: error: %s" % exc, err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:
            err = _install.describe_error(exc, root)
            click.echo("ksmctl: error: %s" % err, err=True)
            sys.exit(err.exit_code)
    return wrapper


@click.command("install")
@click.option("--root", default="/", show_default=True, metavar="DIR",
              help="Install under this directory instead of / (for images and packaging).")
@click.option("--prefix", default=_install.DEFAULT_PREFIX, show_default=True, metavar="DIR",
              help="Prefix for the man page and shell completions.")
@click.option("--exec-path", default=None, metavar="PATH",
              help="ksmctl executable the unit runs (default: this installation's script).")
@_reported
def install_command(root: str, prefix: str, exec_path: Optional[str]) -> None:
    """Install the systemd unit, /etc/ksmctl/config.yaml, the shipped policies,
    the man page and shell completions.

    Files an operator edited are never overwritten: the new version is written
    beside them as FILE.new. A manifest (/var/lib/ksmctl/install-manifest.json)
    records what was installed, for `ksmctl uninstall`. Running it again
    upgrades unedited files.
    """
    report = _install.install(root=root, prefix=prefix, exec_path=exec_path)
    for line in report.lines():
        click.echo(line)
    if root == "/":
        click.echo(NEXT_STEPS)


@click.command("uninstall")
@click.option("--root", default="/", show_default=True, metavar="DIR",
              help="Uninstall from under this directory instead of /.")
@_reported
def uninstall_command(root: str) -> None:
    """Remove the files `ksmctl install` added, except those edited since
    (they are kept and listed). Stop and disable the service first:
    `systemctl disable --now ksmctl`.
    """
    report = _install.uninstall(root=root)
    for line in report.lines():
        click.echo(line)
    if root == "/":
        click.echo("then: systemctl daemon-reload")


# The names the CLI group registers (ksmctl/cli/__init__.py).
install = install_command
uninstall = uninstall_command
