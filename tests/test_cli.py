"""The CLI through CliRunner (exit codes and output) on fixture trees, and as a real
subprocess on this host."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from ksmctl.cli import cli

from .fixtures import OLD_KERNEL_DROPS, make_proc, make_sys

REPO = Path(__file__).resolve().parent.parent


def run(tmp_path, *args, sys_over=None, drop=(), meminfo=None, input=None):
    sys_root = make_sys(tmp_path / "sys", sys_over, drop=drop)
    proc_kw = {"meminfo": meminfo} if meminfo else {}
    proc_root = make_proc(tmp_path / "proc", **proc_kw)
    cfg = tmp_path / "config.yaml"
    cfg.write_text("state_file: %s\nlibvirt: false\n" % (tmp_path / "state.json"))
    return CliRunner().invoke(cli, ["--config", str(cfg), "--sys-root", str(sys_root), "--proc-root",
                                    str(proc_root)] + list(args), input=input)


def test_status_human(tmp_path):
    r = run(tmp_path, "status", "--cpu-window", "0")
    assert r.exit_code == 0, r.output
    assert "KSM             running (run=1), advisor none" in r.output
    assert "Memory saved    99.6 MiB (pages_sharing 25000 + ksm_zero_pages 500)" in r.output
    assert "Daemon          not running" in r.output


def test_status_json_on_old_kernel(tmp_path):
    r = run(tmp_path, "status", "--json", "--cpu-window", "0", drop=OLD_KERNEL_DROPS)
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["saved_bytes"] == 25000 * 4096 and d["general_profit_bytes"] is None
    assert "advisor_mode" in d["ksm"]["unsupported"] and d["daemon"] is None


def test_status_negative_profit_is_called_out(tmp_path):
    r = run(tmp_path, "status", "--cpu-window", "0", sys_over={"general_profit": "-8388608"})
    assert "-8.0 MiB  (negative: KSM costs more than it saves)" in r.output


def test_no_ksm_exit_code_2(tmp_path):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(cli, ["--sys-root", str(tmp_path / "empty"), "status"])
    assert r.exit_code == 2 and "KSM is not available" in r.output and "CONFIG_KSM" in r.output


def test_set_validates_and_writes_only_changes(tmp_path):
    r = run(tmp_path, "set", "pages_to_scan=500", "sleep_millisecs=20")
    assert r.exit_code == 0, r.output
    assert r.output.strip() == "pages_to_scan: 100 -> 500"
    assert (tmp_path / "sys/kernel/mm/ksm/pages_to_scan").read_text() == "500\n"


def test_set_rejects_bad_input(tmp_path):
    r = run(tmp_path, "set", "pages_to_scan=lots")
    assert r.exit_code == 2 and "pages_to_scan: 'lots' is not a whole number; allowed: 0..4294967295" in r.output
    r = run(tmp_path, "set", "pages_to_scan")
    assert r.exit_code == 2 and "expected KEY=VALUE, found 'pages_to_scan'" in r.output
    r = run(tmp_path, "set", "run=2")
    assert r.exit_code == 2 and "use `ksmctl unmerge`" in r.output
    assert (tmp_path / "sys/kernel/mm/ksm/pages_to_scan").read_text() == "100\n"


def test_unmerge_refused_when_memory_is_short(tmp_path):
    tight = "MemTotal: 1048576 kB\nMemFree: 10000 kB\nMemAvailable: 50000 kB\n"
    r = run(tmp_path, "unmerge", "--yes", meminfo=tight)
    assert r.exit_code == 4, r.output
    assert "refusing to unmerge" in r.output and "--force" in r.output
    assert (tmp_path / "sys/kernel/mm/ksm/run").read_text() == "1\n"
    r = run(tmp_path, "unmerge", "--yes", "--force", meminfo=tight)
    assert r.exit_code == 0 and "WARNING" in r.output
    assert (tmp_path / "sys/kernel/mm/ksm/run").read_text() == "2\n"


def test_policy_commands(tmp_path):
    r = run(tmp_path, "policy", "validate", str(REPO / "policies/default.yaml"))
    assert r.exit_code == 0 and "OK (policy default" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: b\nintervall: 5\n")
    r = run(tmp_path, "policy", "validate", str(bad), str(REPO / "policies/off.yaml"))
    assert r.exit_code == 2 and "bad.yaml:2: top level: unknown key 'intervall'" in r.output
    r = run(tmp_path, "policy", "show")
    assert r.exit_code == 0 and "* default" in r.output and "ksmtuned" in r.output
    r = run(tmp_path, "policy", "show", "ksmtuned")
    assert r.output.startswith("# ksmtuned.yaml")
    r = run(tmp_path, "policy", "explain", "ksmtuned", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    # Fixture host: free = 20000000+100000+900000 KiB of 24683656: far above 20%: stop.
    assert d["run_rule"] == "stop" and d["targets"] == {"run": 0}
    assert d["changes"] == {"run": {"now": 1, "target": 0}}
    r = run(tmp_path, "policy", "schema")
    assert json.loads(r.output)["title"] == "ksmctl policy"


def test_subprocess_status_and_help_on_this_host():
    p = subprocess.run([sys.executable, "-m", "ksmctl", "status", "--json"], capture_output=True, text=True,
                       timeout=60, cwd=str(REPO))
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["memory"]["total_bytes"] > 0 and "pages_sharing" in d["ksm"]["values"]
    p = subprocess.run([sys.executable, "-m", "ksmctl", "--help"], capture_output=True, text=True, timeout=60)
    assert "Exit codes:" in p.stdout and "4  refused by a safety guard" in p.stdout
    p = subprocess.run([sys.executable, "-m", "ksmctl", "policy", "validate", "/nonexistent.yaml"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "/nonexistent.yaml: no such policy file" in p.stderr and "Traceback" not in p.stderr
