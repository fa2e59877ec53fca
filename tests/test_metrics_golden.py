"""Golden files of /metrics: every rename, new series or changed help text is a visible diff.

Regenerate after an intended change with

    KSMCTL_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_metrics_golden.py

and review `git diff tests/golden/`. Inputs are fixture /sys and /proc trees read by the
real collectors, a fixed policy text and fixed clocks, so the output is byte-stable.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Tuple

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from ksmctl.collectors.host import HostCollector
from ksmctl.collectors.procfs import ProcFs
from ksmctl.kernel.sysfs import KsmSysfs
from ksmctl.service.daemon import TickRecord
from ksmctl.kernel.writer import Change
from ksmctl.export.metrics import MetricsCollector, render_text
from ksmctl.policy.decide import EngineState, decide
from ksmctl.policy.loader import LoadedPolicy, parse_policy
from ksmctl.readings import EstimateSummary, KsmStat, VmReading, VmSource

from .fixtures import KSM_STAT_NEW, OLD_KERNEL_DROPS, make_proc, make_sys

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("KSMCTL_UPDATE_GOLDEN", "") not in ("", "0")
BUILD = {"version": "0.0.0-golden", "python": "3.x"}
POLICY = """name: golden
interval: 10s
run:
  mode: always
scan:
  strategy: step
  pages_to_scan: {min: 100, max: 5000}
  sleep_millisecs: {base: 20}
  cpu_budget: 25
"""
VMS = (
    VmReading(uuid="6f1c4a52-0c4e-4b8e-9d51-0b7e3c7c0a01", name="web-1", pid=1001, balloon_current=2 << 30,
              balloon_maximum=4 << 30, rss=(2 << 30) - 4096, anon_rss=(2 << 30) - (64 << 20),
              ksm=KsmStat(rmap_items=2048, zero_pages=3, merging_pages=1500, process_profit=5963776,
                          merge_any=False, mergeable=True)),
    VmReading(uuid="6f1c4a52-0c4e-4b8e-9d51-0b7e3c7c0a02", name="db \"primary\"", pid=1002, source="proc",
              balloon_maximum=8 << 30, rss=1 << 30, ksm=KsmStat(merging_pages=0, zero_pages=0, process_profit=0),
              excluded=True),
)


class FakeVms:
    errors: list = []
    source = VmSource.LIBVIRT

    def __init__(self, vms=VMS, fail: bool = False) -> None:
        self.vms, self.fail = vms, fail

    def collect(self):
        if self.fail:
            from ksmctl.errors import KsmctlError
            raise KsmctlError("libvirt: cannot connect to qemu:///system")
        return self.vms


def _policy() -> LoadedPolicy:
    return LoadedPolicy(policy=parse_policy(POLICY, "golden.yaml"), path="golden.yaml",
                        sha256=hashlib.sha256(POLICY.encode()).hexdigest())


def _ticks(tmp_path: Path, sys_kw: dict, proc_kw: dict, vms: FakeVms) -> Tuple[TickRecord, TickRecord]:
    sysroot = make_sys(tmp_path / "sys", **sys_kw)
    procroot = make_proc(tmp_path / "proc", processes={1001: {"ksm_stat": KSM_STAT_NEW, "statm": "10 5 0 0 0 0 0\n"}},
                         **proc_kw)
    clock = iter([1000.0, 1010.0])
    coll = HostCollector(KsmSysfs(str(sysroot), page_size=4096), ProcFs(str(procroot)), vms=vms,
                         clock=lambda: next(clock), wall=lambda: 1700000000.0)
    coll.estimate = EstimateSummary(achievable=400 << 20, achieved=300 << 20, scanned=2 << 30,
                                    finished_wall=1699999000.0, duration_seconds=12.5)
    lp = _policy()
    r1 = coll.collect()
    d1, st = decide(lp.policy, r1, EngineState())
    t1 = TickRecord(policy=lp, readings=r1, decision=d1, errors=list(r1.errors), duration=0.004, ok=True,
                    wall=1700000000.0, changes=[Change("pages_to_scan", 100, 200), Change("sleep_millisecs", 20, 10)])
    r2 = coll.collect()
    d2, _ = decide(lp.policy, r2, st)
    t2 = TickRecord(policy=lp, readings=r2, decision=d2, errors=list(r2.errors) + [("trace", "disk full")],
                    external=["pages_to_scan"], duration=0.03, ok=True, wall=1700000010.0)
    return t1, t2


def _render(per_vm: bool, *recs: TickRecord) -> str:
    reg = CollectorRegistry(auto_describe=False)
    m = MetricsCollector(reg, per_vm=per_vm, build=BUILD)
    for r in recs:
        m.observe(r)
    text = render_text(reg).decode()
    assert text == generate_latest(reg).decode()  # the fast writer matches prometheus_client's
    return text


def _compare(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), "%s missing: run with KSMCTL_UPDATE_GOLDEN=1" % path
    expected = path.read_text()
    assert text == expected, "%s differs; if intended, regenerate with KSMCTL_UPDATE_GOLDEN=1" % path


def test_full_host_with_vms(tmp_path):
    t1, t2 = _ticks(tmp_path, {}, {}, FakeVms())
    text = _render(True, t1, t2)
    _compare("metrics.txt", text)
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    saved = fams["ksm_memory_saved_bytes"].samples[0].value
    assert saved == t2.readings.ksm.saved_bytes == (25000 + 500) * 4096


def test_old_kernel_no_psi_garbled_file_vm_source_failed_per_vm_off(tmp_path):
    t1, t2 = _ticks(tmp_path, {"overrides": {"pages_volatile": "garbage"}, "drop": OLD_KERNEL_DROPS},
                    {"psi": None}, FakeVms(fail=True))
    _compare("metrics-degraded.txt", _render(False, t1, t2))


def test_per_vm_off_keeps_only_the_count(tmp_path):
    _t1, t2 = _ticks(tmp_path, {}, {}, FakeVms())
    text = _render(False, t2)
    assert "ksmctl_vms 2.0" in text and 'ksmctl_vm_data_source{source="libvirt"} 1.0' in text
    assert "domain=" not in text and "web-1" not in text  # no per-VM series


def test_failed_tick_drops_host_series_and_counts_the_error(tmp_path):
    t1, _ = _ticks(tmp_path, {}, {}, FakeVms())
    failed = TickRecord(policy=t1.policy, errors=[("sysfs", "cannot read run")], duration=0.001, wall=1700000020.0)
    text = _render(True, t1, failed)
    assert "ksm_run" not in text and "ksmctl_vm_" not in text and "ksmctl_memory_total_bytes" not in text
    assert 'ksmctl_errors_total{source="sysfs"} 1.0' in text
    assert 'ksmctl_ticks_total{result="failed"} 1.0' in text
    assert "ksmctl_last_successful_tick_timestamp_seconds 1.7e+09" in text


def test_broken_part_is_dropped_and_counted_not_fatal(tmp_path, monkeypatch):
    t1, _ = _ticks(tmp_path, {}, {}, FakeVms())
    reg = CollectorRegistry(auto_describe=False)
    m = MetricsCollector(reg, build=BUILD)
    m.observe(t1)

    def boom(_r):
        raise RuntimeError("bug")
    monkeypatch.setattr(m, "_vms", boom)
    text = render_text(reg).decode()
    assert "ksm_run 1.0" in text and "ksmctl_vm_" not in text
    assert 'ksmctl_errors_total{source="exporter"} 1.0' in text


def test_openmetrics_rendering_parses(tmp_path):
    t1, t2 = _ticks(tmp_path, {}, {}, FakeVms())
    reg = CollectorRegistry(auto_describe=False)
    m = MetricsCollector(reg, build=BUILD)
    m.observe(t2)
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
    names = {f.name for f in om_parse(generate_openmetrics(reg).decode())}
    assert {"ksm_pages_scanned", "ksmctl_build", "ksmctl_tick_duration_seconds"} <= names


def test_fast_writer_matches_prometheus_client_with_odd_names(tmp_path):
    odd = tuple(VmReading(uuid="u-%d" % i, name=n, ksm=KsmStat(merging_pages=i, zero_pages=0, process_profit=-i))
                for i, n in enumerate(["back\\slash", "new\nline", 'q"uote', "ünï", ""]))
    _t1, t2 = _ticks(tmp_path, {}, {}, FakeVms(odd))
    text = _render(True, t2)
    assert 'domain="back\\\\slash"' in text and 'domain="new\\nline"' in text


def test_names_follow_conventions(tmp_path):
    t1, t2 = _ticks(tmp_path, {}, {}, FakeVms())
    for fam in text_string_to_metric_families(_render(True, t1, t2)):
        assert fam.name.startswith(("ksm_", "ksmctl_")), fam.name
        assert fam.documentation, fam.name
        if fam.type == "counter":
            assert all(s.name.endswith("_total") for s in fam.samples), fam.name
        for bad in ("millisecs", "percent", "_kb", "_mb"):
            assert bad not in fam.name, fam.name
