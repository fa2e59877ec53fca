"""Traces and replay: a trace recorded by the daemon, replayed through the same policy,
reproduces the recorded decisions exactly; another policy shows where it differs."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ksmctl.cli import cli
from ksmctl.collectors.host import HostCollector
from ksmctl.collectors.procfs import ProcFs
from ksmctl.kernel.sysfs import KsmSysfs
from ksmctl.config import Config, TraceConfig
from ksmctl.service.daemon import Daemon
from ksmctl.kernel.writer import KsmWriter
from ksmctl.policy.loader import load_policy
from ksmctl.policy.replay import replay
from ksmctl.service.trace import TraceWriter

from .fixtures import MEMINFO, make_proc, make_sys


class Clock:
    """Stands in for time.monotonic so fixture ticks are 60 s apart without waiting."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def record_trace(tmp_path, policy="ksmtuned", ticks=12):
    sys_root = make_sys(tmp_path / "sys", {"run": "0"})
    proc_root = make_proc(tmp_path / "proc")
    clock = Clock()
    collector = HostCollector(KsmSysfs(str(sys_root)), ProcFs(str(proc_root)), vms=None, clock=clock)
    trace = tmp_path / "trace.jsonl"
    config = Config(state_file=str(tmp_path / "state.json"), trace=TraceConfig(path=str(trace)))
    d = Daemon(config, load_policy(policy), collector, KsmWriter(collector.sysfs))
    for i in range(ticks):
        # Free memory falls below 20% of MemTotal, then recovers: start, boost, decay, stop.
        free_kib = [9000000, 4000000, 3000000, 3000000, 4500000, 4800000, 9000000][i % 7]
        (proc_root / "meminfo").write_text(MEMINFO.replace("MemFree:        20000000 kB",
                                                            "MemFree:        %d kB" % (free_kib - 1000000)))
        pages = 1000 * i
        (sys_root / "kernel/mm/ksm/pages_sharing").write_text("%d\n" % pages)
        d.tick()
        clock.t += 60
    return trace


def test_replay_through_same_policy_reproduces_decisions(tmp_path):
    trace = record_trace(tmp_path)
    lines = trace.read_text().splitlines()
    assert len(lines) == 12
    recorded = [json.loads(x)["decision"] for x in lines]
    assert {r["targets"]["run"] for r in recorded} == {0, 1}  # the trace covers start and stop
    result = replay(load_policy("ksmtuned").policy, str(trace))
    assert len(result.rows) == 12 and result.differing == 0
    assert [r.replayed_targets for r in result.rows] == [r["targets"] for r in recorded]


def test_replay_of_another_policy_shows_differences_and_says_decisions_only(tmp_path):
    trace = record_trace(tmp_path)
    out = CliRunner().invoke(cli, ["policy", "replay", "--policy", "off", "--trace", str(trace)])
    assert out.exit_code == 0, out.output
    assert "decisions only" in out.output and "<- differs" in out.output
    assert "12 ticks:" in out.output and "replayed policy keeps KSM running in 0 ticks" in out.output


def test_bad_trace_line_is_named(tmp_path):
    t = tmp_path / "t.jsonl"
    t.write_text('{"v": 1}\nnot json\n')
    out = CliRunner().invoke(cli, ["policy", "replay", "--policy", "default", "--trace", str(t)])
    assert out.exit_code == 2 and "t.jsonl:1: not a ksmctl trace record" in out.output


def test_trace_rotation_bounds_size(tmp_path):
    w = TraceWriter(str(tmp_path / "t.jsonl"), max_bytes=4096, backups=2)
    for _ in range(30):
        w._rotate_if_needed(1000)
        with open(w.path, "a") as f:
            f.write("x" * 999 + "\n")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["t.jsonl", "t.jsonl.1", "t.jsonl.2"]
    assert all((tmp_path / f).stat().st_size <= 4096 for f in files)


def test_readings_to_dict_matches_asdict_and_round_trips():
    import dataclasses

    from ksmctl.readings import Coverage, EstimateSummary, KsmStat, Psi, VmReading
    from ksmctl.service.trace import readings_from_dict
    sys_root = make_sys(__import__("pathlib").Path(__import__("tempfile").mkdtemp()) / "sys")
    proc_root = make_proc(sys_root.parent / "proc")
    r = HostCollector(KsmSysfs(str(sys_root)), ProcFs(str(proc_root))).collect()
    r = dataclasses.replace(r, psi=Psi(1.0, 2.0, 0.5, 0.25), errors=(("libvirt", "x"),),
                            vms=(VmReading(uuid="u", name="n", rss=5, guest_swap_in=4096,
                                           ksm=KsmStat(rmap_items=3, mergeable=True)),),
                            estimate=EstimateSummary(1, 2, 3, 4.0, 5.0), coverage=Coverage(1, 2, 3, 4))
    fast = json.loads(json.dumps(r.to_dict()))
    slow = dataclasses.asdict(r)
    slow["ksm"]["unsupported"] = sorted(slow["ksm"]["unsupported"])
    assert fast == json.loads(json.dumps(slow))
    assert readings_from_dict(fast) == r


DATA = __import__("pathlib").Path(__file__).resolve().parent / "data"


def test_traces_written_before_the_strategy_split_still_replay_and_round_trip():
    """Recorded by the code whose EngineState was one flat dataclass: the nested states read
    them, replay them to the same decisions, and write them back in the same flat shape."""
    from ksmctl.service.trace import state_from_dict, state_to_dict
    for name in ("ksmtuned", "default"):
        path = DATA / ("trace-before-split-%s.jsonl" % name)
        records = [json.loads(x) for x in path.read_text().splitlines()]
        result = replay(load_policy(name).policy, str(path))
        assert len(result.rows) == len(records) and result.differing == 0, name
        for rec in records:
            assert state_to_dict(state_from_dict(rec["state_before"])) == rec["state_before"]
    new = json.loads(record_trace(__import__("pathlib").Path(__import__("tempfile").mkdtemp()), ticks=2)
                     .read_text().splitlines()[1])
    # same keys, same order; the adaptive phase's start is appended once it has one
    assert [k for k in new["state_before"] if k != "phase_start"] == list(records[0]["state_before"])


def test_a_state_from_a_kernel_without_pages_scanned_round_trips():
    """pass_start, and a Mark whose pages_scanned is null (kernels before 6.7), come back as
    they went, so a replay of such a host judges its passes as the daemon did; a count
    that is not a whole number is refused."""
    from ksmctl.policy.signals import Mark
    from ksmctl.policy.state import EngineState
    from ksmctl.policy.strategies.adaptive.state import AdaptiveState
    from ksmctl.service.trace import state_from_dict, state_to_dict
    m = Mark(10.0, 2, None, 50000, 0.8)
    s = EngineState(adaptive=AdaptiveState(passes=2, need_passes=3, phase_start=Mark(0.0, 0, None, 0, 0.0),
                                           pass_start=m), last=m)
    d = json.loads(json.dumps(state_to_dict(s)))
    assert d["pass_start"]["pages_scanned"] is None
    assert state_from_dict(d) == s
    with pytest.raises(ValueError, match="pages_scanned|whole number"):
        state_from_dict({**d, "pass_start": {**d["pass_start"], "pages_scanned": "many"}})


def test_bad_state_value_in_a_trace_is_named(tmp_path):
    rec = json.loads((DATA / "trace-before-split-default.jsonl").read_text().splitlines()[1])
    rec["state_before"]["mode"] = "sleepy"
    t = tmp_path / "t.jsonl"
    t.write_text(json.dumps(rec) + "\n")
    out = CliRunner().invoke(cli, ["policy", "replay", "--policy", "default", "--trace", str(t)])
    assert out.exit_code == 2 and "t.jsonl:1: not a ksmctl trace record" in out.output and "sleepy" in out.output


def test_a_bad_coverage_reading_in_a_trace_is_named(tmp_path):
    rec = json.loads((DATA / "trace-before-split-default.jsonl").read_text().splitlines()[1])
    rec["readings"]["coverage"] = {"processes": 1, "mergeable_pages": "many", "rmap_items": 3, "unseen_pages": 0}
    t = tmp_path / "t.jsonl"
    t.write_text(json.dumps(rec) + "\n")
    out = CliRunner().invoke(cli, ["policy", "replay", "--policy", "default", "--trace", str(t)])
    assert out.exit_code == 2 and "t.jsonl:1: not a ksmctl trace record" in out.output
    assert "readings.coverage.mergeable_pages" in out.output and "Traceback" not in out.output


def test_replay_explains_a_pass_not_worth_running(tmp_path):
    """A churn trickle after two passes, recorded and replayed: the replayed decisions are
    the recorded ones, and the row where the policy declines the extra pass says why."""
    from ksmctl.policy.decide import EngineState, decide
    from .test_decide import ADAPTIVE, MIB, reading
    merge = 400 * MIB
    ticks = [reading(t=0, mergeable=merge, ksmd_cpu=0.0),
             reading(t=5, mergeable=merge, full_scans=1, pages_scanned=102400, ksmd_cpu=1.0),
             reading(t=10, mergeable=merge, full_scans=2, pages_scanned=204800, pages_sharing=40000, ksmd_cpu=2.0),
             reading(t=12, mergeable=merge, full_scans=2, pages_scanned=217600, pages_sharing=40060, ksmd_cpu=2.1),
             reading(t=14, mergeable=merge, full_scans=2, pages_scanned=217800, pages_sharing=40061, ksmd_cpu=2.11)]
    writer, state = TraceWriter(str(tmp_path / "t.jsonl")), EngineState()
    for r in ticks:
        decision, after = decide(ADAPTIVE, r, state)
        writer.record("a", "0" * 64, r, state, decision)
        state = after
    result = replay(ADAPTIVE, str(tmp_path / "t.jsonl"))
    assert result.differing == 0 and [r.replayed_rule for r in result.rows][2:] == [
        "always/merging", "always/idle", "always/idle"]
    row = result.rows[3]
    assert "another full pass is not worth it" in row.reason and "(3.0%)" in row.reason
    assert "because still 4.69 new merges per 1000 pages while checking" in row.format()
    # A trace that begins mid-check (rotated, or the daemon's trace switched on late) carries
    # the phase's start in its first state: replayed from there, the same decisions.
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    assert "phase_start" in json.loads(lines[3])["state_before"]
    (tmp_path / "late.jsonl").write_text("\n".join(lines[3:]) + "\n")
    late = replay(ADAPTIVE, str(tmp_path / "late.jsonl"))
    assert late.differing == 0 and [r.replayed_rule for r in late.rows] == ["always/idle", "always/idle"]
