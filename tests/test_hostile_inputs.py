"""Every file input surface (policy, config, state file, trace) fed what a path can
name besides the expected file, through the real CLI: a documented exit code and a
message naming the file, never a traceback, a hang, another file's text, or a write to
the (fixture) kernel. Then the YAML 1.1 traps, and a fuzz suite per surface."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ksmctl.cli import cli
from ksmctl.errors import PolicyError
from ksmctl.policy.loader import parse_policy

from .fixtures import cli_host

EXIT_CODES = {0, 1, 2, 3, 4}
SHADOW = "root:$6$Zm9vYmFy$c2VjcmV0aGFzaA:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"
SECRET = "c2VjcmV0aGFzaA"


def _hostile(tmp: Path) -> Dict[str, str]:
    """Paths of each kind of thing that is not the expected file."""
    tmp.mkdir(parents=True, exist_ok=True)
    fifo = tmp / "fifo"
    os.mkfifo(str(fifo))
    (tmp / "dir").mkdir()
    sparse = tmp / "sparse"
    with open(str(sparse), "wb") as f:
        f.truncate(100 * 1024 * 1024)
    shadow = tmp / "shadow"
    shadow.write_text(SHADOW)
    (tmp / "shadow-link").symlink_to(shadow)
    (tmp / "latin1").write_bytes(b"name: caf\xe9\n")
    return {"fifo": str(fifo), "directory": str(tmp / "dir"), "dev-zero": "/dev/zero", "sparse-100MiB": str(sparse),
            "shadow-symlink": str(tmp / "shadow-link"), "invalid-utf8": str(tmp / "latin1")}


KINDS = ["fifo", "directory", "dev-zero", "sparse-100MiB", "shadow-symlink", "invalid-utf8"]


@pytest.fixture
def host(tmp_path):
    return {**cli_host(tmp_path), "paths": _hostile(tmp_path / "hostile")}


def kernel_files(sys_root: str) -> Dict[str, str]:
    d = Path(sys_root) / "kernel/mm/ksm"
    return {p.name: p.read_text() for p in sorted(d.iterdir())}


def invoke(host, args: List[str], config: str = "") -> "object":
    before = kernel_files(host["sys"])
    r = CliRunner().invoke(cli, ["--config", config or host["config"], "--sys-root", host["sys"],
                                 "--proc-root", host["proc"]] + args)
    assert r.exit_code in EXIT_CODES, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    assert kernel_files(host["sys"]) == before, "an invalid input wrote to the kernel"
    return r


WHY = {"fifo": ("is a FIFO",), "directory": ("is a directory",), "dev-zero": ("is a character device",),
       "sparse-100MiB": ("larger than", "longer than"), "invalid-utf8": ("not UTF-8 text (byte 9)",),
       "shadow-symlink": ("",)}


def assert_refused(r, path: str, kind: str) -> None:
    assert r.exit_code == 2, r.output
    assert path in r.output, r.output
    assert any(why in r.output for why in WHY[kind]), r.output
    assert SECRET not in r.output and "daemon:*" not in r.output, r.output


SURFACES = {
    "policy validate": lambda p: ["policy", "validate", p],
    "policy explain": lambda p: ["policy", "explain", p],
    "daemon --policy": lambda p: ["daemon", "--dry-run", "--once", "--policy", p],
    "policy replay --trace": lambda p: ["policy", "replay", "--policy", "default", "--trace", p],
    "vms --state-file": lambda p: ["vms", "--state-file", p],
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("surface", sorted(SURFACES))
def test_not_the_expected_file(host, surface, kind):
    path = host["paths"][kind]
    assert_refused(invoke(host, SURFACES[surface](path)), path, kind)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", [["daemon", "--dry-run", "--once"], ["policy", "explain"]])
def test_not_a_config_file(host, command, kind):
    path = host["paths"][kind]
    assert_refused(invoke(host, command, config=path), path, kind)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_not_a_state_file_for_status(host, kind):
    cfg = Path(host["config"])
    cfg.write_text(cfg.read_text().replace(str(host["tmp"] / "state.json"), host["paths"][kind]))
    assert_refused(invoke(host, ["status", "--cpu-window", "0"]), host["paths"][kind], kind)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_status_with_a_bad_config_warns_and_still_shows_ksm(host, kind):
    r = invoke(host, ["status", "--cpu-window", "0"], config=host["paths"][kind])
    if kind == "directory":  # click's own check of --config (dir_okay=False)
        assert r.exit_code == 2 and "is a directory" in r.output
        return
    assert r.exit_code == 0 and "warning: " + host["paths"][kind] in r.output and SECRET not in r.output


WRONG_STATES = [
    ({"pid": 0}, "pid"),
    ({"pid": os.getpid(), "updated": "yesterday"}, "updated"),
    ({"pid": os.getpid(), "policy": "default"}, "policy"),
    ({"pid": os.getpid(), "decision": {"run_rule": 1, "scan_rule": "x"}}, "decision.run_rule"),
    ({"pid": os.getpid(), "readings": {"ksm": {"values": {}, "page_size": 1e300}}}, "readings.ksm.page_size"),
    ({"pid": os.getpid(), "readings": {"vms": [{"uuid": "u", "name": None}]}}, "name"),
    ({"pid": os.getpid(), "readings": {"vms": [{"uuid": "u", "rss": 10 ** 400}]}}, "rss"),
    ({"pid": os.getpid(), "format": "something-else"}, "format"),
    ([1, 2], "top level"),
]


@pytest.mark.parametrize("doc,key", WRONG_STATES, ids=[k for _, k in WRONG_STATES])
@pytest.mark.parametrize("command", [["status", "--cpu-window", "0"], ["vms"], ["status", "--json"]])
def test_state_file_of_the_wrong_shape_is_exit_2_naming_the_key(host, doc, key, command):
    (host["tmp"] / "state.json").write_text(json.dumps(doc))
    r = invoke(host, command)
    assert r.exit_code == 2 and "state.json: not a ksmctl state file: " in r.output and key in r.output, r.output


def test_shadow_as_policy_prints_no_line_of_it(tmp_path):
    with pytest.raises(PolicyError) as e:
        parse_policy(SHADOW, "shadow")
    assert SECRET not in str(e.value) and "root" not in str(e.value) and "19000" not in str(e.value)
    assert "unknown key (not shown: not a plain word)" in str(e.value)


@pytest.mark.parametrize("text", [
    "bogus: {a: x}\ninterval: secret-1\n",             # a known key's value in a foreign mapping
    "password: 1:23\n",                                # a YAML 1.1 trap in a foreign mapping
    "tls_server_config:\n  key_file: secret-1\nname: [secret-1]\n",
])
def test_values_of_a_document_with_unknown_keys_are_not_shown(text):
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "p.yaml")
    assert "secret-1" not in str(e.value) and "1:23" not in str(e.value), str(e.value)


def test_values_of_a_policy_shaped_document_are_shown():
    with pytest.raises(PolicyError, match="'secret-1' is not allowed"):
        parse_policy("name: x\ninterval: secret-1\n", "p.yaml")


YAML_TRAPS = [
    ("interval: 1:30", "p.yaml:2: interval: YAML 1.1 reads 1:30 as the base-60 number 90: write it in seconds "
                       "(90s), or quote it for text"),
    ("interval: 010", "p.yaml:2: interval: 010 has a leading zero (YAML 1.1 reads it as octal: 8): write 10, or "
                      "quote it ('010') for text"),
    ("interval: 0x10", "p.yaml:2: interval: 0x10: hexadecimal, octal and binary numbers are not supported: write "
                       "it in decimal (16), or quote it for text"),
    ("interval: 0b1", "p.yaml:2: interval: 0b1: hexadecimal, octal and binary numbers are not supported: write it "
                      "in decimal (1), or quote it for text"),
    ("interval: 1_000", "p.yaml:2: interval: 1_000: write the number without underscores (1000), or quote it for "
                        "text"),
    ("interval: .nan", "p.yaml:2: interval: .nan: NaN and infinity are not allowed, write a finite number"),
    ("interval: -.inf", "p.yaml:2: interval: -.inf: NaN and infinity are not allowed, write a finite number"),
    ("interval: 1e999", "p.yaml:2: interval: 1e999 is too large a number"),
    ("interval: !!int 10", "p.yaml:2: not valid YAML: YAML tags (!name, !!type) are not supported; quote a value "
                           "to make it text"),
]


@pytest.mark.parametrize("line,message", YAML_TRAPS, ids=[l for l, _ in YAML_TRAPS])
def test_yaml_1_1_traps_are_errors_saying_how_to_write_them(line, message):
    with pytest.raises(PolicyError) as e:
        parse_policy("name: x\n" + line + "\n", "p.yaml")
    assert str(e.value) == message


def test_yaml_1_2_meanings():
    p = parse_policy("name: off\ninterval: '90'\nrun: {mode: off}\n", "p.yaml")
    assert p.name == "off" and p.run.mode == "off" and p.interval == 90
    assert parse_policy("name: x\ninterval: 1e1\n").interval == 10
    assert parse_policy("name: x\ninterval: 010.5\n").interval == 10.5


@pytest.mark.parametrize("text,env,key", [
    ("estimate:\n  rate_mib_s: 'nan'\n", {}, "estimate.rate_mib_s"),
    ("estimate:\n  rate_mib_s: .inf\n", {}, "estimate.rate_mib_s"),
    ("estimate:\n  interval: 1e300\n", {}, "estimate.interval"),
    ("estimate:\n  interval: -60\n", {}, "estimate.interval"),
    ("trace:\n  max_bytes: 99999999999999999999\n", {}, "trace.max_bytes"),
    ("trace:\n  backups: -1\n", {}, "trace.backups"),
    ("exporter:\n  listen: ':99999'\n", {}, "exporter.listen"),
    ("", {"KSMCTL_INTERVAL": "nan"}, "KSMCTL_INTERVAL"),
    ("", {"KSMCTL_INTERVAL": "inf"}, "KSMCTL_INTERVAL"),
    ("", {"KSMCTL_LISTEN": ":\u0661\u0662"}, "KSMCTL_LISTEN"),
    ("", {"KSMCTL_LIBVIRT": "maybe"}, "KSMCTL_LIBVIRT"),
])
def test_config_numbers_are_finite_and_bounded(tmp_path, text, env, key):
    from ksmctl.config import load_config
    from ksmctl.errors import ConfigError
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(f), env=env)
    assert key in str(e.value) and str(f) in str(e.value)


def test_env_note_names_only_the_variable_that_set_the_bad_key(tmp_path):
    from ksmctl.config import load_config
    from ksmctl.errors import ConfigError
    f = tmp_path / "c.yaml"
    f.write_text("estimate:\n  interval: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(f), env={"KSMCTL_INTERVAL": "30"})
    assert "KSMCTL_INTERVAL" not in str(e.value)


# -- fuzz: random input per surface, through the CLI ---------------------------------------
FUZZ = settings(max_examples=40, deadline=5000, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.function_scoped_fixture])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                           lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4),
                           max_leaves=20)
state_keys = st.sampled_from(["pid", "updated", "policy", "decision", "readings", "format", "dry_run", "status",
                              "vms", "ksm", "values", "page_size", "name", "uuid", "rows", "fields", "ksm_fields",
                              "run_rule", "scan_rule", "reasons"])
state_docs = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                          lambda ch: st.lists(ch, max_size=4) | st.dictionaries(state_keys, ch, max_size=5),
                          max_leaves=25)
config_keys = st.sampled_from(["policy", "interval", "state_file", "exporter", "listen", "trace", "max_bytes",
                               "estimate", "rate_mib_s", "libvirt", "log_level", "bogus"])
yaml_scalars = st.sampled_from(["1:30", "010", "0x1f", ".nan", "-.inf", "yes", "off", "1_0", "1e999", "~", "''",
                                "!!str x", "*a", "&a x", "[", "{", "'", "|", ">", "- x", "? x"])
config_docs = st.recursive(yaml_scalars | st.integers() | st.text(max_size=8),
                           lambda ch: st.lists(ch, max_size=3) | st.dictionaries(config_keys, ch, max_size=4),
                           max_leaves=15)


def _yaml(doc) -> str:
    if isinstance(doc, dict):
        return "\n".join("%s: %s" % (k, _yaml(v).replace("\n", "\n  ")) for k, v in doc.items()) or "{}"
    if isinstance(doc, list):
        return "[" + ", ".join(_yaml(v) for v in doc) + "]"
    return str(doc)


@pytest.mark.timeout(300)
@FUZZ
@given(data=st.one_of(st.binary(max_size=300), config_docs.map(lambda d: _yaml(d).encode())))
def test_fuzz_policy(host, data):
    p = host["tmp"] / "fuzz-policy.yaml"
    p.write_bytes(data)
    for args in (["policy", "validate", str(p)], ["daemon", "--dry-run", "--once", "--policy", str(p)]):
        r = invoke(host, args)
        assert r.exit_code in (0, 2), r.output


@pytest.mark.timeout(300)
@FUZZ
@given(data=st.one_of(st.binary(max_size=300), config_docs.map(lambda d: _yaml(d).encode())))
def test_fuzz_config(host, data):
    p = host["tmp"] / "fuzz-config.yaml"
    p.write_bytes(data)
    r = invoke(host, ["policy", "explain"], config=str(p))
    assert r.exit_code in (0, 2), r.output


@pytest.mark.timeout(300)
@FUZZ
@given(data=st.one_of(st.binary(max_size=300),
                      state_docs.map(lambda d: json.dumps({"pid": os.getpid(), **d} if isinstance(d, dict) else d)
                                     .encode())))
def test_fuzz_state_file(host, data):
    (host["tmp"] / "state.json").write_bytes(data)
    for args in (["status", "--cpu-window", "0"], ["status", "--json", "--cpu-window", "0"], ["vms"]):
        r = invoke(host, args)
        assert r.exit_code in (0, 2), r.output


@pytest.mark.timeout(300)
@FUZZ
@given(lines=st.lists(st.one_of(st.binary(max_size=100), json_values.map(lambda v: json.dumps(v).encode()),
                                state_docs.map(lambda d: json.dumps({"v": 1, "readings": d, "state_before": {},
                                                                     "decision": d}).encode())), max_size=3))
def test_fuzz_trace(host, lines):
    p = host["tmp"] / "fuzz.trace"
    p.write_bytes(b"\n".join(lines))
    r = invoke(host, ["policy", "replay", "--policy", "default", "--trace", str(p)])
    assert r.exit_code in (0, 2), r.output


def test_web_config_is_read_like_every_input_file(tmp_path):
    """A FIFO, a directory or a device as the exporter's web config: refused at load with
    a message naming the file, without blocking and without quoting it."""
    from ksmctl.errors import ConfigError
    from ksmctl.export.webconfig import load_web_config
    fifo = tmp_path / "web.fifo"
    os.mkfifo(str(fifo))
    (tmp_path / "dir").mkdir()
    shadow = tmp_path / "shadow"
    shadow.write_text("root:$6$abcdefgh$0123456789:19000:0:99999:7:::\n")
    for bad in (fifo, tmp_path / "dir", Path("/dev/zero"), shadow):
        with pytest.raises(ConfigError) as e:
            load_web_config(str(bad))
        assert str(bad) in e.value.message and "$6$" not in e.value.message, e.value.message
