"""`ksmctl policy ...`: validate, show, schema, explain and replay policies."""
from __future__ import annotations

import json
from typing import Dict, Optional, Tuple

import click

from ksmctl.kernel.transition import explain as explain_settings
from ksmctl.errors import EXIT_USAGE, KsmctlError
from ksmctl.policy.decide import EngineState, decide
from ksmctl.policy.signals import evaluate, signals
from ksmctl.policy.loader import json_schema, load_policy, resolve_policy_path, shipped_policy_names

from .context import CliContext, pass_cli
from .merge import explain_merge


@click.group()
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
    current: Dict[str, object] = dict(r.ksm.values)
    current["advisor_mode"] = r.ksm.advisor_mode
    changes = {k: {"now": current.get(k), "target": v} for k, v in decision.targets.items()
               if current.get(k) != v and k not in r.ksm.unsupported}
    settings = explain_settings(decision.targets, r.ksm, r.meminfo)
    vms = explain_merge(c, lp.policy.vms, r)
    if as_json:
        out = {"policy": lp.policy.name, "path": lp.path, "run_rule": decision.run_rule,
               "scan_rule": decision.scan_rule, "reasons": list(decision.reasons),
               "targets": decision.targets.to_dict(), "conditions": conds, "changes": changes,
               "kernel_settings": settings}
        if vms is not None:
            out["vms"] = vms
        click.echo(json.dumps(out, indent=2))
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
    for name, what in settings.items():
        click.echo("  %s: %s" % (name, what))
    if vms is not None:
        click.echo("Guests (vms section):")
        for line in vms:
            click.echo(line)
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
    from ksmctl.policy.replay import replay
    lp = load_policy(policy_file)
    result = replay(lp.policy, trace_file)
    click.echo("Replaying policy %s over %s: decisions only (the readings are as recorded)." % (lp.policy.name, trace_file))
    if not summary:
        for row in result.rows:
            click.echo(row.format())
    click.echo(result.summary())

