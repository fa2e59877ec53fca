"""Each running guest's merge setting: where it comes from, applying it, and its cost.

The wanted setting of a guest is, first match: a runtime change by `ksmctl merge`, a
policy rule (or the policy's default), trust-domain isolation, and else what the guest
was started with (domain XML <nosharepages/>, QEMU's mem-merge and backend merge=).
ksmctl sends QMP only to guests whose setting it manages (runtime, policy, isolation):
libvirt taints every domain it passes a monitor command to.
The data (sources, reports) and the unmerge guard are setting.py's.
"""
from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ksmctl.collectors.procfs import ProcFs
from ksmctl.collectors.vms.backends import parse_guest_ram
from ksmctl.errors import ErrorSource, KsmctlError, Refused
from ksmctl.guests.audit import Audit
from ksmctl.guests.qmp import GuestError, Qmp
from ksmctl.guests.runtime import ChangedBy, RuntimeChange, RuntimeChanges
from ksmctl.guests.setting import (MANAGED, GuestMerge, MergeReport, MergeSource, Facts, backend_ids, configured,
                                   guard)
from ksmctl.policy.vms import GuestIdentity, MergeMode, VmsSection, isolate, parse_metadata
from ksmctl.readings import KsmState, MemInfo, VmReading, VmSource
from ksmctl.units import format_bytes

log = logging.getLogger("ksmctl.guests")

# `virsh metadata` and `virsh desc` change a running guest's XML: re-read it this often.
XML_REFRESH = 60.0


class GuestController:
    """Applies wanted merge settings to running guests; the daemon's and the CLI's."""

    def __init__(self, qmp: Qmp, proc: ProcFs, runtime: RuntimeChanges, dry_run: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.dry_run = dry_run  # decide and report, change no guest
        self.clock = clock
        self.qmp = qmp
        self.proc = proc
        self.runtime = runtime
        self.audit = Audit()
        self._facts: Dict[str, Facts] = {}
        self._applied: Dict[str, int] = {}      # uuid -> pid ksmctl set a deny on (drift = violation)
        self._said: Dict[str, str] = {}          # uuid -> last pending message logged
        self._full_scans: Optional[int] = None   # this tick's ksmd full_scans (the audit's grace)

    # ---- facts -----------------------------------------------------------------------
    def facts(self, vm: VmReading) -> Facts:
        f = self._facts.get(vm.uuid)
        if f is not None and f.pid == vm.pid:
            if self.clock() - f.xml_read >= XML_REFRESH:
                f.identity, f.nosharepages = self._identity(vm, f.dom)
                f.xml_read = self.clock()
            return f
        dom = self.qmp.lookup(vm.uuid)
        ident, nosharepages = self._identity(vm, dom)
        argv = self.proc.cmdline(vm.pid) if vm.pid is not None else None
        f = Facts(pid=vm.pid, identity=ident, ram=parse_guest_ram(argv) if argv else None, dom=dom,
                  nosharepages=nosharepages, xml_read=self.clock())
        self._facts[vm.uuid] = f
        return f

    def _identity(self, vm: VmReading, dom: object) -> Tuple[GuestIdentity, bool]:
        """What selectors look at, and <nosharepages/>, from the domain XML."""
        try:
            root = ET.fromstring(self.qmp.xml(dom))
        except ET.ParseError as e:
            raise GuestError("%s: libvirt returned XML that does not parse: %s" % (vm.name, e)) from None
        ident = GuestIdentity(uuid=vm.uuid.lower(), name=vm.name, title=root.findtext("title") or "",
                              description=root.findtext("description") or "", metadata=parse_metadata(root))
        return ident, root.find("./memoryBacking/nosharepages") is not None

    def confirm(self, f: Facts) -> Tuple[Tuple[str, ...], str]:
        """Backend ids the command line names that qom-list /objects shows (QMP, once per process)."""
        ids, why = backend_ids(f.ram)
        if not ids:
            return (), why
        if f.confirmed is None:
            objs = self.qmp.objects(f.dom)
            f.confirmed = tuple(i for i in ids if i in objs)
        if not f.confirmed:
            return (), "qom-list /objects shows none of its RAM backends (%s)" % ", ".join(ids)
        return f.confirmed, ""

    def view(self, vms: Sequence[VmReading]) -> MergeReport:
        """Each guest's setting and its source as `ksmctl vms` shows it without a daemon:
        the command line, the XML and ksmctl's runtime changes; no QMP, no policy."""
        out, errors = [], []
        try:
            changes = self.runtime.load()
        except KsmctlError as e:
            errors.append((ErrorSource.OTHER, e.message))
            changes = {}
        for vm in vms:
            if vm.pid is None:
                continue
            try:
                f = self.facts(vm)
            except KsmctlError as e:
                errors.append((ErrorSource.LIBVIRT, e.message))
                continue
            c = changes.get(vm.uuid)
            setting, source, why = self._wanted(f, c if c is not None and c.pid == vm.pid else None, None)
            if c is not None and c.pid == vm.pid and c.by is ChangedBy.POLICY:
                setting, source, why = (MergeMode.allow if c.merge else MergeMode.deny), MergeSource.POLICY, c.why
            ids, not_ctl = backend_ids(f.ram)
            merging = vm.ksm.merging_pages if vm.ksm is not None else None
            denied = setting is MergeMode.deny and source in (MergeSource.DOMAIN_XML, MergeSource.QEMU_CMDLINE)
            out.append(GuestMerge(vm.uuid, vm.name, vm.pid, setting, source, why, ids, bool(ids), not_ctl, merging,
                                  violation=self.audit.check(vm.uuid, vm.name, denied, merging) or ""))
        return MergeReport(tuple(out), errors=tuple(errors))

    # ---- the daemon's tick ------------------------------------------------------------
    def tick(self, vms: Optional[Sequence[VmReading]], meminfo: Optional[MemInfo],
             section: Optional[VmsSection], ksm: Optional[KsmState] = None) -> MergeReport:
        """Apply and audit every running guest's wanted setting (the daemon, once a tick)."""
        page_size = ksm.page_size if ksm is not None else 4096
        self._full_scans = ksm.get("full_scans") if ksm is not None else None
        if vms is None:
            return MergeReport(violations_total=self.audit.violations_total)
        errors: List[Tuple[ErrorSource, str]] = []
        # Guests found in /proc while libvirt is down cannot be acted on; the outage is the collector's error.
        running = [v for v in vms if v.pid is not None and v.source is VmSource.LIBVIRT]
        facts: Dict[str, Facts] = {}
        for vm in running:
            try:
                facts[vm.uuid] = self.facts(vm)
            except KsmctlError as e:
                errors.append((ErrorSource.LIBVIRT, e.message))
        for gone in set(self._facts) - set(facts):
            self._facts.pop(gone, None)
        self.audit.forget(set(facts))
        try:
            changes = self._live_changes(facts)
        except KsmctlError as e:  # a broken runtime file: policy still applies, the file is left alone
            errors.append((ErrorSource.OTHER, e.message))
            changes = {}
        wanted, stop = self._wanted_all(facts, changes, section)
        out: List[GuestMerge] = []
        approved = 0
        for vm in running:
            f = facts.get(vm.uuid)
            if f is None:
                continue
            g, cost = self._enforce(vm, f, wanted[vm.uuid], changes.get(vm.uuid), meminfo, page_size, approved,
                                    errors)
            approved += cost
            out.append(g)
        return MergeReport(tuple(out), self.audit.violations_total, stop, tuple(errors))

    def _wanted_all(self, facts: Dict[str, Facts], changes: Dict[str, RuntimeChange],
                    section: Optional[VmsSection]) -> Tuple[Dict[str, Tuple[MergeMode, MergeSource, str]], str]:
        """Every guest's wanted setting, isolation included; and why KSM must stop ("": it need not)."""
        wanted = {u: self._wanted(f, changes.get(u), section) for u, f in facts.items()}
        if section is None:
            return wanted, ""
        allowed = [facts[u].identity for u, w in wanted.items() if w[0] is MergeMode.allow]
        deny, stopping, why = isolate(section, allowed)
        for u in deny:
            wanted[u] = (MergeMode.deny, MergeSource.ISOLATION, why)
        if why and self._said.get("isolation") != why:
            log.warning("isolation: %s%s", why,
                        "; denied: " + ", ".join(sorted(facts[u].identity.name for u in deny)) if deny else "")
        self._said["isolation"] = why
        return wanted, why if stopping else ""

    def plan(self, vms: Sequence[VmReading], meminfo: Optional[MemInfo], section: Optional[VmsSection],
             ksm: Optional[KsmState] = None) -> MergeReport:
        """What tick() would do now, for `policy explain`: each guest's wanted setting, what
        denying it costs and the guard's verdict (in `pending`); no QMP, nothing changed."""
        page_size = ksm.page_size if ksm is not None else 4096
        facts, errors = {}, []
        for vm in vms:
            if vm.pid is not None:
                try:
                    facts[vm.uuid] = self.facts(vm)
                except KsmctlError as e:
                    errors.append((ErrorSource.LIBVIRT, e.message))
        entries = {u: c for u, c in self.runtime.load().items() if u in facts and facts[u].pid == c.pid}
        wanted, stop = self._wanted_all(facts, entries, section)
        out, approved = [], 0
        for vm in vms:
            f = facts.get(vm.uuid)
            if f is None:
                continue
            setting, source, why = wanted[vm.uuid]
            c = entries.get(vm.uuid)
            runs_allowed = c.merge if c is not None else configured(f)[0] is MergeMode.allow
            ids, not_ctl = backend_ids(f.ram)
            merging = vm.ksm.merging_pages if vm.ksm is not None else None
            g = GuestMerge(vm.uuid, vm.name, vm.pid, setting, source, why, ids, bool(ids), not_ctl, merging)
            if setting is MergeMode.deny and runs_allowed and source in MANAGED:
                cost = (merging or 0) * page_size
                refusal = guard(cost, meminfo, approved) if ids else "not controllable: " + not_ctl
                approved += cost if refusal is None else 0
                g = replace(g, cost_bytes=cost, pending="would defer: " + refusal if refusal else "")
            out.append(g)
        return MergeReport(tuple(out), stop_ksm=stop, errors=tuple(errors))

    def _live_changes(self, facts: Dict[str, Facts]) -> Dict[str, RuntimeChange]:
        """Runtime entries of processes still running; entries of restarted QEMUs dropped."""
        entries = self.runtime.load()
        stale = [u for u, c in entries.items() if u in facts and facts[u].pid != c.pid]
        if stale:
            with self.runtime.edit() as e:
                for u in stale:
                    log.info("guest %s: its QEMU restarted; ksmctl's runtime merge change is void", e[u].name)
                    e.pop(u, None)
            entries = self.runtime.load()
        return {u: c for u, c in entries.items() if u in facts}

    @staticmethod
    def _wanted(f: Facts, change: Optional[RuntimeChange],
                section: Optional[VmsSection]) -> Tuple[MergeMode, MergeSource, str]:
        if change is not None and change.by is ChangedBy.CLI:
            return (MergeMode.allow if change.merge else MergeMode.deny), MergeSource.RUNTIME, change.why
        rule, which = section.rule_for(f.identity) if section is not None else (None, "")
        if rule is not None:
            return rule, MergeSource.POLICY, which
        return configured(f)

    def _enforce(self, vm: VmReading, f: Facts, want: Tuple[MergeMode, MergeSource, str],
                 entry: Optional[RuntimeChange], meminfo: Optional[MemInfo], page_size: int, approved: int,
                 errors: List[Tuple[ErrorSource, str]]) -> Tuple[GuestMerge, int]:
        setting, source, why = want
        merging = vm.ksm.merging_pages if vm.ksm is not None else None
        ids, not_ctl = backend_ids(f.ram)
        g = GuestMerge(vm.uuid, vm.name, vm.pid, setting, source, why, ids, bool(ids), not_ctl, merging)
        # A guest the policy changed and no longer covers goes back to what it was started with.
        reverting = source not in MANAGED and entry is not None and entry.by is ChangedBy.POLICY
        if source not in MANAGED and not reverting:
            return replace(g, violation=self.audit.check(vm.uuid, vm.name, setting is MergeMode.deny, merging,
                                                         full_scans=self._full_scans) or ""), 0
        try:
            ids, not_ctl = self.confirm(f)
            g = replace(g, backends=ids, controllable=bool(ids), not_controllable=not_ctl)
            if not ids:
                return self._pending(g, "not controllable: " + not_ctl), 0
            current = {b: self.qmp.get_merge(f.dom, b) for b in ids}
        except KsmctlError as e:
            errors.append((ErrorSource.LIBVIRT, e.message))
            return self._pending(g, e.message), 0
        value = setting is MergeMode.allow
        in_effect = all(v is value for v in current.values())
        # A deny is audited once it was in effect: before, merging pages are what it is about to unmerge.
        drift = not value and self._applied.get(vm.uuid) == vm.pid and not in_effect
        violation = self.audit.check(vm.uuid, vm.name, not value and (in_effect or drift), merging,
                                     backend_merge_on=drift, full_scans=self._full_scans) or ""
        g = replace(g, violation=violation)
        if in_effect:
            self._said.pop(vm.uuid, None)
            if reverting:
                self._forget(vm.uuid)
            if not value:
                self._applied[vm.uuid] = vm.pid or 0
            return g, 0
        cost = (merging or 0) * page_size if not value else 0
        refusal = guard(cost, meminfo, approved)
        if refusal is not None:
            return self._pending(replace(g, cost_bytes=cost), "deferred: " + refusal), 0
        if self.dry_run:
            return self._pending(replace(g, cost_bytes=cost), "dry run"), 0
        try:
            self.set(f, value, current)
        except KsmctlError as e:
            errors.append((ErrorSource.LIBVIRT, e.message))
            return self._pending(g, e.message), 0
        if reverting:
            self._forget(vm.uuid)
        elif source is not MergeSource.RUNTIME:
            self._record(vm, value, ChangedBy.POLICY, why, current)
        if not value:
            self._applied[vm.uuid] = vm.pid or 0
        self._said.pop(vm.uuid, None)
        log.info("guest %s: merge %s (%s: %s)%s", vm.name, "on" if value else "off", source, why,
                 ", unmerging up to %s" % format_bytes(cost) if cost else "")
        return replace(g, cost_bytes=cost), cost

    def _pending(self, g: GuestMerge, why: str) -> GuestMerge:
        if self._said.get(g.uuid) != why:
            self._said[g.uuid] = why
            log.warning("guest %s: merge %s (%s) not applied: %s", g.name, "on" if g.setting is MergeMode.allow
                        else "off", g.source, why)
        return replace(g, pending=why)

    def _forget(self, uuid: str) -> None:
        with self.runtime.edit() as entries:
            entries.pop(uuid, None)

    # ---- acting -----------------------------------------------------------------------
    def set(self, f: Facts, value: bool, current: Dict[str, Optional[bool]]) -> None:
        for b, v in current.items():
            if v is not value:
                self.qmp.set_merge(f.dom, b, value)

    def _record(self, vm: VmReading, value: bool, by: ChangedBy, why: str,
                current: Dict[str, Optional[bool]]) -> None:
        with self.runtime.edit() as e:
            old = e.get(vm.uuid)
            original = old.original if old is not None and old.pid == vm.pid else dict(current)
            e[vm.uuid] = RuntimeChange(vm.uuid, vm.name, vm.pid or 0, value, by, why, original)

    def change(self, vm: VmReading, value: bool, meminfo: Optional[MemInfo], page_size: int = 4096,
               dry_run: bool = False, force: bool = False, already: int = 0) -> Tuple[str, int]:
        """`ksmctl merge on|off` for one guest: (what was done, bytes it unmerged)."""
        f = self.facts(vm)
        merging = vm.ksm.merging_pages if vm.ksm is not None else None
        cost = (merging or 0) * page_size if not value else 0
        word = "on" if value else "off"
        refusal = guard(cost, meminfo, already)
        cost_text = "unmerges up to %s (%s merging pages)" % (format_bytes(cost), merging) if not value else \
            "lets ksmd merge it again"
        if dry_run:
            ids, why = backend_ids(f.ram)
            if not ids:
                raise GuestError("%s: not controllable: %s" % (vm.name, why))
            return ("%s: would set merge %s on %s (from the QEMU command line; --dry-run sends no QMP): %s%s"
                    % (vm.name, word, ", ".join(ids), cost_text,
                       "; the guard would refuse: " + refusal if refusal else "")), cost
        ids, why = self.confirm(f)
        if not ids:
            raise GuestError("%s: not controllable: %s" % (vm.name, why))
        if refusal is not None and not force:
            raise Refused("%s: refusing merge off: %s. Free memory first, or use --force to risk the OOM killer."
                          % (vm.name, refusal))
        current = {b: self.qmp.get_merge(f.dom, b) for b in ids}
        self.set(f, value, current)
        self._record(vm, value, ChangedBy.CLI, "ksmctl merge " + word, current)
        return "%s: merge %s on %s: %s" % (vm.name, word, ", ".join(ids), cost_text), cost

    def restore(self, meminfo: Optional[MemInfo], vms: Sequence[VmReading], page_size: int = 4096) -> None:
        """At stop (restore_on_exit): put back what the daemon's policy changed."""
        by_uuid = {v.uuid: v for v in vms if v.pid is not None}
        with self.runtime.edit() as e:
            for u, c in list(e.items()):
                vm = by_uuid.get(u)
                if c.by is not ChangedBy.POLICY or vm is None or vm.pid != c.pid:
                    continue
                try:
                    f = self.facts(vm)
                    back = {b: v for b, v in c.original.items() if v is not None and v is not c.merge}
                    cost = (vm.ksm.merging_pages or 0) * page_size if vm.ksm and False in back.values() else 0
                    refusal = guard(cost, meminfo)
                    if refusal is not None:
                        log.warning("guest %s: not restoring merge=off: %s", vm.name, refusal)
                        continue
                    for b, v in back.items():
                        self.qmp.set_merge(f.dom, b, v)
                    log.info("guest %s: restored merge settings %s", vm.name, back or "(unchanged)")
                    del e[u]
                except KsmctlError as err:
                    log.error("guest %s: could not restore its merge setting: %s", vm.name, err.message)
