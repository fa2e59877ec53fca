"""`ksmctl merge off|on VM...`: take running guests out of KSM, or let them merge again.

Acts through QMP (libvirt qemu-monitor-command, which marks the domain tainted) on the
guest's RAM backends; `off` unmerges the guest's pages and is refused unless
MemAvailable absorbs them plus the margin `ksmctl unmerge` keeps. The change is recorded
under the state dir, so a running daemon keeps it over its policy until the guest's QEMU
restarts or `ksmctl merge` changes it again.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import click

from ksmctl.errors import UsageError
from ksmctl.readings import VmReading

from .context import CliContext, pass_cli


def _find(vms: List[VmReading], ident: str) -> VmReading:
    low = ident.lower()
    hits = [v for v in vms if v.uuid.lower() == low] or [v for v in vms if v.name == ident]
    if not hits:
        raise UsageError("no running guest named %r or with that UUID (running: %s)"
                         % (ident, ", ".join(sorted(v.name for v in vms)) or "none"))
    vm = hits[0]
    if vm.pid is None:
        raise UsageError("guest %s: its QEMU process could not be verified (see `ksmctl vms`)" % vm.name)
    return vm


def run_merge(c: CliContext, value: bool, idents: Tuple[str, ...], dry_run: bool, force: bool) -> List[str]:
    from ksmctl.guests.control import GuestController
    from ksmctl.guests.qmp import Qmp
    from ksmctl.guests.runtime import RuntimeChanges
    from .vms import collect_live

    config = c.config
    if not config.libvirt:
        raise UsageError("merge control needs libvirt (the config sets libvirt: false)")
    vms, ksm, source = collect_live(config.libvirt_uri, c.proc_root, c.sys_root, config.run_root)
    if source != "libvirt":
        raise UsageError("merge control needs libvirt at %s; per-VM data came from %s" % (config.libvirt_uri, source))
    targets = [_find(vms, i) for i in idents]
    procfs = c.procfs()
    meminfo = procfs.meminfo()
    page_size = ksm.page_size if ksm is not None else 4096
    qmp = Qmp(config.libvirt_uri)
    ctl = GuestController(qmp, procfs, RuntimeChanges(config.state_dir))
    out, already = [], 0
    try:
        for vm in targets:
            line, cost = ctl.change(vm, value, meminfo, page_size, dry_run=dry_run, force=force, already=already)
            already += cost
            out.append(line)
            click.echo(line)
    finally:
        qmp.close()
    return out


@click.group("merge")
def merge() -> None:
    """Take running guests out of KSM (off) or let them merge again (on), without a restart.

    VM is a libvirt domain name or UUID. `off` unmerges the guest's merged pages, which
    allocates up to its ksm_merging_pages: refused (exit 4) unless MemAvailable absorbs
    that plus max(5% of RAM, 256 MiB). libvirt marks the domain tainted (custom-monitor)."""


def _command(value: bool) -> click.Command:
    @click.command("on" if value else "off")
    @click.argument("guests", nargs=-1, required=True, metavar="VM...")
    @click.option("--dry-run", is_flag=True, help="Say what would change and what it costs; send no QMP.")
    @click.option("--force", is_flag=True, help="Unmerge even when MemAvailable cannot absorb it (OOM risk).")
    @pass_cli
    def cmd(c: CliContext, guests: Tuple[str, ...], dry_run: bool, force: bool) -> None:
        run_merge(c, value, guests, dry_run, force and not value)
    cmd.help = ("Let VM... merge again (merge=on on its RAM backends)." if value else
                "Take VM... out of KSM now (merge=off on its RAM backends), unmerging its pages.")
    return cmd


merge.add_command(_command(False))
merge.add_command(_command(True))


def explain_merge(c: CliContext, section: Any, r: Any) -> Optional[List[str]]:
    """`policy explain`'s lines for the vms section: each guest's wanted setting, what
    denying it would unmerge, and the guard's verdict (no QMP). None without a section."""
    if section is None:
        return None
    if r.vm_source is None or str(r.vm_source) != "libvirt" or r.vms is None:
        return ["vms: per-VM merge control needs libvirt; per-VM data came from %s" % (r.vm_source or "nowhere")]
    from ksmctl.guests.control import GuestController
    from ksmctl.guests.qmp import Qmp
    from ksmctl.guests.runtime import RuntimeChanges
    from ksmctl.units import format_bytes
    qmp = Qmp(c.config.libvirt_uri)
    try:
        report = GuestController(qmp, c.procfs(), RuntimeChanges(c.config.state_dir)).plan(
            r.vms, r.meminfo, section, r.ksm)
    finally:
        qmp.close()
    lines = ["  %s: merge %s (%s%s)%s%s" % (
        g.name, g.setting.value, g.source, ": " + g.why if g.why else "",
        ", unmerges up to %s" % format_bytes(g.cost_bytes) if g.cost_bytes else "",
        "; " + g.pending if g.pending else "") for g in report.guests]
    if report.stop_ksm:
        lines.append("  isolation: " + report.stop_ksm)
    return lines + ["  error: %s" % m for _, m in report.errors]
