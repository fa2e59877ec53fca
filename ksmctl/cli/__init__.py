"""The `ksmctl` command line: the group builds one CliContext that every command gets
(see context.py); each command group lives in its own module here."""
from __future__ import annotations

import errno
import os
import sys
from typing import Optional

import click

from ksmctl import __version__
from ksmctl.config import DEFAULT_CONFIG_PATH
from ksmctl.errors import EXIT_FAILURE
from ksmctl.logsetup import error_text

from .compat import start as compat_start, stop as compat_stop
from .context import EXIT_CODES_HELP, CliContext, KsmctlGroup
from .daemon import daemon
from .doctor import doctor
from .estimate import estimate
from .knobs import set_cmd, unmerge
from .merge import merge
from .policy import policy
from .reload import reload
from .service import install, uninstall
from .status import status
from .vms import vms


@click.group(cls=KsmctlGroup, epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ksmctl")
@click.option("--config", "config_path", envvar="KSMCTL_CONFIG", type=click.Path(dir_okay=False),
              help="Config file [default: %s if it exists]." % DEFAULT_CONFIG_PATH)
@click.option("--sys-root", default="/sys", hidden=True, envvar="KSMCTL_SYS_ROOT")
@click.option("--proc-root", default="/proc", hidden=True, envvar="KSMCTL_PROC_ROOT")
@click.pass_context
def cli(ctx: click.Context, config_path: Optional[str], sys_root: str, proc_root: str) -> None:
    """Tune and watch Kernel Samepage Merging (KSM) on a KVM host.

    Run `ksmctl daemon` to let a policy drive /sys/kernel/mm/ksm, `ksmctl status` to see
    what KSM saves and costs, `ksmctl vms` for the saving per VM.
    """
    ctx.obj = CliContext(sys_root=sys_root, proc_root=proc_root, config_path=config_path)



for _command in (status, set_cmd, unmerge, policy, daemon, reload, doctor, vms, merge, estimate, install, uninstall, compat_start, compat_stop):
    cli.add_command(_command)


# Errors of writing stdout itself (a full disk, a gone terminal) that click does not
# handle (it handles EPIPE): a message and exit 1, not a traceback.
_OUTPUT_ERRNOS = frozenset((errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG, errno.EPIPE, errno.EBADF))


def main() -> None:
    try:
        cli(prog_name="ksmctl")
    except OSError as e:
        if e.errno not in _OUTPUT_ERRNOS or e.filename is not None:
            raise
        try:  # what is still buffered would fail again at exit: send it nowhere
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        click.echo(error_text("ksmctl: cannot write output: %s" % (e.strerror or e)), err=True)
        sys.exit(EXIT_FAILURE)
