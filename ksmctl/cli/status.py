"""`ksmctl status`: what KSM saves and costs now, and what the daemon last decided."""
from __future__ import annotations

import json
import time
from typing import Any, Dict, List, Optional, Tuple

import click

from ksmctl.collectors.host import HostCollector
from ksmctl.collectors.procfs import ProcFs
from ksmctl.errors import KsmctlError
from ksmctl.readings import Readings
from ksmctl.units import format_bytes

from .context import CliContext, FiniteFloatRange, pass_cli


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


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--cpu-window", default=0.25, show_default=True, type=FiniteFloatRange(0, 10),
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
    states: Dict[Optional[int], str] = {0: "stopped", 1: "running", 2: "unmerging / stopped after unmerge"}
    state = states.get(run, "unknown")
    rows: List[Tuple[str, str]] = [("KSM", "%s (run=%s)%s" % (state, run, ", advisor %s" % k.advisor_mode
                                                           if k.advisor_mode else ""))]
    rows.append(("Scan rate", "%s pages every %s ms; %s full scans, %s pages scanned" % (
        k.get("pages_to_scan"), k.get("sleep_millisecs"), k.values.get("full_scans", "?"), k.values.get("pages_scanned", "?"))))
    saved = "%s (pages_sharing %s + ksm_zero_pages %s)" % (format_bytes(k.saved_bytes), k.get("pages_sharing", 0),
                                                          k.values.get("ksm_zero_pages", "n/a"))
    rows.append(("Memory saved", saved))
    gp = k.get("general_profit")
    rows.append(("General profit", "not supported by this kernel" if gp is None else
                 format_bytes(gp) + ("  (negative: KSM costs more than it saves)" if gp < 0 else "")))
    rows.append(("Merged pages", "shared %s, sharing %s, unshared %s, volatile %s" % tuple(
        k.values.get(n, "?") for n in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile"))))
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

