"""KnobOwnership: what the daemon wrote, drift reported once per external change,
reassert / back_off, and what restore puts back (fixture trees and plain states)."""
from __future__ import annotations

from ksmctl.kernel.ownership import KnobOwnership, OnExternalChange
from ksmctl.kernel.sysfs import KsmSysfs
from ksmctl.kernel.writer import Change, KsmWriter
from ksmctl.readings import KsmState

from .fixtures import make_sys

BACK_OFF = OnExternalChange.BACK_OFF


def kernel(advisor_mode=None, **values) -> KsmState:
    return KsmState(values=values, advisor_mode=advisor_mode)


def owning(**written) -> KnobOwnership:
    o = KnobOwnership()
    for name, value in written.items():
        o.wrote(Change(name, None, value))
    return o


def test_drift_is_reported_once_per_external_change():
    o = owning(pages_to_scan=800, sleep_millisecs=20, run=1)
    wanted = {"pages_to_scan": 800, "sleep_millisecs": 20, "run": 1}
    assert o.plan(wanted, kernel(pages_to_scan=800, sleep_millisecs=20, run=1)).drifts == ()
    [first] = o.plan(wanted, kernel(pages_to_scan=1250, sleep_millisecs=20, run=1)).drifts
    assert (first.knob, first.expected, first.found, first.first) == ("pages_to_scan", 800, 1250, True)
    assert "pages_to_scan" in first.message() and "1250" in first.message()
    # Still different next tick (the re-assert failed): not new.
    plan = o.plan(wanted, kernel(pages_to_scan=1250, sleep_millisecs=20, run=1))
    assert [d.first for d in plan.drifts] == [False] and plan.new_drifts == ()
    assert plan.targets == wanted  # reassert: everything is written again
    # The other writer changes it once more: a new event.
    assert o.plan(wanted, kernel(pages_to_scan=64, sleep_millisecs=20, run=1)).drifts[0].first
    # Back at our value: clean; a later change to the same value is new again.
    assert o.plan(wanted, kernel(pages_to_scan=800, sleep_millisecs=20, run=1)).drifts == ()
    fourth = o.plan(wanted, kernel(pages_to_scan=64, sleep_millisecs=20, run=0)).drifts
    assert [(x.knob, x.first) for x in fourth] == [("pages_to_scan", True), ("run", True)]
    assert [(x.knob, x.first) for x in o.plan(wanted, kernel(pages_to_scan=800, run=0)).drifts] == [
        ("run", False)]


def test_unsupported_or_unreadable_knob_is_not_drift():
    o = owning(smart_scan=1, advisor_mode="scan-time")
    # smart_scan absent (older kernel, or garbled this tick), advisor_mode unreadable (None).
    assert o.plan({}, kernel(advisor_mode=None)).drifts == ()


def test_back_off_leaves_their_value_while_our_target_is_unchanged():
    o = owning(run=1, pages_to_scan=800)
    wanted = {"run": 1, "pages_to_scan": 800}
    plan = o.plan(wanted, kernel(run=0, pages_to_scan=800), BACK_OFF)
    assert [(d.knob, d.first) for d in plan.drifts] == [("run", True)]
    assert plan.targets == {"pages_to_scan": 800}  # run=0 is theirs now
    # Their value adopted: no drift, still left alone while our target stays 1.
    plan = o.plan(wanted, kernel(run=0, pages_to_scan=800), BACK_OFF)
    assert plan.drifts == () and plan.targets == {"pages_to_scan": 800}
    # They change it again: a new event, still backing off.
    plan = o.plan(wanted, kernel(run=1, pages_to_scan=800), BACK_OFF)
    assert [(d.knob, d.found, d.first) for d in plan.drifts] == [("run", 1, True)]
    assert "run" not in plan.targets
    # Our own target moves on: the knob is ours again, for good.
    assert o.plan({"run": 0, "pages_to_scan": 800}, kernel(run=1, pages_to_scan=800), BACK_OFF).targets == {
        "run": 0, "pages_to_scan": 800}
    assert o.plan(wanted, kernel(run=1, pages_to_scan=800), BACK_OFF).targets == wanted


def test_switching_policy_to_reassert_ends_back_off():
    o = owning(run=1)
    assert o.plan({"run": 1}, kernel(run=0), BACK_OFF).targets == {}
    assert o.plan({"run": 1}, kernel(run=0)).targets == {"run": 1}


def test_restore_targets_come_from_the_first_write_and_never_unmerge(tmp_path):
    sysfs = KsmSysfs(str(make_sys(tmp_path, {"run": "2", "advisor_mode": "[none] scan-time"})), page_size=4096)
    w, o = KsmWriter(sysfs), KnobOwnership()
    w.apply({"run": 1, "pages_to_scan": 5000}, sysfs.read(), wrote=o.wrote)
    w.apply({"pages_to_scan": 6000, "advisor_mode": "scan-time"}, sysfs.read(), wrote=o.wrote)
    assert o.original() == {"run": 2, "pages_to_scan": 100, "advisor_mode": "none"}
    assert o.written() == {"run": 1, "pages_to_scan": 6000, "advisor_mode": "scan-time"}
    assert o.restore_targets() == {"run": 0, "pages_to_scan": 100, "advisor_mode": "none"}
    restored = w.apply(o.restore_targets(), sysfs.read())
    o.restored()
    assert {(c.knob, c.new) for c in restored} == {("run", 0), ("pages_to_scan", 100), ("advisor_mode", "none")}
    assert (tmp_path / "kernel/mm/ksm/run").read_text() == "0\n"
    assert not o.has_original and o.restore_targets() == {}


def test_restore_leaves_pages_to_scan_to_an_advisor_it_turns_back_on():
    o = KnobOwnership()
    o.wrote(Change("advisor_mode", "scan-time", "none"))
    o.wrote(Change("pages_to_scan", 100, 5000))
    assert o.restore_targets() == {"advisor_mode": "scan-time"}


def test_dry_run_records_nothing_so_reports_no_drift(tmp_path):
    sysfs = KsmSysfs(str(make_sys(tmp_path, {"run": "0"})), page_size=4096)
    o = KnobOwnership()
    changes = KsmWriter(sysfs, dry_run=True).apply({"run": 1}, sysfs.read(), wrote=o.wrote)
    assert [(c.knob, c.new) for c in changes] == [("run", 1)]
    assert o.written() == {} and o.plan({"run": 1}, sysfs.read()).drifts == ()


def test_a_write_refused_halfway_keeps_the_earlier_ones_on_record(tmp_path):
    root = make_sys(tmp_path, {"run": "0"})
    sysfs = KsmSysfs(str(root), page_size=4096)
    (root / "kernel/mm/ksm/run").unlink()
    (root / "kernel/mm/ksm/run").mkdir()  # writing it fails (EISDIR)
    o = KnobOwnership()
    state = KsmState(values={"run": 0, "sleep_millisecs": 20}, page_size=4096)
    try:
        KsmWriter(sysfs).apply({"sleep_millisecs": 50, "run": 1}, state, wrote=o.wrote)
    except Exception as e:
        assert "run=1" in str(e)
    else:
        raise AssertionError("the write of run should have failed")
    assert o.written() == {"sleep_millisecs": 50} and o.original() == {"sleep_millisecs": 20}


# -- through the daemon ---------------------------------------------------------------
def _daemon(tmp_path, policy: str, dry_run: bool = False):
    from ksmctl.collectors.host import HostCollector
    from ksmctl.collectors.procfs import ProcFs
    from ksmctl.config import Config
    from ksmctl.policy.loader import LoadedPolicy, parse_policy
    from ksmctl.service.daemon import Daemon

    from .fixtures import make_proc
    sys_root = make_sys(tmp_path / "sys", {"run": "0"})
    collector = HostCollector(KsmSysfs(str(sys_root)), ProcFs(str(make_proc(tmp_path / "proc"))))
    lp = LoadedPolicy(parse_policy(policy, "p.yaml"), "p.yaml", "0" * 64)
    d = Daemon(Config(state_file=str(tmp_path / "state.json")), lp, collector,
               KsmWriter(collector.sysfs, dry_run=dry_run))
    return d, sys_root / "kernel/mm/ksm"


ALWAYS = "name: always-on\ninterval: 3600\nrun: {mode: always}\nownership: {on_external_change: %s}\n"


def test_dry_run_daemon_does_not_report_its_own_unwritten_targets(tmp_path):
    d, ksm = _daemon(tmp_path, ALWAYS % "reassert", dry_run=True)
    recs = [d.tick() for _ in range(3)]
    assert recs[0].changes == []   # a dry run writes nothing: what it would write is would_change
    assert [(c.knob, c.new) for c in recs[0].would_change] == [("pages_to_scan", 64), ("run", 1)]
    assert [r.external for r in recs] == [[], [], []]
    assert (ksm / "run").read_text() == "0\n"


def test_daemon_reports_once_and_backs_off(tmp_path, caplog):
    d, ksm = _daemon(tmp_path, ALWAYS % "back_off")
    assert [c.knob for c in d.tick().changes] == ["pages_to_scan", "run"]
    (ksm / "run").write_text("0\n")  # another writer stops KSM
    caplog.set_level("WARNING")
    recs = [d.tick() for _ in range(3)]
    assert [r.external for r in recs] == [["run"], [], []]
    assert caplog.text.count("run was changed by another writer: ksmctl wrote 1, it is now 0; "
                             "policy says back off") == 1
    assert all(r.changes == [] for r in recs) and (ksm / "run").read_text() == "0\n"
