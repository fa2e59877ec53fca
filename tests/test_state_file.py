"""The state file: only ksmctl's own is replaced or deleted, one daemon per file (the
second exits 4 naming the first), and a dry run keeps to its own file, which status shows."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ksmctl.cli import cli
from ksmctl.errors import EXIT_REFUSED, Refused
from ksmctl.service.state import STATE_FORMAT, StateFile, dry_run_path, read_state

from .fixtures import make_proc, make_sys
from .support import terminate, wait_for

REPO = Path(__file__).resolve().parent.parent


def test_dry_run_path():
    assert dry_run_path("/run/ksmctl/state.json") == "/run/ksmctl/state-dry-run.json"


def test_written_file_is_marked_and_read_back(tmp_path):
    path = str(tmp_path / "state.json")
    s = StateFile(path).acquire()
    s.write({"pid": os.getpid(), "updated": 1.0})
    doc = json.loads(Path(path).read_text())
    assert doc["format"] == STATE_FORMAT and read_state(path)["pid"] == os.getpid()
    assert Path(path + ".lock").read_text() == "%d\n" % os.getpid()
    s.remove()
    s.release()
    assert not Path(path).exists()


@pytest.mark.parametrize("content", ["important notes\n", '{"pid": 1}', "[]"])
def test_a_file_ksmctl_did_not_write_is_never_replaced_or_deleted(tmp_path, content):
    path = tmp_path / "state.json"
    path.write_text(content)
    with pytest.raises(Refused, match="state.json: exists and was not written by ksmctl"):
        StateFile(str(path)).acquire()
    s = StateFile(str(path))
    with pytest.raises(OSError) as e:
        s.write({"pid": os.getpid()})
    assert e.value.errno == errno.EEXIST
    s.remove()
    assert path.read_text() == content


def test_a_symlink_at_the_path_is_not_followed_or_replaced(tmp_path):
    target = tmp_path / "passwd"
    target.write_text("root:x:0:0::/root:/bin/sh\n")
    (tmp_path / "state.json").symlink_to(target)
    with pytest.raises(Refused):
        StateFile(str(tmp_path / "state.json")).acquire()
    assert (tmp_path / "state.json").is_symlink() and target.read_text().startswith("root:x")


def test_a_legacy_ksmctl_state_file_is_ours(tmp_path):
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"version": "0.1.0", "pid": 1, "started": 0, "updated": 0, "ticks": 1,
                                "policy": {"name": "default"}}))
    StateFile(str(path)).acquire().write({"pid": os.getpid()})
    assert json.loads(path.read_text())["format"] == STATE_FORMAT


def test_a_foreign_lock_file_is_left_alone(tmp_path):
    lock = tmp_path / "state.json.lock"
    lock.write_text("not a pid\n")
    with pytest.raises(Refused, match="not a ksmctl lock file"):
        StateFile(str(tmp_path / "state.json")).acquire()
    assert lock.read_text() == "not a pid\n"


@pytest.fixture
def fixture_host(tmp_path):
    sys_root = make_sys(tmp_path / "sys")
    proc_root = make_proc(tmp_path / "proc")
    policy = tmp_path / "p.yaml"
    policy.write_text("name: quick\ninterval: 0.2\nrun: {mode: always}\n")
    cfg = tmp_path / "config.yaml"
    cfg.write_text("policy: %s\nstate_file: %s\nlibvirt: false\nexporter: {enabled: false}\nsys_root: %s\n"
                   "proc_root: %s\nrun_root: %s\nstate_dir: %s\n" % (policy, tmp_path / "state.json", sys_root,
                                                                    proc_root, tmp_path / "run", tmp_path / "lib"))
    return {"config": str(cfg), "sys": str(sys_root), "proc": str(proc_root), "tmp": tmp_path}


def _daemon(h, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ksmctl", "--config", h["config"], "daemon", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)))


@pytest.mark.timeout(120)
def test_second_daemon_on_one_state_file_exits_4_naming_the_first(fixture_host):
    h = fixture_host
    first = _daemon(h, "--dry-run")
    try:
        dry = Path(dry_run_path(str(h["tmp"] / "state.json")))
        wait_for(lambda: dry.exists() or first.poll() is not None, 60, "the first daemon's state file")
        assert first.poll() is None
        r = CliRunner().invoke(cli, ["--config", h["config"], "daemon", "--dry-run", "--once"])
        assert r.exit_code == EXIT_REFUSED, r.output
        assert "another ksmctl daemon (pid %d)" % first.pid in r.output and str(dry) in r.output
        # The service's own file was never touched by the dry run ...
        assert not (h["tmp"] / "state.json").exists()
        # ... and status shows the dry-run daemon.
        s = CliRunner().invoke(cli, ["--config", h["config"], "--sys-root", h["sys"], "--proc-root", h["proc"],
                                     "status", "--json", "--cpu-window", "0"])
        assert s.exit_code == 0, s.output
        d = json.loads(s.output)["daemon"]
        assert d["pid"] == first.pid and d["dry_run"] is True
    finally:
        terminate(first)
    assert not dry.exists(), "a stopping daemon removes its own state file"


@pytest.mark.timeout(120)
def test_dry_run_leaves_the_service_state_file_alone(fixture_host):
    h = fixture_host
    service = h["tmp"] / "state.json"
    doc = {"format": STATE_FORMAT, "pid": os.getpid(), "updated": 1.0, "dry_run": False,
           "policy": {"name": "service"}}
    service.write_text(json.dumps(doc))
    r = CliRunner().invoke(cli, ["--config", h["config"], "daemon", "--dry-run", "--once"])
    assert r.exit_code == 0, r.output
    assert json.loads(service.read_text()) == doc
