"""Policy keys for the knobs that change what can merge (policy `kernel:`), applied by the
one writer with the kernel's rules: max_page_sharing and merge_across_nodes change only
while nothing is merged, so the daemon refuses unless the host absorbs the unmerge,
unmerges, waits for pages_shared to reach zero, writes, and resumes; never twice in a row
after a failure. On fixture trees (the drain simulated by the test writing pages_shared),
and on the real kernel with merged pages present."""
from __future__ import annotations

import logging

import pytest

from ksmctl.collectors.host import HostCollector
from ksmctl.collectors.procfs import ProcFs
from ksmctl.config import Config
from ksmctl.errors import PolicyError
from ksmctl.kernel.sysfs import KsmSysfs
from ksmctl.kernel.writer import KsmWriter
from ksmctl.policy.decide import EngineState, decide
from ksmctl.policy.loader import LoadedPolicy, parse_policy
from ksmctl.service.daemon import Daemon

from .fixtures import MEMINFO, make_proc, make_sys
from .ksmlock import KSM, ksm_exclusive, unmerge_and_wait
from .mergeable import Holder
from .support import need_root, wait_for

POLICY = """name: settings
interval: 3600
run: {mode: always}
scan: {strategy: step, pages_to_scan: {initial: 500, min: 64, max: 5000, boost: 0, decay: 0}, sleep_millisecs: {base: 10}}
kernel: {%s}
"""
LOW_MEMINFO = MEMINFO.replace("MemAvailable:   21000000 kB", "MemAvailable:     100000 kB")


def _daemon(tmp_path, kernel: str, ksm=None, meminfo=MEMINFO, drop=(), dry_run=False, sys_root=None, proc_root=None):
    if sys_root is None:
        sys_root = str(make_sys(tmp_path / "sys", dict({"run": "1"}, **(ksm or {})), drop))
    if proc_root is None:
        proc_root = str(make_proc(tmp_path / "proc", meminfo=meminfo))
    collector = HostCollector(KsmSysfs(sys_root), ProcFs(proc_root), track_mergeable=False)
    lp = LoadedPolicy(parse_policy(POLICY % kernel, "p.yaml"), "p.yaml", "2" * 64)
    d = Daemon(Config(state_file=str(tmp_path / "state.json"), restore_on_exit=False), lp, collector,
               KsmWriter(collector.sysfs, dry_run=dry_run))
    return d, (tmp_path / "sys/kernel/mm/ksm") if sys_root else None


def _knob(ksm, name):
    return (ksm / name).read_text().strip()


def test_policy_keys_are_validated_and_become_targets(tmp_path):
    with pytest.raises(PolicyError) as e:
        parse_policy(POLICY % "max_page_sharing: 1", "p.yaml")
    assert "kernel.max_page_sharing" in e.value.message and "greater than or equal to 2" in e.value.message
    with pytest.raises(PolicyError):
        parse_policy(POLICY % "use_zero_page: true", "p.yaml")   # a typo is an unknown key
    r = HostCollector(KsmSysfs(str(make_sys(tmp_path / "sys"))), ProcFs(str(make_proc(tmp_path / "proc")))).collect()
    p = parse_policy(POLICY % "use_zero_pages: true, smart_scan: false, merge_across_nodes: false", "p.yaml")
    d, _ = decide(p, r, EngineState())
    assert d.targets["use_zero_pages"] == 1 and d.targets["smart_scan"] == 0 and d.targets["merge_across_nodes"] == 0


def test_simple_keys_are_written_like_any_knob(tmp_path):
    d, ksm = _daemon(tmp_path, "use_zero_pages: true, smart_scan: false", {"use_zero_pages": "0", "smart_scan": "1"})
    rec = d.tick()
    assert rec.ok and _knob(ksm, "use_zero_pages") == "1" and _knob(ksm, "smart_scan") == "0"


def test_max_page_sharing_unmerges_waits_writes_and_resumes(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    d, ksm = _daemon(tmp_path, "max_page_sharing: 512", {"pages_shared": "1000", "max_page_sharing": "256"})
    rec = d.tick()
    assert _knob(ksm, "run") == "2" and _knob(ksm, "max_page_sharing") == "256"
    st = d.state_dict(rec)["kernel_settings"]
    assert st["phase"] == "unmerging" and st["knobs"] == {"max_page_sharing": [256, 512]}
    assert "unmerging" in st["message"] and "then writing it" in st["message"]
    d.tick()                                      # still merged: run=2 holds, nothing else
    assert _knob(ksm, "run") == "2" and _knob(ksm, "max_page_sharing") == "256"
    (ksm / "pages_shared").write_text("0\n")      # ksmd drained
    (ksm / "pages_sharing").write_text("0\n")
    rec = d.tick()
    assert _knob(ksm, "max_page_sharing") == "512"
    assert "written after unmerging" in d.transition.message
    d.tick()
    assert _knob(ksm, "run") == "1"               # the policy resumes merging
    assert d.state_dict(d.tick())["kernel_settings"] is None
    assert not d.tick().external                  # our own run=2 is not "another writer"


def test_refused_when_the_host_cannot_absorb_and_not_asked_again(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    d, ksm = _daemon(tmp_path, "merge_across_nodes: false", {"pages_shared": "1000", "pages_sharing": "2000000",
                                                            "merge_across_nodes": "1"}, meminfo=LOW_MEMINFO)
    for _ in range(3):
        rec = d.tick()
        assert _knob(ksm, "run") == "1" and _knob(ksm, "merge_across_nodes") == "1"
    st = d.state_dict(rec)["kernel_settings"]
    assert st["phase"] == "refused" and "refusing to unmerge" in st["message"]
    assert sum("refusing to unmerge" in r.getMessage() for r in caplog.records) == 1   # logged once, tried once
    assert rec.ok                                  # the rest of the policy applies


def test_nothing_merged_writes_at_once(tmp_path):
    d, ksm = _daemon(tmp_path, "max_page_sharing: 300", {"pages_shared": "0", "pages_sharing": "0"})
    d.tick()
    assert _knob(ksm, "max_page_sharing") == "300" and _knob(ksm, "run") == "1"


def test_kernel_without_the_knob_is_reported_and_the_rest_applies(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    d, ksm = _daemon(tmp_path, "smart_scan: true, use_zero_pages: true", {"use_zero_pages": "0"}, drop=("smart_scan",))
    for _ in range(2):
        rec = d.tick()
    assert rec.ok and _knob(ksm, "use_zero_pages") == "1"
    msgs = [r.getMessage() for r in caplog.records if "does not support" in r.getMessage()]
    assert len(msgs) == 1 and "smart_scan" in msgs[0]
    assert d.state_dict(rec)["unsupported_targets"] == ["smart_scan"]


def test_dry_run_says_what_it_would_do(tmp_path):
    d, ksm = _daemon(tmp_path, "max_page_sharing: 512", {"pages_shared": "1000", "max_page_sharing": "256"},
                     dry_run=True)
    rec = d.tick()
    assert _knob(ksm, "run") == "1" and _knob(ksm, "max_page_sharing") == "256"
    st = d.state_dict(rec)["kernel_settings"]
    assert st["phase"] == "would_unmerge" and "would unmerge" in st["message"]


def _merge_fast(sysfs):
    """Under ksm_exclusive, with a Holder running: ksmd at full speed until pages merge."""
    if (KSM / "advisor_mode").exists():
        (KSM / "advisor_mode").write_text("none")
    (KSM / "pages_to_scan").write_text("5000")
    (KSM / "sleep_millisecs").write_text("10")
    (KSM / "run").write_text("1")
    wait_for(lambda: (sysfs.read().get("pages_shared") or 0) > 0, 60, "the holder's pages to merge")


@pytest.mark.kernel
def test_real_kernel_max_page_sharing_change_with_merged_pages(tmp_path):
    """The real transition on this host: merged pages present, EBUSY if written directly;
    the daemon unmerges, waits for pages_shared 0, writes, resumes."""
    need_root()
    sysfs = KsmSysfs()
    with ksm_exclusive() as saved, Holder(pages=3000, distinct=6):
        original = int(saved["max_page_sharing"])
        try:
            _merge_fast(sysfs)
            d, _ = _daemon(tmp_path, "max_page_sharing: %d" % (original + 1), sys_root="/sys", proc_root="/proc")
            d.tick()
            assert sysfs.read().get("run") == 2 and d.transition.phase.value == "unmerging"
            wait_for(lambda: d.tick() and sysfs.read().get("max_page_sharing") == original + 1, 120,
                     "unmerge, then the write")
            assert "after unmerging" in d.transition.message
            d.tick()
            assert sysfs.read().get("run") == 1
            wait_for(lambda: (sysfs.read().get("pages_shared") or 0) > 0, 60, "merging to resume")
        finally:
            unmerge_and_wait()
            (KSM / "max_page_sharing").write_text(str(original))
    assert int((KSM / "max_page_sharing").read_text()) == original


def test_policy_explain_shows_the_unmerge_and_its_guard(tmp_path):
    from click.testing import CliRunner
    from ksmctl.cli import cli
    sys_root = make_sys(tmp_path / "sys", {"pages_shared": "1000", "pages_sharing": "2000", "max_page_sharing": "256"},
                        drop=("smart_scan",))
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY % "max_page_sharing: 512, smart_scan: true")
    args = ["--sys-root", str(sys_root)]
    for meminfo, verdict in ((MEMINFO, "allowed"), (LOW_MEMINFO, "refused")):
        proc = make_proc(tmp_path / ("proc-" + verdict), meminfo=meminfo)
        cfg = tmp_path / ("c-%s.yaml" % verdict)
        cfg.write_text("libvirt: false\nstate_file: %s\n" % (tmp_path / "none.json"))
        r = CliRunner().invoke(cli, args + ["--proc-root", str(proc), "--config", str(cfg), "policy", "explain", str(policy)])
        assert r.exit_code == 0, r.output
        assert "max_page_sharing: 256 -> 512 needs nothing merged: would unmerge 9.8 MiB first" in r.output
        assert r.output.rstrip().count(verdict) >= 1 and "smart_scan: not supported by this kernel" in r.output
        assert "smart_scan None" not in r.output   # not a change this kernel can make


@pytest.mark.kernel
def test_real_kernel_refusal_when_the_host_cannot_absorb(tmp_path):
    """Merged pages on the real kernel, MemAvailable low only through the injected /proc
    root: the daemon refuses, writes neither run=2 nor the knob, and does not retry."""
    need_root()
    sysfs = KsmSysfs()
    low = make_proc(tmp_path / "proc", meminfo=MEMINFO.replace("MemAvailable:   21000000 kB",
                                                                "MemAvailable:       1000 kB"))
    with ksm_exclusive() as saved, Holder(pages=3000, distinct=6):
        original = int(saved["max_page_sharing"])
        _merge_fast(sysfs)
        d, _ = _daemon(tmp_path, "max_page_sharing: %d" % (original + 1), sys_root="/sys", proc_root=str(low))
        for _ in range(3):
            d.tick()
            state = sysfs.read()
            assert state.get("run") == 1 and state.get("max_page_sharing") == original
        assert d.transition.phase.value == "refused" and "refusing to unmerge" in d.transition.message
