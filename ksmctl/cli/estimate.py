"""`ksmctl estimate`: is ksmd's CPU buying anything? Registered by the main CLI with
`cli.add_command(estimate)`."""
from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, List, Optional, Sequence, TextIO

import click

from ksmctl.errors import EXIT_FAILURE, KsmctlError
from ksmctl.estimate.discover import TargetKind, resolve_targets

from .context import FiniteFloatRange

if TYPE_CHECKING:
    from ksmctl.estimate.result import EstimateResult, Progress

EXIT_INTERRUPTED = 130   # shell convention for SIGINT; the partial result is still printed


def _size(n_bytes: float) -> str:
    n = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return ("%.0f %s" if unit == "B" else "%.1f %s") % (n, unit)
        n /= 1024
    return "%.1f TiB" % n   # pragma: no cover


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else "%.0f%%" % (100 * x)


def _duration(s: Optional[float]) -> str:
    if s is None:
        return "--:--"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    return ("%d:%02d:%02d" % (h, rem // 60, rem % 60)) if h else ("%d:%02d" % (rem // 60, rem % 60))


class ProgressLine:
    """One self-overwriting stderr line: bar, bytes, rate and time left."""

    def __init__(self, stream: TextIO, width: int = 24) -> None:
        self.stream = stream
        self.width = width
        self.shown = False

    def __call__(self, p: Progress) -> None:
        frac = min(1.0, p.done_bytes / p.total_bytes) if p.total_bytes else 0.0
        fill = int(frac * self.width)
        line = "[%s%s] %3.0f%% %s / %s  %s/s  ETA %s  %s" % (
            "#" * fill, "-" * (self.width - fill), 100 * frac, _size(p.done_bytes),
            _size(p.total_bytes), _size(p.rate_bytes_per_s), _duration(p.eta_s), p.target[:30])
        self.stream.write("\r" + line.ljust(100)[:110])
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * 110 + "\r")
            self.stream.flush()
            self.shown = False


def render_table(r: EstimateResult) -> str:
    ps = r.page_size
    rows: List[Sequence[str]] = [(
        "TARGET", "PID", "SCANNED", "ZERO", "ACHIEVABLE", "ALONE", "ACHIEVED", "EFFICIENCY", "REMAINING")]
    for t in r.targets:
        rows.append((
            ("vm " if t.kind is TargetKind.VM else "") + t.name, str(t.pid), _size(t.scanned_pages * ps),
            _size(t.zero_pages * ps), _size(t.achievable_share * ps), _size(t.achievable_alone * ps),
            _size(t.achieved_share * ps), _pct(t.efficiency), _size(t.remaining_share * ps)))
    rows.append((
        "ALL (%d)" % len(r.targets), "", _size(r.scanned_pages * ps), _size(r.zero_pages * ps),
        _size(r.achievable * ps), "", _size(r.achieved * ps), _pct(r.efficiency),
        _size(r.remaining * ps)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if i == len(rows) - 2:
            lines.append("-" * len(lines[0]))
    out = []
    if r.partial:
        out.append("PARTIAL RESULT: the scan was interrupted; figures cover only what was read.")
    out.extend(lines)
    out.append("")
    out.append("achievable = pages that could share a frame (duplicates minus distinct contents), "
               "zero pages included;")
    out.append("  of which zero pages: %s (%s of %s zero pages already map the zero page; "
               "use_zero_pages=%d)" % (_size(r.zero_saving * ps), r.zero_mapped_pages,
                                       r.zero_pages, r.use_zero_pages))
    out.append("  between targets: %s more than each target deduplicated alone (ALONE)"
               % _size(r.cross_target * ps))
    out.append("  reachable with max_page_sharing=%d: %s" % (r.max_page_sharing,
                                                          _size(r.achievable_capped * ps)))
    h = r.host
    if h:
        out.append("host KSM now: pages_sharing=%s pages_shared=%s ksm_zero_pages=%s "
                   "general_profit=%s run=%s" % (
                       h.get("pages_sharing", "-"), h.get("pages_shared", "-"),
                       h.get("ksm_zero_pages", "-"),
                       _size(h["general_profit"]) if "general_profit" in h else "-",
                       h.get("run", "-")))
    for s in r.skipped:
        out.append("note: skipped %s (pid %d): %s" % (s.name, s.pid, s.reason))
    unread = r.unreadable_pages
    if unread:
        out.append("note: %d present pages could not be read (unmapped during the scan)" % unread)
    out.append("scanned %s in %.1fs (%s/s, %.1f CPU s)" % (
        _size(r.bytes_read), r.elapsed_s,
        _size(r.bytes_read / r.elapsed_s) if r.elapsed_s > 0 else "-", r.cpu_s))
    return "\n".join(out)


def _run(vms: Sequence[str], pids: Sequence[int], rate: Optional[float], as_json: bool,
         no_progress: bool, proc_root: str, sys_root: str) -> int:
    from ksmctl.extras import require
    require("estimate", "ksmctl estimate")
    from ksmctl.estimate.scan import Estimator   # numpy: only when the command runs, not for every CLI call
    err = sys.stderr
    bar: Optional[ProgressLine] = None
    if not no_progress and err.isatty():
        bar = ProgressLine(err)
    try:
        targets = resolve_targets(vms, pids, proc_root)
        if not targets:
            click.echo("no process has mergeable memory (nothing to estimate)", err=True)
        est = Estimator(proc_root=proc_root, sys_root=sys_root, progress=bar,
                        rate_limit_bytes_per_s=rate * 1024 * 1024 if rate else None)
        result = est.run(targets)
    except KsmctlError as e:
        if bar:
            bar.close()
        click.echo("ksmctl estimate: %s" % e.message, err=True)
        return e.exit_code
    except OSError as e:
        if bar:
            bar.close()
        click.echo("ksmctl estimate: %s" % e, err=True)
        return EXIT_FAILURE
    if bar:
        bar.close()
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, sort_keys=False))
    else:
        click.echo(render_table(result))
    if result.partial:
        click.echo("ksmctl estimate: interrupted; the result above is partial", err=True)
        return EXIT_INTERRUPTED
    return 0


@click.command("estimate")
@click.option("--vm", "vms", multiple=True, metavar="NAME",
              help="QEMU guest to scan (by its -name); repeatable.")
@click.option("--pid", "pids", multiple=True, type=click.IntRange(min=1), metavar="PID",
              help="Process to scan; repeatable. Default: every process with mergeable memory.")
@click.option("--rate", type=FiniteFloatRange(min=1 / 1024, max=1024 * 1024), metavar="MiB/s",
              help="Read at most this many MiB of guest memory per second.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--no-progress", is_flag=True, help="No progress line on stderr.")
@click.pass_context
def estimate(ctx: click.Context, vms, pids, rate, as_json, no_progress) -> None:
    """Estimate how much memory KSM could save, and how much it saves now.

    Reads only pages present in RAM (never faults in swapped-out or untouched memory),
    hashes each page in memory (XXH3-128), never stores or prints page contents.
    Needs root. Ctrl-C stops and prints a partial result (exit code 130).
    """
    ctx.exit(_run(vms, pids, rate, as_json, no_progress, ctx.obj.proc_root, ctx.obj.sys_root))
