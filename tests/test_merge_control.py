"""Per-VM merge control with a fake QMP layer: wanted settings and their sources, the
unmerge guard, the audit, runtime changes across restarts, isolation, restore, metrics.
The real thing (libvirtd, QEMU guests, ksmd) is tests/test_lab_merge.py."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from ksmctl.collectors.procfs import ProcFs
from ksmctl.errors import Refused, UsageError
from ksmctl.guests.audit import RESIDUAL_PAGES
from ksmctl.guests.control import GuestController, MergeSource
from ksmctl.guests.metrics import merge_families
from ksmctl.guests.qmp import GuestError
from ksmctl.guests.runtime import FILE_NAME, RuntimeChanges
from ksmctl.policy.loader import parse_policy
from ksmctl.policy.vms import METADATA_NS, MergeMode
from ksmctl.readings import KsmStat, KsmState, MemInfo, VmReading
from tests.fixtures import make_proc

GIB = 1024 ** 3
PLENTY = MemInfo(total=16 * GIB, available=12 * GIB, free=12 * GIB)
LOW = MemInfo(total=16 * GIB, available=900 * 1024 ** 2, free=900 * 1024 ** 2)  # margin 819 MiB + cost > 900 MiB

JSON_CMDLINE = ["/usr/bin/qemu-system-x86_64", "-name", "guest=%s", "-machine", "pc,memory-backend=pc.ram",
                "-object", '{"qom-type":"memory-backend-ram","id":"pc.ram","size":268435456}', "-m", "256"]
OLD_CMDLINE = ["/usr/bin/qemu-system-x86_64", "-name", "guest=%s", "-m", "256"]


class FakeDomain:
    def __init__(self, uuid: str, name: str, xml: str) -> None:
        self.uuid, self._name, self.xml = uuid, name, xml

    def name(self) -> str:
        return self._name


class FakeQmp:
    """Stands in for libvirt + QEMU's QMP: each guest's QOM objects and their `merge`
    property; records every qom-set so a test sees what ksmctl told QEMU."""

    def __init__(self) -> None:
        self.doms: Dict[str, FakeDomain] = {}
        self.merge: Dict[Tuple[str, str], bool] = {}
        self.sets: List[Tuple[str, str, bool]] = []
        self.fail_set = False

    def add(self, uuid: str, name: str, backends=("pc.ram",), xml_extra: str = "") -> None:
        self.doms[uuid] = FakeDomain(uuid, name, "<domain><name>%s</name><uuid>%s</uuid>%s</domain>"
                                     % (name, uuid, xml_extra))
        for b in backends:
            self.merge[(uuid, b)] = True

    def lookup(self, ident: str) -> FakeDomain:
        if ident not in self.doms:
            raise UsageError("no guest %r" % ident)
        return self.doms[ident]

    def xml(self, dom: FakeDomain) -> str:
        return dom.xml

    def objects(self, dom: FakeDomain) -> Dict[str, str]:
        return {b: "child<memory-backend-ram>" for (u, b) in self.merge if u == dom.uuid}

    def get_merge(self, dom: FakeDomain, backend: str) -> Optional[bool]:
        return self.merge[(dom.uuid, backend)]

    def set_merge(self, dom: FakeDomain, backend: str, value: bool) -> None:
        if self.fail_set:
            raise GuestError("%s: QMP qom-set refused: Property not found" % dom.name())
        self.merge[(dom.uuid, backend)] = value
        self.sets.append((dom.name(), backend, value))


U1, U2, U3 = ("11111111-1111-1111-1111-11111111111%d" % i for i in (1, 2, 3))


def vm(uuid: str, name: str, pid: int, merging: int = 0) -> VmReading:
    return VmReading(uuid=uuid, name=name, pid=pid, ksm=KsmStat(merging_pages=merging))


@pytest.fixture
def env(tmp_path: Path):
    procs = {}
    for pid, name, argv in ((101, "web1", JSON_CMDLINE), (102, "db1", JSON_CMDLINE), (103, "old1", OLD_CMDLINE)):
        procs[pid] = {"cmdline": "\0".join(a.replace("%s", name) for a in argv) + "\0"}
    proc = ProcFs(str(make_proc(tmp_path / "proc", processes=procs)))
    qmp = FakeQmp()
    qmp.add(U1, "web1", xml_extra="<metadata><k:guest xmlns:k='%s' tenant='a'/></metadata>" % METADATA_NS)
    qmp.add(U2, "db1", xml_extra="<title>database</title><metadata><k:guest xmlns:k='%s' tenant='b'/></metadata>"
            % METADATA_NS)
    qmp.add(U3, "old1", backends=())
    ctl = GuestController(qmp, proc, RuntimeChanges(str(tmp_path / "state")))  # type: ignore[arg-type]
    return ctl, qmp, tmp_path


def section(text: str):
    return parse_policy("name: t\nvms:\n" + text, "p.yaml").vms


def guests(vms_merging=(5000, 6000, 0)):
    return [vm(U1, "web1", 101, vms_merging[0]), vm(U2, "db1", 102, vms_merging[1]), vm(U3, "old1", 103, vms_merging[2])]


def by_name(report):
    return {g.name: g for g in report.guests}


def test_no_policy_sends_no_qmp_and_reports_where_settings_come_from(env):
    ctl, qmp, _ = env
    r = by_name(ctl.tick(guests(), PLENTY, None))
    assert qmp.sets == []
    assert r["web1"].setting is MergeMode.allow and r["web1"].source is MergeSource.QEMU_CMDLINE
    assert r["web1"].controllable and r["web1"].backends == ("pc.ram",)
    assert not r["old1"].controllable and "no memory backend object" in r["old1"].not_controllable


def test_policy_deny_by_glob_applies_once_and_is_remembered(env):
    ctl, qmp, tmp = env
    sec = section("  rules:\n    - {match: {name: 'web*'}, merge: deny}\n")
    r = by_name(ctl.tick(guests(), PLENTY, sec))
    assert qmp.sets == [("web1", "pc.ram", False)]
    assert r["web1"].source is MergeSource.POLICY and r["web1"].why == "vms.rules[0]"
    assert r["web1"].cost_bytes == 5000 * 4096 and not r["web1"].pending
    assert r["db1"].setting is MergeMode.allow
    ctl.tick(guests((RESIDUAL_PAGES, 6000, 0)), PLENTY, sec)
    assert len(qmp.sets) == 1  # already in effect: nothing sent again
    saved = json.loads((tmp / "state" / FILE_NAME).read_text())["guests"][U1]
    assert saved == {"name": "web1", "pid": 101, "merge": False, "by": "policy", "why": "vms.rules[0]",
                     "original": {"pc.ram": True}}


def test_guard_defers_a_deny_the_host_cannot_absorb(env, caplog):
    ctl, qmp, _ = env
    sec = section("  default: deny\n")
    with caplog.at_level(logging.WARNING, "ksmctl.guests"):
        r = by_name(ctl.tick(guests((30000, 0, 0)), LOW, sec))
        ctl.tick(guests((30000, 0, 0)), LOW, sec)
    assert ("web1", "pc.ram", False) not in qmp.sets
    assert r["web1"].pending.startswith("deferred: unmerging would allocate up to 117.2 MiB")
    assert r["web1"].cost_bytes == 30000 * 4096
    assert ("db1", "pc.ram", False) in qmp.sets  # nothing merged there: no cost, applied
    assert sum("web1" in m for m in caplog.messages) == 1  # logged once, not every tick
    r = by_name(ctl.tick(guests((30000, 0, 0)), PLENTY, sec))
    assert ("web1", "pc.ram", False) in qmp.sets and not r["web1"].pending


def test_not_controllable_is_reported_never_skipped(env):
    ctl, qmp, _ = env
    r = by_name(ctl.tick(guests(), PLENTY, section("  default: deny\n")))
    assert r["old1"].pending.startswith("not controllable: its RAM has no memory backend object")
    metrics = {m.name: m for m in merge_families(ctl.tick(guests(), PLENTY, section("  default: deny\n")))}
    assert metrics["ksmctl_guests_merge_controllable"].samples[0].value == 2
    assert metrics["ksmctl_guests_merge_pending"].samples[0].value == 1


def test_change_behind_our_back_is_a_violation_counted_once_and_reverted(env):
    ctl, qmp, _ = env
    sec = section("  rules:\n    - {match: {title: 'data*'}, merge: deny}\n")
    ctl.tick(guests(), PLENTY, sec)
    assert qmp.merge[(U2, "pc.ram")] is False
    qmp.merge[(U2, "pc.ram")] = True  # someone's qom-set
    r = ctl.tick(guests((5000, 0, 0)), PLENTY, sec)
    assert "behind ksmctl's back" in by_name(r)["db1"].violation and r.violations_total == 1
    assert qmp.merge[(U2, "pc.ram")] is False  # re-applied
    r = ctl.tick(guests((5000, 4000, 0)), PLENTY, sec)  # still merging pages the next tick: same episode
    assert by_name(r)["db1"].violation.startswith("ksm_stat shows 4000") and r.violations_total == 1
    r = ctl.tick(guests((5000, 10, 0)), PLENTY, sec)
    assert not by_name(r)["db1"].violation
    r = ctl.tick(guests((5000, 4000, 0)), PLENTY, sec)
    assert r.violations_total == 2
    fam = {m.name: m for m in merge_families(r)}
    assert fam["ksmctl_merge_violations"].samples[0].value == 2
    assert {s.labels["domain"]: s.value for s in fam["ksmctl_vm_merge_violation"].samples}["db1"] == 1


def test_xml_deny_that_merges_is_a_violation_without_qmp(env):
    ctl, qmp, _ = env
    qmp.doms[U1].xml = qmp.doms[U1].xml.replace("</domain>", "<memoryBacking><nosharepages/></memoryBacking></domain>")
    r = by_name(ctl.tick(guests((9000, 0, 0)), PLENTY, None))
    assert r["web1"].source is MergeSource.DOMAIN_XML and r["web1"].setting is MergeMode.deny
    assert r["web1"].violation == "ksm_stat shows 9000 merging pages" and qmp.sets == []


def test_cli_change_beats_policy_until_qemu_restarts(env):
    ctl, qmp, tmp = env
    sec = section("  default: allow\n")
    line, cost = ctl.change(guests()[0], False, PLENTY)
    assert line == "web1: merge off on pc.ram: unmerges up to 19.5 MiB (5000 merging pages)" and cost == 5000 * 4096
    # A daemon (a new controller: another process) sees it and keeps it over the policy.
    daemon = GuestController(qmp, ctl.proc, RuntimeChanges(str(tmp / "state")))  # type: ignore[arg-type]
    r = by_name(daemon.tick(guests(), PLENTY, sec))
    assert r["web1"].source is MergeSource.RUNTIME and r["web1"].setting is MergeMode.deny
    assert qmp.merge[(U1, "pc.ram")] is False
    # The guest's QEMU restarted (new pid): the change is void, the policy applies again.
    restarted = [vm(U1, "web1", 104)] + guests()[1:]
    qmp.merge[(U1, "pc.ram")] = True  # the new QEMU starts from its command line again
    (Path(ctl.proc.root) / "104").mkdir()
    (Path(ctl.proc.root) / "104" / "cmdline").write_text((Path(ctl.proc.root) / "101" / "cmdline").read_text())
    r = by_name(daemon.tick(restarted, PLENTY, sec))
    assert r["web1"].source is MergeSource.POLICY and r["web1"].setting is MergeMode.allow
    assert U1 not in json.loads((tmp / "state" / FILE_NAME).read_text())["guests"]
    assert ("web1", "pc.ram", True) not in qmp.sets


def test_cli_guard_refuses_and_dry_run_sends_nothing(env):
    ctl, qmp, _ = env
    with pytest.raises(Refused) as e:
        ctl.change(guests((30000, 0, 0))[0], False, LOW)
    assert "refusing merge off" in e.value.message and "MemAvailable is 900.0 MiB" in e.value.message
    line, _ = ctl.change(guests((30000, 0, 0))[0], False, LOW, dry_run=True)
    assert "would set merge off on pc.ram" in line and "the guard would refuse" in line and qmp.sets == []
    with pytest.raises(GuestError, match="old1: not controllable"):
        ctl.change(guests()[2], False, PLENTY)


def test_isolation_denies_guests_outside_the_largest_trust_domain(env):
    ctl, qmp, _ = env
    qmp.add("11111111-1111-1111-1111-111111111114", "web2",
            xml_extra="<metadata><k:guest xmlns:k='%s' tenant='a'/></metadata>" % METADATA_NS)
    (Path(ctl.proc.root) / "105").mkdir()
    (Path(ctl.proc.root) / "105" / "cmdline").write_text(
        (Path(ctl.proc.root) / "101" / "cmdline").read_text().replace("web1", "web2"))
    vms = guests() + [vm("11111111-1111-1111-1111-111111111114", "web2", 105, 100)]
    sec = section("  trust_domain: tenant\n  isolation: per_domain\n")
    r = by_name(ctl.tick(vms, PLENTY, sec))
    assert r["db1"].setting is MergeMode.deny and r["db1"].source is MergeSource.ISOLATION
    assert "only a keeps merging" in r["db1"].why
    assert r["web1"].setting is r["web2"].setting is MergeMode.allow
    assert r["old1"].setting is MergeMode.deny  # no tenant: a domain of its own (not controllable: pending)
    stop = ctl.tick(vms, PLENTY, section("  trust_domain: tenant\n  isolation: per_domain\n  on_mixed: stop_ksm\n"))
    assert stop.stop_ksm.endswith("KSM stopped")


def test_restore_puts_back_what_the_policy_changed_only(env):
    ctl, qmp, tmp = env
    ctl.change(guests()[1], False, PLENTY)  # the operator's: stays
    ctl.tick(guests(), PLENTY, section("  rules:\n    - {match: {uuid: '%s'}, merge: deny}\n" % U1))
    assert qmp.merge[(U1, "pc.ram")] is False
    ctl.restore(PLENTY, guests())
    assert qmp.merge[(U1, "pc.ram")] is True and qmp.merge[(U2, "pc.ram")] is False
    assert list(json.loads((tmp / "state" / FILE_NAME).read_text())["guests"]) == [U2]


def test_qmp_failure_is_an_error_not_a_crash(env):
    ctl, qmp, _ = env
    qmp.fail_set = True
    r = ctl.tick(guests(), PLENTY, section("  default: deny\n"))
    assert "Property not found" in by_name(r)["web1"].pending
    assert any("Property not found" in m for _, m in r.errors)


def test_broken_runtime_file_is_named(env):
    ctl, _, tmp = env
    (tmp / "state").mkdir(exist_ok=True)
    (tmp / "state" / FILE_NAME).write_text('{"version": 1, "guests": {"x": {"pid": "7"}}}')
    r = ctl.tick(guests(), PLENTY, None)
    assert any(FILE_NAME in m and "not a ksmctl runtime merge entry" in m for _, m in r.errors)


def test_merging_pages_count_only_after_ksmd_has_rescanned(env):
    """ksm_merging_pages falls as ksmd's scan reaches the unmerged memory: no violation
    before the second full pass after the deny took effect."""
    ctl, qmp, _ = env
    sec = section("  rules:\n    - {match: {name: db1}, merge: deny}\n")

    def scans(n: int) -> KsmState:
        return KsmState(values={"full_scans": n})
    ctl.tick(guests(), PLENTY, sec, scans(10))
    assert qmp.merge[(U2, "pc.ram")] is False
    for n in (11, 12):  # first seen in effect at 11: its grace lasts two passes
        r = ctl.tick(guests((0, 6000, 0)), PLENTY, sec, scans(n))
        assert not by_name(r)["db1"].violation and r.violations_total == 0
    r = ctl.tick(guests((0, 6000, 0)), PLENTY, sec, scans(13))
    assert by_name(r)["db1"].violation == "ksm_stat shows 6000 merging pages" and r.violations_total == 1


def test_plan_reports_cost_and_guard_verdict_without_qmp(env):
    ctl, qmp, _ = env
    sec = section("  rules:\n    - {match: {metadata: {tenant: 'a'}}, merge: deny}\n  default: allow\n")
    r = by_name(ctl.plan(guests((30000, 6000, 0)), LOW, sec))
    assert qmp.sets == []
    assert r["web1"].setting is MergeMode.deny and r["web1"].cost_bytes == 30000 * 4096
    assert r["web1"].pending.startswith("would defer: unmerging would allocate up to 117.2 MiB")
    assert r["db1"].setting is MergeMode.allow and r["db1"].cost_bytes == 0
    r = by_name(ctl.plan(guests((30000, 6000, 0)), PLENTY, sec))
    assert r["web1"].pending == "" and r["web1"].cost_bytes == 30000 * 4096


class FakeVms:
    """Stands in for the VM collector: the guests of the fixture, as libvirt would list them."""

    def __init__(self, vms) -> None:
        self.vms, self.errors, self.source = vms, [], "libvirt"

    def collect(self):
        return tuple(self.vms)


def test_daemon_applies_the_policy_each_tick_and_isolation_can_stop_ksm(env):
    from ksmctl.collectors.host import HostCollector
    from ksmctl.config import Config
    from ksmctl.export.metrics import MetricsCollector, render_text
    from ksmctl.kernel.sysfs import KsmSysfs
    from ksmctl.kernel.writer import KsmWriter
    from ksmctl.policy.loader import LoadedPolicy
    from ksmctl.service.daemon import Daemon
    from tests.fixtures import make_sys
    ctl, qmp, tmp = env
    sys_root = make_sys(tmp / "sys", {"run": "1"})
    text = ("name: iso\ninterval: 3600\nrun: {mode: always}\nvms:\n  trust_domain: tenant\n"
            "  isolation: per_domain\n  on_mixed: stop_ksm\n")
    lp = LoadedPolicy(parse_policy(text, "iso.yaml"), "iso.yaml", "0" * 64)
    collector = HostCollector(KsmSysfs(str(sys_root)), ctl.proc, vms=FakeVms(guests()))  # type: ignore[arg-type]
    d = Daemon(Config(state_file=str(tmp / "state.json"), restore_on_exit=False), lp, collector,
               KsmWriter(collector.sysfs))
    d.guests = ctl
    metrics = MetricsCollector()
    d.observers.append(metrics.observe)
    rec = d.tick()
    assert rec.decision.targets["run"] == 0 and "KSM stopped" in rec.decision.reason
    assert (sys_root / "kernel/mm/ksm/run").read_text() == "0\n"
    state = json.loads((tmp / "state.json").read_text())
    assert {g["name"]: g["source"] for g in state["merge"]["guests"]} == {
        "web1": "qemu_cmdline", "db1": "qemu_cmdline", "old1": "qemu_cmdline"}
    out = render_text(metrics).decode()
    assert "ksmctl_merge_violations_total 0.0" in out and "ksmctl_guests_merge_controllable 2.0" in out
    assert 'ksmctl_vm_merge_allowed{domain="db1",source="qemu_cmdline"' in out


def test_metadata_set_on_a_running_guest_is_seen_within_the_refresh(env):
    ctl, qmp, _ = env
    now = [1000.0]
    ctl.clock = lambda: now[0]
    sec = section("  rules:\n    - {match: {metadata: {class: secure}}, merge: deny}\n")
    ctl.tick(guests(), PLENTY, sec)
    assert qmp.sets == []
    qmp.doms[U2].xml = qmp.doms[U2].xml.replace("tenant='b'", "tenant='b' class='secure'")  # virsh metadata
    ctl.tick(guests(), PLENTY, sec)
    assert qmp.sets == []  # not re-read yet
    now[0] += 61
    ctl.tick(guests(), PLENTY, sec)
    assert qmp.sets == [("db1", "pc.ram", False)]


def test_guests_found_in_proc_during_a_libvirt_outage_are_left_alone(env):
    from dataclasses import replace
    from ksmctl.readings import VmSource
    ctl, qmp, _ = env
    r = ctl.tick([replace(v, source=VmSource.PROC) for v in guests()], PLENTY, section("  default: deny\n"))
    assert r.guests == () and r.errors == () and qmp.sets == []
