"""Daemon config: file, defaults, KSMCTL_* overrides, and messages for bad input."""
from __future__ import annotations

from pathlib import Path

import pytest

from ksmctl.config import DEFAULT_LISTEN, load_config
from ksmctl.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.setattr("ksmctl.config.DEFAULT_CONFIG_PATH", str(tmp_path / "absent.yaml"))
    c = load_config(None, env={})
    assert c.policy == "default" and c.restore_on_exit and c.exporter.listen == DEFAULT_LISTEN
    assert c.state_file == "/run/ksmctl/state.json" and c.interval is None


def test_example_config_is_valid_and_states_the_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr("ksmctl.config.DEFAULT_CONFIG_PATH", str(tmp_path / "absent.yaml"))
    assert load_config(str(REPO / "config.example.yaml"), env={}) == load_config(None, env={})


def test_env_overrides_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("policy: conservative\ninterval: 30s\n")
    c = load_config(str(f), env={"KSMCTL_POLICY": "aggressive", "KSMCTL_LISTEN": ":9999",
                                 "KSMCTL_RESTORE_ON_EXIT": "false"})
    assert c.policy == "aggressive" and c.interval == 30.0 and c.exporter.listen == ":9999"
    assert c.restore_on_exit is False


@pytest.mark.parametrize("text,env,message", [
    ("interval: forever\n", {}, "c.yaml:1: interval: 'forever' is not allowed: expected seconds, or with a unit: "
                                "500ms, 10s, 5m, 1h, found 'forever'"),
    ("exporter:\n  listen: localhost\n", {},
     "c.yaml:2: exporter.listen: 'localhost' is not allowed: expected host:port (e.g. 127.0.0.1:19839 or :19839)"),
    ("libvrt_uri: qemu:///system\n", {}, "c.yaml:1: top level: unknown key 'libvrt_uri'; allowed here: estimate, "
     "exporter, interval, libvirt, libvirt_uri, log_level, policy, proc_root, restore_on_exit, run_root, "
     "state_dir, state_file, sys_root, trace"),
    ("", {"KSMCTL_INTERVAL": "0"}, "c.yaml: interval: '0' is not allowed: interval must be between 0.1s and 3600s\n"
                                   "(KSMCTL_INTERVAL is set in the environment: '0')"),
    ("log_level: loud\n", {}, "c.yaml:1: log_level: 'loud' is not allowed: String should match pattern "
                              "'^(debug|info|warning|error)$'"),
])
def test_bad_config_messages(tmp_path, text, env, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(f), env=env)
    assert str(e.value) == message.replace("c.yaml", str(f))


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "nope.yaml"), env={})
