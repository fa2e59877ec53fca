"""Paths and numbers no system call or clock can use (NUL bytes, empty paths, FIFOs as
TLS files, NaN and vanishing rates, a trace path under a file, a full stdout): each was a
traceback, a hang or a silent wrong meaning, and is a one-line error with a documented
exit code. Fixture trees only: nothing
here reads or writes the real /sys/kernel/mm/ksm."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from ksmctl.cli import cli
from ksmctl.collectors.host import HostCollector
from ksmctl.collectors.procfs import ProcFs
from ksmctl.config import Config, load_config
from ksmctl.errors import ConfigError, UsageError
from ksmctl.estimate.schedule import TokenBucket
from ksmctl.kernel.sysfs import KsmSysfs
from ksmctl.kernel.writer import KsmWriter
from ksmctl.policy.loader import load_policy
from ksmctl.service.daemon import Daemon

from .fixtures import cli_host, make_proc, make_sys

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def host(tmp_path):
    return cli_host(tmp_path)


def run(host, args, env=None, config=None):
    r = CliRunner().invoke(cli, ["--config", config or host["config"], "--sys-root", host["sys"],
                                 "--proc-root", host["proc"]] + args, env=env)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r


def _trace_record(host) -> dict:
    trace = host["tmp"] / "trace.jsonl"
    cfg = Path(host["config"])
    cfg.write_text(cfg.read_text() + "trace: {path: %s}\n" % trace)
    assert run(host, ["daemon", "--dry-run", "--once"]).exit_code == 0
    return json.loads(trace.read_text().splitlines()[0])


@pytest.mark.parametrize("key,value,named", [
    ("wall", 1e300, "readings.wall"),
    ("wall", -1e300, "readings.wall"),
    ("page_size", 0, "readings.ksm.page_size"),
])
def test_trace_values_replay_cannot_use_are_named(host, key, value, named):
    rec = _trace_record(host)
    if key == "page_size":
        rec["readings"]["ksm"]["page_size"] = value
    else:
        rec["readings"][key] = value
    bad = host["tmp"] / "bad.jsonl"
    bad.write_text(json.dumps(rec) + "\n")
    r = run(host, ["policy", "replay", "--policy", "default", "--trace", str(bad)])
    assert r.exit_code == 2 and "bad.jsonl:1: not a ksmctl trace record" in r.output and named in r.output, r.output


@pytest.mark.parametrize("text,key", [
    ('state_file: "/tmp/s\\0.json"\n', "state_file"),
    ("state_file: ''\n", "state_file"),
    ("state_file: /\n", "state_file"),
    ('state_dir: "/var/lib/k\\0"\n', "state_dir"),
    ('trace: {path: "/tmp/t\\0r"}\n', "trace.path"),
    ('exporter: {textfile: "/tmp/t\\0.prom"}\n', "exporter.textfile"),
    ('exporter: {web_config: "/etc/w\\0.yml"}\n', "exporter.web_config"),
    ('sys_root: "/s\\0ys"\n', "sys_root"),
    ("estimate: {rate_mib_s: 1e-300}\n", "estimate.rate_mib_s"),
])
def test_config_paths_and_rates_the_system_cannot_use_are_config_errors(tmp_path, text, key):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(f), env={})
    assert key in str(e.value) and str(f) in str(e.value), str(e.value)


def test_an_empty_state_file_variable_or_option_is_exit_2_not_a_traceback(host):
    r = run(host, ["daemon", "--dry-run", "--once"], env={"KSMCTL_STATE_FILE": ""})
    assert r.exit_code == 2 and "KSMCTL_STATE_FILE" in r.output, r.output
    r = run(host, ["vms", "--state-file", ""])
    assert r.exit_code == 2 and "not a state file path" in r.output, r.output


def test_a_trace_path_that_cannot_be_created_is_exit_2_at_start(host):
    cfg = Path(host["config"])
    cfg.write_text(cfg.read_text() + "trace: {path: %s/t.jsonl}\n" % host["config"])  # under a file
    r = run(host, ["daemon", "--dry-run", "--once"])
    assert r.exit_code == 2 and "trace.path" in r.output and "cannot create its directory" in r.output, r.output


def test_a_reload_with_a_trace_path_that_cannot_be_created_keeps_the_daemon(tmp_path):
    sys_root, proc_root = make_sys(tmp_path / "sys"), make_proc(tmp_path / "proc")
    bad = Config(state_file=str(tmp_path / "state.json"), trace={"path": str(tmp_path / "file" / "t.jsonl")})
    (tmp_path / "file").write_text("a file, not a directory\n")
    collector = HostCollector(KsmSysfs(str(sys_root)), ProcFs(str(proc_root)))
    good = Config(state_file=str(tmp_path / "state.json"))
    d = Daemon(good, load_policy("default"), collector, KsmWriter(collector.sysfs, dry_run=True),
               config_loader=lambda: bad)
    assert d.reload() is False
    assert d.config is good and d.trace is None
    assert d.reloads["ok"] is False and "trace.path" in d.reloads["message"]


@pytest.mark.parametrize("key", ["cert_file", "key_file"])
def test_a_fifo_as_a_tls_file_is_refused_without_blocking(tmp_path, key):
    from ksmctl.export.webconfig import load_web_config
    fifo = tmp_path / "tls.fifo"
    os.mkfifo(str(fifo))
    other = tmp_path / "other.pem"   # a regular file: the FIFO is what is refused
    other.write_text("")
    web = tmp_path / "web.yml"
    web.write_text("tls_server_config:\n  cert_file: %s\n  key_file: %s\n"
                   % (fifo if key == "cert_file" else other, fifo if key == "key_file" else other))
    out: dict = {}

    def load() -> None:
        try:
            load_web_config(str(web))
        except ConfigError as e:
            out["error"] = e.message
        except Exception as e:  # noqa: BLE001 - the assertion below shows it
            out["error"] = repr(e)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():
        with open(str(fifo), "wb"):  # unblock the opener so the thread can end
            pass
        pytest.fail("load_web_config blocked on a FIFO")
    assert "tls_server_config.%s" % key in out["error"] and "is a FIFO" in out["error"], out


def test_a_nul_byte_in_a_tls_path_is_a_config_error(tmp_path):
    from ksmctl.export.webconfig import load_web_config
    web = tmp_path / "web.yml"
    web.write_text('tls_server_config:\n  cert_file: "/tmp/c\\0ert"\n  key_file: /tmp/k.pem\n')
    with pytest.raises(ConfigError) as e:
        load_web_config(str(web))
    assert "tls_server_config.cert_file" in e.value.message and "NUL" in e.value.message


@pytest.mark.parametrize("args", [
    ["status", "--cpu-window", "nan"],
    ["doctor", "--cpu-window", "nan"],
    ["reload", "--timeout", "nan"],
    ["estimate", "--rate", "nan"],
    ["estimate", "--rate", "1e-320"],
])
def test_nan_and_vanishing_numbers_on_the_command_line_are_usage_errors(host, args):
    r = run(host, args)
    assert r.exit_code == 2 and "Invalid value for '%s'" % args[1] in r.output, r.output


@pytest.mark.parametrize("rate", [float("nan"), float("inf"), 1e-314, 0.5])
def test_token_bucket_refuses_rates_it_cannot_keep(rate):
    with pytest.raises(UsageError):
        TokenBucket.check_rate(rate)


@pytest.mark.parametrize("exec_path", ["/usr/bin/ksmctl\nExecStartPre=/bin/false", "/opt/my ksm/ksmctl",
                                       "/usr/bin/ksmctl%h"])
def test_install_refuses_an_exec_path_that_would_rewrite_the_unit(tmp_path, exec_path):
    root = tmp_path / "root"
    root.mkdir()
    r = CliRunner().invoke(cli, ["install", "--root", str(root), "--exec-path", exec_path])
    assert r.exit_code == 2 and "--exec-path" in r.output, r.output
    assert not any(root.rglob("ksmctl.service")), "the unit was written"


def test_set_refuses_a_knob_given_twice(host):
    r = run(host, ["set", "--dry-run", "run=1", "run=0"])
    assert r.exit_code == 2 and "run is given twice" in r.output, r.output


def test_a_full_stdout_is_one_line_and_exit_1():
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "ksmctl", "policy", "schema"], stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=60, cwd=str(REPO),
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip() == "ksmctl: cannot write output: No space left on device", p.stderr


@pytest.mark.parametrize("text,key", [
    ("name: x\nscan: {cpu_budget: true}\n", "scan.cpu_budget"),
    ("name: x\nscan:\n  pages_to_scan: {initial: true}\n", "scan.pages_to_scan.initial"),
    ("name: x\nscan:\n  adaptive: {target_pass_seconds: false}\n", "scan.adaptive.target_pass_seconds"),
    ("name: x\nkernel: {max_page_sharing: true}\n", "kernel.max_page_sharing"),
])
def test_yaml_true_and_false_are_not_numbers_in_a_policy(text, key):
    from ksmctl.errors import PolicyError
    from ksmctl.policy.loader import parse_policy
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "p.yaml")
    assert key in str(e.value) and "expected a number, found " in str(e.value), str(e.value)


def test_yaml_true_is_not_a_number_in_the_config(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("estimate: {rate_mib_s: true}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(f), env={})
    assert "estimate.rate_mib_s" in str(e.value) and "expected a number, found true" in str(e.value)


def test_install_refuses_a_found_ksmctl_whose_path_would_rewrite_the_unit(tmp_path, monkeypatch):
    import sysconfig
    from ksmctl.service.install import find_executable
    scripts = tmp_path / "my venv" / "bin"
    scripts.mkdir(parents=True)
    (scripts / "ksmctl").write_text("#!/usr/bin/python3\nfrom ksmctl.cli import main\n")
    (scripts / "ksmctl").chmod(0o755)
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(scripts))
    with pytest.raises(UsageError, match="the ksmctl found at .*my venv.*pass --exec-path"):
        find_executable()
    assert find_executable("/usr/bin/ksmctl") == "/usr/bin/ksmctl"


@pytest.mark.parametrize("text,says", [("policy: ''\n", "found an empty string"),
                                       ('policy: "/etc/p\\0.yaml"\n', "NUL byte")])
def test_an_empty_or_nul_policy_setting_names_the_config_and_key(tmp_path, text, says):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(f), env={})
    assert str(f) in str(e.value) and "policy" in str(e.value) and says in str(e.value), str(e.value)


def test_a_ksm_file_of_undecodable_bytes_is_unreadable_not_a_crash(tmp_path, host):
    """One garbled attribute costs its own value, never the reading (or the scrape)."""
    (Path(host["sys"]) / "kernel/mm/ksm/pages_shared").write_bytes(b"\xff\xfe\n")
    state = KsmSysfs(host["sys"]).read()
    assert "pages_shared" not in state.values and "undecodable" in state.unreadable["pages_shared"]
    r = run(host, ["status"])
    assert "Traceback" not in r.output
