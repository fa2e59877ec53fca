"""`ksmctl vms`: which VMs KSM saves memory for, and how much.

With a running daemon the rows come from its state file (the daemon's last tick); without
one, ksmctl collects them itself (libvirt, else /proc) and reads the host's saving from
sysfs. Either way one row per VM, the saving attributed as in collectors.vms.vm_savings.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Dict, List, Optional, Tuple

import click

from ksmctl.config import DEFAULT_STATE_FILE
from ksmctl.errors import KsmctlError
from ksmctl.readings import KsmState, VmReading, VmSource, vm_dicts, vm_from_dict
from ksmctl.service.state import find_state
from ksmctl.units import format_bytes

SORT_KEYS = ("saved", "share", "merging", "memory", "name", "uuid", "state")
_NUMERIC = ("saved", "share", "merging", "memory")


def ksm_from_dict(d: Dict[str, Any]) -> Optional[KsmState]:
    if not isinstance(d, dict) or not isinstance(d.get("values"), dict):
        return None
    return KsmState(values={k: v for k, v in d["values"].items() if isinstance(v, int)},
                    page_size=int(d.get("page_size") or 4096))


def from_daemon(state: Dict[str, Any]) -> Optional[Tuple[List[VmReading], Optional[KsmState], str]]:
    readings = state.get("readings")
    if not isinstance(readings, dict):
        return None
    rows = vm_dicts(readings.get("vms"))
    if rows is None:
        return None
    vms = [vm_from_dict(v) for v in rows]
    age = time.time() - float(state.get("updated") or time.time())
    return vms, ksm_from_dict(readings.get("ksm") or {}), "daemon (state %.0fs old)" % max(age, 0)


def collect_live(uri: Optional[str], proc_root: str, sys_root: str,
                 run_root: str) -> Tuple[List[VmReading], Optional[KsmState], str]:
    from ksmctl.collectors.procfs import ProcFs
    from ksmctl.kernel.sysfs import KsmSysfs
    from ksmctl.collectors.vms import VmCollector
    collector = VmCollector(uri=uri, proc=ProcFs(proc_root), run_root=run_root, events=False)
    # The collector's "falling back to /proc, retrying" warning is for the daemon's log;
    # here the source line of the output says it.
    vlog = logging.getLogger("ksmctl.vms")
    level = vlog.level
    vlog.setLevel(logging.ERROR)
    try:
        vms = list(collector.collect())
        source = str(collector.source or VmSource.PROC)
        if source == VmSource.PROC and collector.last_error:
            source = "%s (%s)" % (VmSource.PROC, collector.last_error)
    finally:
        vlog.setLevel(level)
        collector.close()
    try:
        ksm: Optional[KsmState] = KsmSysfs(sys_root).read()
    except KsmctlError:
        ksm = None
    return vms, ksm, source


def merge_live(uri: Optional[str], proc_root: str, state_dir: str, vms: List[VmReading]) -> Dict[str, Dict[str, Any]]:
    """Each guest's merge setting without a daemon ({} when libvirt cannot tell)."""
    if not uri:
        return {}
    from ksmctl.collectors.procfs import ProcFs
    from ksmctl.guests.control import GuestController
    from ksmctl.guests.qmp import Qmp
    from ksmctl.guests.runtime import RuntimeChanges
    qmp = Qmp(uri)
    try:
        report = GuestController(qmp, ProcFs(proc_root), RuntimeChanges(state_dir)).view(vms)
    except KsmctlError:
        return {}
    finally:
        qmp.close()
    return {g.uuid: g.to_dict() for g in report.guests}


def merge_from_daemon(state: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    merge = state.get("merge")
    guests = merge.get("guests") if isinstance(merge, dict) else None
    return {g["uuid"]: g for g in guests if isinstance(g, dict) and "uuid" in g} if isinstance(guests, list) else {}


def merge_cell(m: Optional[Dict[str, Any]]) -> str:
    """deny:policy, allow:qemu_cmdline; ! a violation, ? not in effect yet (pending)."""
    if not m:
        return "-"
    return "%s:%s%s%s" % (m.get("merge"), m.get("source"), "!" if m.get("violation") else "",
                          "?" if m.get("pending") else "")


def rows(vms: List[VmReading], ksm: Optional[KsmState],
         merge: Optional[Dict[str, Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    from ksmctl.collectors.vms import vm_savings
    savings = vm_savings(vms, ksm)
    out: List[Dict[str, Any]] = []
    for vm in vms:
        s = savings.get(vm.uuid, {})
        saved = s.get("saved_bytes")
        memory = vm.balloon_current if vm.balloon_current is not None else vm.rss
        out.append({
            "name": vm.name, "uuid": vm.uuid, "state": vm.state, "pid": vm.pid, "source": vm.source,
            "memory_bytes": memory, "rss_bytes": vm.rss,
            "merging_pages": vm.ksm.merging_pages if vm.ksm else None,
            "zero_pages": vm.ksm.zero_pages if vm.ksm else None,
            "process_profit_bytes": vm.ksm.process_profit if vm.ksm else None,
            "saved_bytes": int(saved) if saved is not None else None,
            "share": s.get("share"), "excluded": vm.excluded,
        })
        if merge:
            out[-1]["merge"] = merge.get(vm.uuid)
    return out


def _sort_key(key: str):
    field = {"saved": "saved_bytes", "memory": "memory_bytes", "merging": "merging_pages"}.get(key, key)

    def k(row: Dict[str, Any]):
        v = row.get(field)
        # Unknown values sort last in both directions.
        return (v is None, v if v is not None else 0, row["name"])
    return k


def _fmt(row: Dict[str, Any]) -> List[str]:
    def opt(v: Any, f) -> str:
        return "-" if v is None else f(v)
    return [row["name"], row["uuid"], row["state"], opt(row["memory_bytes"], format_bytes),
            opt(row["merging_pages"], str),
            "excluded" if row["excluded"] and not row["saved_bytes"] else opt(row["saved_bytes"], format_bytes),
            opt(row["share"], lambda s: "%.1f%%" % (100 * s)), "yes" if row["excluded"] else "no"] + \
        ([merge_cell(row["merge"])] if "merge" in row else [])


def render_table(table: List[Dict[str, Any]], host_saved: Optional[int], source: str) -> str:
    head = ["NAME", "UUID", "STATE", "MEMORY", "MERGING", "SAVED", "SHARE", "EXCLUDED"] + \
        (["MERGE"] if table and "merge" in table[0] else [])
    body = [_fmt(r) for r in table]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    right = {3, 4, 5, 6}
    lines = []
    for cells in [head] + body:
        lines.append("  ".join(c.rjust(w) if i in right else c.ljust(w)
                               for i, (c, w) in enumerate(zip(cells, widths))).rstrip())
    total = sum(r["saved_bytes"] or 0 for r in table)
    lines.append("")
    lines.append("%d VM%s, %s saved in guests of %s saved on the host; source: %s" % (
        len(table), "" if len(table) == 1 else "s", format_bytes(total),
        format_bytes(host_saved) if host_saved is not None else "unknown", source))
    return "\n".join(lines)


@click.command("vms")
@click.option("--sort", "sort_key", type=click.Choice(SORT_KEYS), default="saved", show_default=True,
              help="Column to sort by (sizes and shares largest first).")
@click.option("--reverse", is_flag=True, help="Reverse the sort order.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--state-file", type=click.Path(dir_okay=False),
              help="The daemon's state file [default: from the config, %s]." % DEFAULT_STATE_FILE)
@click.option("--live", is_flag=True, help="Collect now even when a daemon is running.")
@click.option("--uri", help="libvirt URI for live collection [default: from the config, qemu:///system].")
@click.pass_context
def vms(ctx: click.Context, sort_key: str, reverse: bool, as_json: bool, state_file: Optional[str],
        live: bool, uri: Optional[str]) -> None:
    """One row per VM: what KSM saves for it and its share of the host's saving.

    SAVED credits each of a VM's merged pages with the fraction of a page KSM saves per
    merged page host-wide (pages_sharing / (pages_sharing + pages_shared)), plus its KSM
    zero pages; the SAVED column sums to the host's saving less what merged outside VMs.
    VMs that opted out of merging (nosharepages, mem-merge=off) show as excluded."""
    c = ctx.obj  # the group's CliContext
    config = c.config_or_defaults()
    if state_file is None:
        state_file = config.state_file
    if uri is None:
        uri = config.libvirt_uri if config.libvirt else ""
    run_root = config.run_root

    got = None
    merge: Dict[str, Dict[str, Any]] = {}
    if not live:
        state = find_state(state_file)
        if state is not None:
            got = from_daemon(state)
            merge = merge_from_daemon(state) if got is not None else {}
    if got is None:
        got = collect_live(uri, c.proc_root, c.sys_root, run_root)
        if got[2] == VmSource.LIBVIRT:
            merge = merge_live(uri, c.proc_root, config.state_dir, got[0])
    vm_list, ksm, source = got
    table = rows(vm_list, ksm, merge)
    table.sort(key=_sort_key(sort_key), reverse=(sort_key in _NUMERIC) != reverse)
    if sort_key in _NUMERIC and not reverse:
        # reverse=True also flipped "unknown last": put unknowns back at the end.
        table = [r for r in table if _sort_key(sort_key)(r)[0] is False] + \
                [r for r in table if _sort_key(sort_key)(r)[0] is True]
    host_saved = ksm.saved_bytes if ksm is not None else None
    if as_json:
        click.echo(json.dumps({"source": source, "host_saved_bytes": host_saved,
                               "pages_sharing": ksm.get("pages_sharing") if ksm else None,
                               "pages_shared": ksm.get("pages_shared") if ksm else None,
                               "vms": table}, indent=2))
    else:
        click.echo(render_table(table, host_saved, source))
