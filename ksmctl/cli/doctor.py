"""`ksmctl doctor [VM...] [--json]`: why each guest merges or does not, and the kernel
settings behind it. Reads (collectors), then applies the rules in ksmctl/doctor/."""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import click

from ksmctl.collectors.memlayout import numa_nodes_with_memory, read_smaps, read_thp
from ksmctl.collectors.vms.backends import parse_guest_ram
from ksmctl.doctor.findings import Finding
from ksmctl.doctor.host import HostFacts, as_dict, host_findings
from ksmctl.doctor.report import EXIT_PROBLEM, exit_code, render, to_json
from ksmctl.doctor.vm import VmFacts, vm_findings
from ksmctl.guests.findings import merge_findings
from ksmctl.errors import KsmctlError, UsageError
from ksmctl.kernel.knobs import BY_NAME
from ksmctl.kernel.sysfs import KsmSysfs
from ksmctl.readings import KsmState, Readings, VmReading

from .context import CliContext, FiniteFloatRange, pass_cli
from .status import _ksmd_cpu_percent


def _writers(c: CliContext, daemon: Optional[Dict[str, Any]]) -> List[Tuple[str, str, str]]:
    from ksmctl.service.coexist import CoexistenceChecker
    from ksmctl.service.wiring import AdvisorMarker
    config = c.config_or_defaults()
    checker = CoexistenceChecker(c.proc_root, c.sys_root, config.run_root)
    ours = daemon is not None and AdvisorMarker(config.state_dir).exists()
    out = []
    for conflict in checker.scan(advisor_is_ours=ours):
        if conflict.kind == "ksmctl" and daemon is not None:
            continue  # the daemon itself: shown in the run state
        out.append((conflict.kind, conflict.description, conflict.how_to_stop))
    return out


def _conditions(c: CliContext, r: Readings) -> Tuple[Optional[str], List[Tuple[str, bool, str]]]:
    from ksmctl.policy.decide import evaluate, signals
    from ksmctl.policy.loader import load_policy
    try:
        lp = load_policy(c.config.policy)
    except KsmctlError:
        return None, []
    sig = signals(r)
    total = r.meminfo.total if r.meminfo else None
    out = []
    for group, items in (("start_when", lp.policy.run.start_when), ("stop_when", lp.policy.run.stop_when)):
        for cond in items:
            held, why = evaluate(cond, sig, total)
            out.append((group, held, why))
    return lp.policy.name, out


def _vendor_knobs(sysfs: KsmSysfs) -> Dict[str, str]:
    try:
        names = os.listdir(sysfs.dir)
    except OSError:
        return {}
    out = {}
    for name in sorted(set(names) - set(BY_NAME)):
        try:
            out[name] = sysfs.read_raw(name)[:80]
        except KsmctlError as e:
            out[name] = e.message
    return out


def _nosharepages(uri: Optional[str], vms: Sequence[VmReading]) -> Dict[str, bool]:
    """{uuid: has <nosharepages/>} from each guest's domain XML, when libvirt answers."""
    if not uri:
        return {}
    try:
        import libvirt
    except ImportError:
        return {}
    from ksmctl.collectors.vms.libvirt import nosharepages
    try:
        libvirt.registerErrorHandler(lambda _c, _e: None, None)
        conn = libvirt.openReadOnly(uri)
    except Exception:  # noqa: BLE001 - libvirt down: the XML findings are left out
        return {}
    out = {}
    try:
        for vm in vms:
            if vm.source != "libvirt":
                continue
            try:
                out[vm.uuid] = nosharepages(conn.lookupByUUIDString(vm.uuid).XMLDesc(0))
            except Exception:  # noqa: BLE001 - gone since the listing
                continue
    finally:
        conn.close()
    return out


def _select(vms: Sequence[VmReading], wanted: Sequence[str]) -> List[VmReading]:
    if not wanted:
        return list(vms)
    out: List[VmReading] = []
    missing: List[str] = []
    for w in wanted:
        hit = [v for v in vms if v.name == w or v.uuid == w.lower()]
        if not hit:
            missing.append(w)
        out.extend(v for v in hit if v not in out)
    if missing:
        raise UsageError("no running guest named %s (guests: %s)" % (
            ", ".join(repr(m) for m in missing), ", ".join(sorted(v.name for v in vms)) or "none"))
    return out


def diagnose(c: CliContext, wanted: Sequence[str], cpu_window: float) -> Tuple[Dict[str, Any], List[Finding],
                                                                                List[VmReading]]:
    sysfs = KsmSysfs(c.sys_root)
    daemon = c.daemon_state()
    ksm: Optional[KsmState] = sysfs.read() if sysfs.available() else None
    readings: Optional[Readings] = None
    vms: List[VmReading] = []
    if ksm is not None:
        vlog = logging.getLogger("ksmctl.vms")   # its fallback warning is for the daemon's log
        level = vlog.level
        vlog.setLevel(logging.ERROR)
        try:
            readings = c.collector(with_vms=True).collect()
        finally:
            vlog.setLevel(level)
        vms = _select(readings.vms or (), wanted)
    elif wanted:
        raise UsageError("this kernel has no KSM (%s does not exist): no guest can merge" % sysfs.dir)
    policy_name, conditions = _conditions(c, readings) if readings is not None else (None, [])
    host = HostFacts(ksm=ksm, ksm_dir=str(sysfs.dir), thp=read_thp(c.sys_root),
                     numa_nodes=numa_nodes_with_memory(c.sys_root),
                     numa_dir=os.path.join(c.sys_root, "devices/system/node"),
                     ksmd_cpu_percent=_ksmd_cpu_percent(c.procfs(), cpu_window) if ksm is not None else None,
                     writers=_writers(c, daemon) if ksm is not None else (), daemon=daemon,
                     conditions=conditions, policy_name=policy_name,
                     mergeable_bytes=readings.mergeable_rss if readings is not None else None,
                     vendor_knobs=_vendor_knobs(sysfs) if ksm is not None else {})
    findings = host_findings(host)
    config = c.config_or_defaults()
    xml = _nosharepages(config.libvirt_uri if config.libvirt else None, vms)
    procfs = c.procfs()
    for vm in vms:
        argv = maps = after = None
        if vm.pid is not None:
            argv = procfs.cmdline(vm.pid)
            maps = read_smaps(c.proc_root, vm.pid)
            after = procfs.ksm_stat(vm.pid) if maps is not None else None   # right after smaps
        facts = VmFacts(vm=vm, ram=parse_guest_ram(argv) if argv else None, nosharepages=xml.get(vm.uuid),
                        mappings=maps, ksm_after=after,
                        memory=vm.balloon_maximum, page_size=ksm.page_size if ksm else 4096,
                        ksm_running=bool(ksm and ksm.running))
        findings += vm_findings(facts)
    findings += merge_findings(daemon, vms)
    return as_dict(host), findings, vms


@click.command("doctor")
@click.argument("vm_names", nargs=-1, metavar="[VM]...")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON (format: docs/doctor.md).")
@click.option("--brief", is_flag=True, help="Causes and remedies only, without the evidence.")
@click.option("--cpu-window", default=0.25, show_default=True, type=FiniteFloatRange(0, 10),
              help="Seconds over which to measure ksmd's CPU use (0 to skip).")
@pass_cli
def doctor(c: CliContext, vm_names: Tuple[str, ...], as_json: bool, brief: bool, cpu_window: float) -> None:
    """Why each guest merges or does not, and the kernel settings behind it.

    Each finding has a severity (ok, info, warning, problem), its cause, the evidence
    (values and the files they were read from) and a remedy. VM selects guests by
    libvirt name or UUID (default: all). Exit code 0 when no problem was found, 5 when
    at least one was (2 for bad input, as every command)."""
    host, findings, vms = diagnose(c, vm_names, cpu_window)
    if as_json:
        click.echo(json.dumps(to_json(host, findings, vms), indent=2, sort_keys=True))
    else:
        click.echo(render(findings, vms, verbose=not brief))
    code = exit_code(findings)
    if code == EXIT_PROBLEM:
        raise click.exceptions.Exit(code)
