"""The `ksmctl` command line: the group builds one CliContext that every command gets
(see context.py); each command group lives in its own module here."""
from __future__ import annotations

from typing import Optional

import click

from ksmctl import __version__
from ksmctl.config import DEFAULT_CONFIG_PATH

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


def main() -> None:
    cli(prog_name="ksmctl")
