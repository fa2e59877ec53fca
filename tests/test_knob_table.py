"""The knob table (ksmctl/kernel/knobs.py) is the one list of KSM attributes: a row
added there is read, validated, written, exported, offered by `ksmctl set --help` and
the shell completions, and listed in docs/metrics.md, with no other edit."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from ksmctl.cli import cli
from ksmctl.errors import UsageError
from ksmctl.export.metrics import MetricsCollector, render_text
from ksmctl.kernel import knobs
from ksmctl.kernel.knobs import Kind, Knob, MetricType
from ksmctl.kernel.sysfs import KsmSysfs
from ksmctl.kernel.writer import Change, KsmWriter, validate_value
from ksmctl.policy.decide import Decision
from ksmctl.policy.loader import LoadedPolicy, parse_policy
from ksmctl.readings import Readings
from ksmctl.service.daemon import TickRecord

from .fixtures import make_proc, make_sys
from .knobtable import added_knobs

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "metrics.md"
UPDATE_DOCS = os.environ.get("KSMCTL_UPDATE_DOCS", "") not in ("", "0")
BEGIN, END = "<!-- knob-table:begin", "<!-- knob-table:end -->"

FROB = Knob("frob_millisecs", Kind.TUNABLE, "9.9", "How long ksmd frobs.", "ksm_frob_seconds",
            scale=1000, lo=0, hi=1000)
FROBBED = Knob("pages_frobbed", Kind.COUNTER, "9.9", "Pages frobbed since boot.", "ksm_pages_frobbed_total",
               MetricType.COUNTER)
FILES = {"frob_millisecs": "250", "pages_frobbed": "7"}


def _metrics(state, targets, changes) -> str:
    policy = "name: t\nrun: {mode: always}\n"
    lp = LoadedPolicy(parse_policy(policy, "t.yaml"), "t.yaml", "0" * 64)
    rec = TickRecord(policy=lp, readings=Readings(monotonic=1.0, wall=2.0, ksm=state),
                     decision=Decision(targets=targets, run_rule="always", scan_rule="idle"),
                     changes=changes, external=list(targets), ok=True, wall=2.0)
    reg = CollectorRegistry(auto_describe=False)
    MetricsCollector(reg, build={"version": "x", "python": "x"}).observe(rec)
    return render_text(reg).decode()


def _cli(tmp_path, *args):
    return CliRunner().invoke(cli, ["--sys-root", str(tmp_path / "sys"), "--proc-root", str(tmp_path / "proc"),
                                    *args])


def test_a_new_row_is_read_validated_written_and_exported(tmp_path):
    sysfs = KsmSysfs(str(make_sys(tmp_path / "sys", FILES)), page_size=4096)
    make_proc(tmp_path / "proc")
    before = sysfs.read()  # without the row, the files are not ksmctl's business
    assert "frob_millisecs" not in before.values and "pages_frobbed" not in before.values
    with added_knobs(FROB, FROBBED):
        state = sysfs.read()
        assert (state.get("frob_millisecs"), state.get("pages_frobbed")) == (250, 7)
        with pytest.raises(UsageError) as e:
            validate_value("frob_millisecs", "1001", state)
        assert str(e.value) == "frob_millisecs: 1001 is out of range; allowed: 0..1000"
        with pytest.raises(UsageError, match="pages_frobbed"):
            validate_value("pages_frobbed", 1, state)  # a counter is not writable
        changes = KsmWriter(sysfs).apply({"frob_millisecs": "500", "run": 1}, state)
        assert changes == [Change("frob_millisecs", 250, 500)]
        assert (tmp_path / "sys/kernel/mm/ksm/frob_millisecs").read_text() == "500\n"

        text = _metrics(sysfs.read(), {"frob_millisecs": 500}, changes)
        assert "# TYPE ksm_frob_seconds gauge\nksm_frob_seconds 0.5\n" in text
        assert "# TYPE ksm_pages_frobbed_total counter\nksm_pages_frobbed_total 7.0\n" in text
        assert "ksmctl_target_frob_seconds 0.5\n" in text
        assert 'ksmctl_changes_total{knob="frob_millisecs"} 1.0\n' in text
        assert 'ksmctl_external_changes_total{knob="frob_millisecs"} 1.0\n' in text
        assert 'knob="pages_frobbed"' not in text

        r = _cli(tmp_path, "set", "--help")
        assert re.search(r"frob_millisecs\s+0\.\.1000", r.output), r.output
        r = _cli(tmp_path, "set", "frob_millisecs=2000")
        assert r.exit_code == 2 and "frob_millisecs: 2000 is out of range; allowed: 0..1000" in r.output
        assert "frob_millisecs" in _completions("bash_complete")
        assert "frob_millisecs" in knobs.markdown_table()
    assert "frob" not in _metrics(sysfs.read(), {}, [])  # the table is back as it was
    assert "frob" not in _cli(tmp_path, "set", "--help").output


def test_set_help_lists_every_writable_knob_with_its_range(tmp_path):
    r = CliRunner().invoke(cli, ["set", "--help"])
    assert r.exit_code == 0
    listed = re.findall(r"^\s{2}(\w+)\s{2,}(\S.*)$", r.output.split("Knobs:")[1], re.M)
    assert listed == [(k.name, k.range_text()) for k in knobs.writable()]


def _completions(instruction: str, words: str = "ksmctl set ", cword: int = 2):
    """What the shell scripts ask the installed ksmctl (COMP_WORDS, COMP_CWORD, instruction)."""
    r = CliRunner().invoke(cli, [], prog_name="ksmctl",
                           env={"COMP_WORDS": words, "COMP_CWORD": str(cword), "_KSMCTL_COMPLETE": instruction})
    assert r.exit_code == 0, r.output
    text = r.output
    if instruction == "bash_complete":
        values = [line.split(",", 1)[1] for line in text.splitlines()]
    else:  # zsh: type, value, description triples
        values = text.splitlines()[1::3]
    return [v[:-1] for v in values if v.endswith("=")]


@pytest.mark.parametrize("instruction", ["bash_complete", "zsh_complete"])
def test_completion_offers_exactly_the_writable_knobs(instruction):
    assert _completions(instruction) == list(knobs.writable_names())


def test_completion_scripts_ask_ksmctl_and_list_no_knob_of_their_own():
    for name, instruction in (("ksmctl.bash", "bash_complete"), ("ksmctl.zsh", "zsh_complete")):
        script = (REPO / "completions" / name).read_text()
        assert "_KSMCTL_COMPLETE=%s" % instruction in script
        assert not [k.name for k in knobs.KNOBS if re.search(r"\b%s\b" % k.name, script)], name


def test_bash_script_completes_knob_names_end_to_end(tmp_path):
    """The real bash script, sourced, against a `ksmctl` on PATH that is this checkout."""
    shim = tmp_path / "ksmctl"
    shim.write_text("#!/bin/sh\nexec %s -m ksmctl \"$@\"\n" % sys.executable)
    shim.chmod(0o755)
    script = ('source %s; COMP_WORDS=(ksmctl set pages_); COMP_CWORD=2; _ksmctl_completion ksmctl; '
              'printf "%%s\\n" "${COMPREPLY[@]}"' % (REPO / "completions/ksmctl.bash"))
    env = dict(os.environ, PATH="%s:%s" % (tmp_path, os.environ["PATH"]), PYTHONPATH=str(REPO))
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert p.stdout.split() == [n + "=" for n in knobs.writable_names() if n.startswith("pages_")], p.stderr


def test_docs_table_is_the_rendered_table():
    text = DOCS.read_text()
    head, rest = text.split(BEGIN, 1)
    marker_line, rest = rest.split("\n", 1)
    _old, tail = rest.split(END, 1)
    if UPDATE_DOCS:
        DOCS.write_text(head + BEGIN + marker_line + "\n" + knobs.markdown_table() + END + tail)
        return
    assert _old == knobs.markdown_table(), "docs/metrics.md's knob table is stale: KSMCTL_UPDATE_DOCS=1 pytest %s" \
        % Path(__file__).name


def test_table_rows_are_consistent():
    names = [k.name for k in knobs.KNOBS]
    metrics = [k.metric for k in knobs.KNOBS]
    assert len(set(names)) == len(names) and len(set(metrics)) == len(metrics)
    for k in knobs.KNOBS:
        assert k.metric.startswith("ksm_"), k
        assert k.metric.endswith("_total") == (k.metric_type is MetricType.COUNTER), k
        assert k.kind is not Kind.TUNABLE or k.lo <= k.hi, k
        assert (k.kind is Kind.CHOICE) == bool(k.choices), k
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?", k.since), k
    assert knobs.knob("run").restore_value(2) == 0 and knobs.knob("run").restore_value(1) == 1
    assert {k.name for k in knobs.KNOBS if k.needs_unmerged} == {"merge_across_nodes", "max_page_sharing"}
