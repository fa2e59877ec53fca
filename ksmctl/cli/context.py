"""The one context object every command receives (built in the group), and the group
class that turns KsmctlError into a message and its documented exit code."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

import click

from ksmctl.collectors.host import HostCollector
from ksmctl.collectors.procfs import ProcFs
from ksmctl.config import DEFAULT_STATE_FILE, Config, load_config
from ksmctl.errors import KsmctlError
from ksmctl.kernel.sysfs import KsmSysfs
from ksmctl.logsetup import error_text
from ksmctl.service.state import find_state
from ksmctl.service.wiring import make_vm_collector

EXIT_CODES_HELP = """\b
Exit codes:
  0  success
  1  the operation failed (the kernel refused a write, I/O error)
  2  bad input (arguments, policy, config) or no KSM in this kernel
  3  requires root
  4  refused by a safety guard (unmerge the host cannot absorb,
     another KSM writer running); see --force where offered"""


@dataclass
class CliContext:
    """Roots and config paths shared by every command (tests point them at fixtures)."""

    sys_root: str
    proc_root: str
    config_path: Optional[str]
    _config: Optional[Config] = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    def config_or_defaults(self) -> Config:
        """The config, or the documented defaults when it is unusable: views of the host
        (vms, doctor) must not be hidden by a broken config file."""
        try:
            return self.config
        except KsmctlError:
            return Config()

    def sysfs(self) -> KsmSysfs:
        s = KsmSysfs(self.sys_root)
        s.require()
        return s

    def procfs(self) -> ProcFs:
        return ProcFs(self.proc_root)

    def state_file(self) -> str:
        try:
            return self.config.state_file
        except KsmctlError as e:  # status still works, but says why the config is ignored
            click.echo("ksmctl: warning: %s\n(using the default state file %s)" % (e.message, DEFAULT_STATE_FILE),
                       err=True)
            return DEFAULT_STATE_FILE

    def daemon_state(self) -> Optional[Dict[str, Any]]:
        """The running daemon's state (a dry-run one's when no service daemon runs),
        checked by parse_state: a file of another shape is a UsageError (exit 2)."""
        return find_state(self.state_file())

    def collector(self, with_vms: bool = False) -> HostCollector:
        vms = None
        if with_vms:
            vms = make_vm_collector(self.config, self.procfs())
        return HostCollector(self.sysfs(), self.procfs(), vms=vms)


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange, without NaN: every comparison with NaN is false, so FloatRange
    lets it through every bound (then time.sleep(nan) raises, a deadline never comes)."""

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail("%r is not a finite number" % (value,), param, ctx)
        return rv


class KsmctlGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KsmctlError as e:
            click.echo(error_text("ksmctl: " + e.message), err=True)
            ctx.exit(e.exit_code)



pass_cli = click.make_pass_decorator(CliContext)
