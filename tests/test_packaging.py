"""What the pip path ships and loads: the wheel and sdist carry the dashboard and rules
(as the Debian package does), optional features' dependencies are extras imported only
when the feature is on, `ksmctl start|stop` (ksmtuned's helper), and journald priorities."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from ksmctl.service import install as inst
from ksmctl.cli import cli
from ksmctl.logsetup import JournalFormatter, configure_logging, error_text, stderr_is_journal
from tests.fixtures import make_proc, make_sys

REPO = Path(__file__).resolve().parent.parent
SHARED = ["grafana/ksmctl-dashboard.json", "grafana/provisioning/dashboards/ksmctl.yaml",
          "grafana/provisioning/datasources/ksmctl.yaml", "prometheus/ksmctl-rules.yml",
          "prometheus/ksmctl-rules.test.yml"]


def _project_copy(dest: Path) -> Path:
    """The project's files (what `make deb` packages too), without build output."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=str(REPO), check=True, stdout=subprocess.PIPE).stdout.split(b"\0")
    dest.mkdir()
    for f in filter(None, files):
        src = REPO / f.decode()
        if not (src.exists() or src.is_symlink()):
            continue
        target = dest / f.decode()
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(str(src)), str(target))
        else:
            target.write_bytes(src.read_bytes())
    return dest


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """The sdist (setuptools' PEP 517 backend), a wheel built by pip from the tree and one
    built by pip from that sdist (what `pip install ksmctl-*.tar.gz` does)."""
    base = tmp_path_factory.mktemp("dists")
    src = _project_copy(base / "src")
    out = base / "out"

    def run(*argv, cwd=src):
        p = subprocess.run(list(argv), cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           universal_newlines=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:]

    run(sys.executable, "-c", "import sys; from setuptools import build_meta as b; b.build_sdist(sys.argv[1])",
        str(out))
    sdist = next(out.glob("*.tar.gz"))
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out / "tree"), str(src))
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out / "sdist"), str(sdist))
    return {"wheel": next((out / "tree").glob("*.whl")), "sdist": sdist,
            "wheel_from_sdist": next((out / "sdist").glob("*.whl"))}


def _wheel_files(whl: Path):
    with zipfile.ZipFile(str(whl)) as z:
        return {n: z.read(n) for n in z.namelist()}


def test_wheel_and_sdist_carry_dashboard_and_rules(dists):
    for key in ("wheel", "wheel_from_sdist"):
        files = _wheel_files(dists[key])
        for rel in SHARED:
            assert files.get("ksmctl/data/" + rel) == (REPO / rel).read_bytes(), (key, rel)
        assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE")
                   for n in files), key
    with tarfile.open(str(dists["sdist"])) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for rel in SHARED:
        assert "ksmctl/data/" + rel in names
    assert "LICENSE" in names


def test_wheel_metadata_makes_heavy_dependencies_extras(dists):
    meta = _wheel_files(dists["wheel"])
    text = next(v for k, v in meta.items() if k.endswith(".dist-info/METADATA")).decode()
    requires = [l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert not any(r.startswith(("numpy", "xxhash", "bcrypt")) for r in core), core
    for dep, extra in (("numpy", "estimate"), ("xxhash", "estimate"), ("bcrypt", "auth")):
        assert any(r.startswith(dep) and 'extra == "%s"' % extra in r for r in requires), (dep, requires)


def test_install_copies_dashboard_and_rules(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    report = inst.install(str(root))
    for rel in SHARED:
        dest = "usr/local/share/ksmctl/" + rel
        assert (root / dest).read_bytes() == (REPO / rel).read_bytes()
        assert dest in report.installed
    inst.uninstall(str(root))
    assert not (root / "usr/local/share/ksmctl").exists()


# -- optional features' dependencies are not loaded when the feature is off -----------

PROBE = r"""
import json, sys
blocked = sys.argv[1].split(",") if sys.argv[1] else []
for m in blocked:
    sys.modules[m] = None          # as if the extra were not installed
from ksmctl.cli import cli
try:
    cli(sys.argv[2:], prog_name="ksmctl")
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("numpy", "xxhash", "bcrypt") if sys.modules.get(m) is not None)
print(json.dumps({"code": code, "heavy": heavy}))
"""


def _probe(tmp_path, config: str, *args, blocked=()):
    sys_root = make_sys(tmp_path / "sys")
    proc_root = make_proc(tmp_path / "proc")
    cfg = tmp_path / "config.yaml"
    cfg.write_text("state_file: %s\nstate_dir: %s\nlibvirt: false\n%s"
                   % (tmp_path / "state.json", tmp_path / "state", config))
    p = subprocess.run([sys.executable, "-c", PROBE, ",".join(blocked), "--config", str(cfg),
                        "--sys-root", str(sys_root), "--proc-root", str(proc_root)] + list(args),
                       cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=60)
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


def test_daemon_does_not_load_optional_dependencies(tmp_path):
    res, err = _probe(tmp_path, "", "daemon", "--once", "--dry-run")
    assert res["code"] in (0, None), err
    assert res["heavy"] == [], err


def test_probe_sees_an_imported_dependency(tmp_path):
    """The check above can fail: the estimate command does load numpy and xxhash."""
    res, err = _probe(tmp_path, "", "estimate", "--pid", str(os.getpid()), "--json")
    assert {"numpy", "xxhash"} <= set(res["heavy"]), (res, err)


def test_missing_extra_is_named(tmp_path):
    res, err = _probe(tmp_path, "", "estimate", "--pid", "1", blocked=("numpy",))
    assert res["code"] == 2, err
    assert "pip install 'ksmctl[estimate]'" in err and "numpy" in err and "Traceback" not in err
    res, err = _probe(tmp_path, "estimate:\n  enabled: true\n", "daemon", "--dry-run",
                      blocked=("xxhash",))
    assert res["code"] == 2, err
    assert "estimate.enabled" in err and "ksmctl[estimate]" in err


def test_basic_auth_without_bcrypt_is_named(tmp_path):
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_users:\n  prom: $2b$10$3Ie/DdDZ0JbUPJ1Kx4h27uSvbYzGmpcGGAiEAP5sINdLhHuzbBhSC\n")
    res, err = _probe(tmp_path, "exporter:\n  web_config: %s\n" % web, "daemon", "--once",
                      "--dry-run", blocked=("bcrypt",))
    assert res["code"] == 2, err
    assert "ksmctl[auth]" in err and "bcrypt" in err


# -- ksmctl start|stop: the ksmtuned package's helper ----------------------------------

def test_start_stop_as_ksmtuneds_helper(tmp_path):
    sys_root = make_sys(tmp_path / "sys", {"run": "0"})
    run = sys_root / "kernel/mm/ksm/run"
    base = ["--sys-root", str(sys_root), "--config", str(tmp_path / "none.yaml")]
    (tmp_path / "none.yaml").write_text("state_file: %s\n" % (tmp_path / "state.json"))
    r = CliRunner().invoke(cli, base + ["start"])
    assert r.exit_code == 0, r.output
    assert run.read_text().strip() == "1" and "run: 0 -> 1" in r.output
    r = CliRunner().invoke(cli, base + ["stop"])
    assert r.exit_code == 0, r.output
    assert run.read_text().strip() == "0"     # run=0, never run=2: merged pages stay merged
    r = CliRunner().invoke(cli, base + ["stop"])
    assert r.exit_code == 0 and "already 0" in r.output


def test_start_without_ksm_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(cli, ["--sys-root", str(tmp_path / "empty"), "start"])
    assert r.exit_code == 2, r.output


# -- journald priorities ------------------------------------------------------------------

def test_journal_formatter_prefixes_every_line_with_its_priority():
    f = JournalFormatter("%(levelname)s %(name)s: %(message)s")
    rec = logging.LogRecord("ksmctl.daemon", logging.WARNING, __file__, 1, "a\nb", None, None)
    assert f.format(rec) == "<4>WARNING ksmctl.daemon: a\n<4>b"
    for level, prio in ((logging.ERROR, 3), (logging.INFO, 6), (logging.DEBUG, 7), (logging.CRITICAL, 2)):
        rec = logging.LogRecord("x", level, __file__, 1, "m", None, None)
        assert f.format(rec).startswith("<%d>" % prio)


def test_prefix_only_when_stderr_is_the_journal_stream(tmp_path):
    with open(str(tmp_path / "stream"), "w") as stream:
        st = os.fstat(stream.fileno())
        assert stderr_is_journal(stream, {"JOURNAL_STREAM": "%d:%d" % (st.st_dev, st.st_ino)})
        assert not stderr_is_journal(stream, {"JOURNAL_STREAM": "%d:%d" % (st.st_dev, st.st_ino + 1)})
        assert not stderr_is_journal(stream, {})
        env = {"JOURNAL_STREAM": "%d:%d" % (st.st_dev, st.st_ino)}
        os.environ.update(env)
        try:
            assert error_text("ksmctl: refused\n  - ksmtuned", stream) == "<3>ksmctl: refused\n<3>  - ksmtuned"
        finally:
            del os.environ["JOURNAL_STREAM"]
        assert error_text("ksmctl: refused", stream) == "ksmctl: refused"
    buf = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = []
    try:
        configure_logging("info", stream=buf)
        logging.getLogger("ksmctl.daemon").info("run 0 -> 1")
    finally:
        root.handlers[:] = saved
    assert buf.getvalue() == "INFO ksmctl.daemon: run 0 -> 1\n"
