"""The `ksmctl` command line. One context object (CliContext) is built in the group and
passed to every command; errors become messages and documented exit codes."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import click

from . import __version__
from .collectors.host import HostCollector
from .collectors.procfs import ProcFs
from .collectors.sysfs import KsmSysfs
from .config import DEFAULT_CONFIG_PATH, DEFAULT_STATE_FILE, Config, load_config
from .errors import (EXIT_USAGE, KsmctlError,
                     UsageError)
from .ksm_writer import KNOBS, KsmWriter, unmerge_need, validate_value
from .policy.decide import EngineState, decide, evaluate, signals
from .policy.loader import json_schema, load_policy, resolve_policy_path, shipped_policy_names
from .readings import Readings
from .logsetup import configure_logging, error_text
from .service import make_vm_collector
from .state import read_state
from .units import format_bytes
from .cli_estimate import estimate  # noqa: E402  (commands kept in their own modules)
from .cli_service import install, uninstall
from .cli_vms import vms
from .cli_compat import start as compat_start, stop as compat_stop

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

    def sysfs(self) -> KsmSysfs:
        s = KsmSysfs(self.sys_root)
        s.require()
        return s

    def procfs(self) -> ProcFs:
        return ProcFs(self.proc_root)

    def state_file(self) -> str:
        try:
            return self.config.state_file
        except KsmctlError:
            return DEFAULT_STATE_FILE

    def daemon_state(self) -> Optional[Dict[str, Any]]:
        return read_state(self.state_file())

    def collector(self, with_vms: bool = False) -> HostCollector:
        vms = None
        if with_vms:
            vms = make_vm_collector(self.config, self.procfs())
        return HostCollector(self.sysfs(), self.procfs(), vms=vms)


class KsmctlGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KsmctlError as e:
            click.echo(error_text("ksmctl: " + e.message), err=True)
            ctx.exit(e.exit_code)


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


pass_cli = click.make_pass_decorator(CliContext)


# -- status -------------------------------------------------------------------------------
def _ksmd_cpu_percent(procfs: ProcFs, seconds: float) -> Optional[float]:
    try:
        a = procfs.ksmd_cpu_seconds()
        t0 = time.monotonic()
        if a is None or seconds <= 0:
            return None
        time.sleep(seconds)  # a measurement window, not a wait for a condition
        b = procfs.ksmd_cpu_seconds()
        return None if b is None else (b - a) / (time.monotonic() - t0) * 100.0
    except KsmctlError:
        return None


def status_dict(r: Readings, cpu: Optional[float], daemon: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    k = r.ksm
    return {
        "ksm": {"run": k.get("run"), "running": k.running, "advisor_mode": k.advisor_mode,
                "values": k.values, "unsupported": sorted(k.unsupported), "unreadable": k.unreadable},
        "saved_bytes": k.saved_bytes, "general_profit_bytes": k.get("general_profit"),
        "ksmd_cpu_percent": cpu,
        "memory": None if r.meminfo is None else {"total_bytes": r.meminfo.total, "available_bytes": r.meminfo.available},
        "psi": None if r.psi is None else {"some_avg10": r.psi.some_avg10, "full_avg10": r.psi.full_avg10,
                                           "some_avg60": r.psi.some_avg60, "full_avg60": r.psi.full_avg60},
        "daemon": None if daemon is None else {
            "pid": daemon.get("pid"), "policy": daemon.get("policy"), "decision": daemon.get("decision"),
            "status": daemon.get("status"), "updated": daemon.get("updated"), "dry_run": daemon.get("dry_run")},
        "errors": [list(e) for e in r.errors],
    }


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--cpu-window", default=0.25, show_default=True, type=click.FloatRange(0, 10),
              help="Seconds over which to measure ksmd's CPU use (0 to skip).")
@pass_cli
def status(c: CliContext, as_json: bool, cpu_window: float) -> None:
    """What KSM saves and costs now, and what the daemon last decided."""
    procfs = c.procfs()
    r = HostCollector(c.sysfs(), procfs, track_mergeable=False).collect()
    cpu = _ksmd_cpu_percent(procfs, cpu_window)
    daemon = c.daemon_state()
    d = status_dict(r, cpu, daemon)
    if as_json:
        click.echo(json.dumps(d, indent=2, sort_keys=True))
        return
    k = r.ksm
    run = k.get("run")
    state = {0: "stopped", 1: "running", 2: "unmerging / stopped after unmerge"}.get(run, "unknown")
    rows: List[Tuple[str, str]] = [("KSM", "%s (run=%s)%s" % (state, run, ", advisor %s" % k.advisor_mode
                                                           if k.advisor_mode else ""))]
    rows.append(("Scan rate", "%s pages every %s ms; %s full scans, %s pages scanned" % (
        k.get("pages_to_scan"), k.get("sleep_millisecs"), k.get("full_scans", "?"), k.get("pages_scanned", "?"))))
    saved = "%s (pages_sharing %s + ksm_zero_pages %s)" % (format_bytes(k.saved_bytes), k.get("pages_sharing", 0),
                                                          k.get("ksm_zero_pages", "n/a"))
    rows.append(("Memory saved", saved))
    gp = k.get("general_profit")
    rows.append(("General profit", "not supported by this kernel" if gp is None else
                 format_bytes(gp) + ("  (negative: KSM costs more than it saves)" if gp < 0 else "")))
    rows.append(("Merged pages", "shared %s, sharing %s, unshared %s, volatile %s" % tuple(
        k.get(n, "?") for n in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile"))))
    rows.append(("ksmd CPU", "n/a" if cpu is None else "%.1f%% of one core" % cpu))
    if r.meminfo:
        m = r.meminfo
        rows.append(("Memory", "MemAvailable %s of %s (%.0f%%)" % (format_bytes(m.available), format_bytes(m.total),
                                                                  100.0 * m.available / m.total)))
    rows.append(("Pressure", "not available (no PSI)" if r.psi is None else
                 "PSI some avg10 %.2f%%, full avg10 %.2f%%" % (r.psi.some_avg10, r.psi.full_avg10)))
    if daemon:
        pol = daemon.get("policy") or {}
        rows.append(("Daemon", "running (pid %s)%s, policy %s (%s, sha256 %s)" % (
            daemon.get("pid"), " in dry run" if daemon.get("dry_run") else "", pol.get("name"), pol.get("path"),
            str(pol.get("sha256"))[:12])))
        dec = daemon.get("decision")
        if dec:
            rows.append(("Last decision", "%s/%s: %s" % (dec["run_rule"], dec["scan_rule"], "; ".join(dec["reasons"]))))
    else:
        rows.append(("Daemon", "not running"))
    if k.unsupported:
        rows.append(("Not supported", ", ".join(sorted(k.unsupported)) + " (not in this kernel)"))
    for src, msg in r.errors:
        rows.append(("Read error", "%s: %s" % (src, msg)))
    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        click.echo("%s  %s" % (a.ljust(width), b))


# -- set / unmerge ------------------------------------------------------------------------
def _parse_assignments(pairs: Tuple[str, ...]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key or not value:
            raise UsageError("expected KEY=VALUE, found %r; keys: %s" % (p, ", ".join(sorted(KNOBS))))
        out[key.strip()] = value.strip()
    return out


@cli.command("set")
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


@cli.command()
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


# -- policy -------------------------------------------------------------------------------
@cli.group()
def policy() -> None:
    """Validate, show, explain and replay policies."""


@policy.command("validate")
@click.argument("files", nargs=-1, required=True)
def policy_validate(files: Tuple[str, ...]) -> None:
    """Check policy files; print every problem with file, line and key."""
    bad = 0
    for f in files:
        try:
            lp = load_policy(f)
            click.echo("%s: OK (policy %s, sha256 %s)" % (f, lp.policy.name, lp.short_hash))
        except KsmctlError as e:
            bad += 1
            click.echo(e.message, err=True)
    if bad:
        raise click.exceptions.Exit(EXIT_USAGE)


@policy.command("show")
@click.argument("name", required=False)
@pass_cli
def policy_show(c: CliContext, name: Optional[str]) -> None:
    """Print a policy file (NAME or path); without NAME, list the shipped policies."""
    if name is None:
        current = None
        try:
            current = c.config.policy
        except KsmctlError:
            pass
        for n in shipped_policy_names():
            lp = load_policy(n)
            first = lp.policy.description.strip().splitlines()[0] if lp.policy.description.strip() else ""
            click.echo("%s%-16s %s" % ("* " if n == current else "  ", n, first))
        return
    path = resolve_policy_path(name)
    load_policy(path)  # validate before showing
    click.echo(path.read_text(), nl=False)


@policy.command("schema")
def policy_schema() -> None:
    """Print the JSON Schema of the policy format (for editors)."""
    click.echo(json_schema(), nl=False)


@policy.command("explain")
@click.argument("file", required=False)
@click.option("--json", "as_json", is_flag=True)
@pass_cli
def policy_explain(c: CliContext, file: Optional[str], as_json: bool) -> None:
    """What FILE (default: the configured policy) would decide now, on this host, and why."""
    lp = load_policy(file or c.config.policy)
    r = c.collector(with_vms=True).collect()
    daemon = c.daemon_state()
    decision, _ = decide(lp.policy, r, EngineState())
    sig = signals(r)
    total = r.meminfo.total if r.meminfo else None
    conds = []
    for group, items in (("start_when (any)", lp.policy.run.start_when), ("stop_when (all)", lp.policy.run.stop_when),
                         ("boost_when (any)", lp.policy.scan.boost_when)):
        for cond in items:
            held, why = evaluate(cond, sig, total)
            conds.append({"group": group, "holds": held, "why": why})
    current = dict(r.ksm.values)
    current["advisor_mode"] = r.ksm.advisor_mode
    changes = {k: {"now": current.get(k), "target": v} for k, v in decision.targets.items() if current.get(k) != v}
    if as_json:
        click.echo(json.dumps({"policy": lp.policy.name, "path": lp.path, "run_rule": decision.run_rule,
                               "scan_rule": decision.scan_rule, "reasons": list(decision.reasons),
                               "targets": decision.targets, "conditions": conds, "changes": changes}, indent=2))
        return
    click.echo("Policy %s (%s, sha256 %s)" % (lp.policy.name, lp.path, lp.short_hash))
    click.echo("Decision: %s / %s" % (decision.run_rule, decision.scan_rule))
    for why in decision.reasons:
        click.echo("  because %s" % why)
    for cd in conds:
        click.echo("  %-17s %-5s %s" % (cd["group"], "yes" if cd["holds"] else "no", cd["why"]))
    click.echo("Targets: " + ", ".join("%s=%s" % kv for kv in decision.targets.items()))
    if changes:
        click.echo("Would change: " + ", ".join("%s %s -> %s" % (k, v["now"], v["target"]) for k, v in changes.items()))
    else:
        click.echo("Would change: nothing")
    click.echo("(explained from a fresh start: a running daemon's history, e.g. a stepped pages_to_scan, "
               "can make it decide differently%s)" % ("; the daemon is running" if daemon else ""))


@policy.command("replay")
@click.option("--policy", "policy_file", required=True, help="Policy name or file to replay.")
@click.option("--trace", "trace_file", required=True, type=click.Path(dir_okay=False),
              help="A trace written by the daemon (config trace.path).")
@click.option("--summary", is_flag=True, help="Only the totals, not tick by tick.")
def policy_replay(policy_file: str, trace_file: str, summary: bool) -> None:
    """Run a policy over a recorded trace: what it would have decided, next to what was decided.

    Decisions only: the replay cannot know how the kernel would have merged under other
    settings, so every tick sees the readings that were recorded.
    """
    from .replay import replay
    lp = load_policy(policy_file)
    result = replay(lp.policy, trace_file)
    click.echo("Replaying policy %s over %s: decisions only (the readings are as recorded)." % (lp.policy.name, trace_file))
    if not summary:
        for row in result.rows:
            click.echo(row.format())
    click.echo(result.summary())


# -- daemon -------------------------------------------------------------------------------
@cli.command()
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
    from .service import build_daemon
    config = c.config
    configure_logging(log_level or config.log_level)
    d = build_daemon(config, c.config_path, policy_name, dry_run=dry_run, force=force, once=once)
    d.install_signal_handlers()
    d.run(max_ticks=1 if once else None)


cli.add_command(vms)
cli.add_command(estimate)
cli.add_command(install)
cli.add_command(uninstall)
cli.add_command(compat_start)
cli.add_command(compat_stop)


def main() -> None:
    cli(prog_name="ksmctl")


