"""`ksmctl install` / `uninstall` into a temporary root."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from ksmctl.service import install as inst
from ksmctl.cli.service import install_command, uninstall_command
from ksmctl.errors import EXIT_OK, EXIT_USAGE, UsageError

UNIT = "etc/systemd/system/ksmctl.service"
CONFIG = "etc/ksmctl/config.yaml"
MAN = "usr/local/share/man/man8/ksmctl.8"
BASH = "usr/local/share/bash-completion/completions/ksmctl"
ZSH = "usr/local/share/zsh/site-functions/_ksmctl"
MANIFEST = "var/lib/ksmctl/install-manifest.json"


def _tree(root: Path):
    """Every file under root with its content hash: the whole observable result."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


def _dirs(root: Path):
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir()}


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    return r


def test_files_land_where_documented(root):
    report = inst.install(str(root))
    exe = inst.find_executable()
    unit = (root / UNIT).read_text()
    assert "\nExecStart=%s --config /etc/ksmctl/config.yaml daemon\n" % exe in unit
    assert "\nExecReload=%s --config /etc/ksmctl/config.yaml reload --pid $MAINPID\n" % exe in unit
    assert unit == inst.render_unit(inst.shipped_file("systemd/ksmctl.service").read_text(), exe)
    assert (root / CONFIG).read_bytes() == inst.shipped_file("config.example.yaml").read_bytes()
    assert stat.S_IMODE((root / CONFIG).stat().st_mode) == 0o640
    policies = inst.shipped_policies()
    assert policies, "no shipped policies found"
    for p in policies:
        assert (root / "etc/ksmctl/policies" / p.name).read_bytes() == p.read_bytes()
    assert (root / MAN).read_bytes() == inst.shipped_file("docs/ksmctl.8").read_bytes()
    assert (root / BASH).read_bytes() == inst.shipped_file("completions/ksmctl.bash").read_bytes()
    assert (root / ZSH).read_text().startswith("#compdef ksmctl")
    manifest = json.loads((root / MANIFEST).read_text())
    files = set(_tree(root)) - {MANIFEST}
    assert set(manifest["files"]) == files
    assert sorted(report.installed) == sorted(files)
    assert report.kept == [] and report.updated == []


def test_second_install_keeps_an_edited_config(root):
    inst.install(str(root))
    edited = (root / CONFIG).read_text() + "\n# operator: tuned for host 7\n"
    (root / CONFIG).write_text(edited)
    before = _tree(root)
    report = inst.install(str(root))
    assert (root / CONFIG).read_text() == edited
    assert (root / (CONFIG + ".new")).read_bytes() == \
        inst.shipped_file("config.example.yaml").read_bytes()
    assert report.kept == [(CONFIG, CONFIG + ".new")]
    assert report.installed == [] and report.updated == []
    after = _tree(root)
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed == {CONFIG + ".new", MANIFEST}
    assert any("kept" in line and "config.yaml.new" in line for line in report.lines())


def test_upgrade_replaces_unedited_and_keeps_edited(root):
    items, exe = inst.plan()
    inst.install(str(root), items=items, exec_path=exe)
    (root / "etc/ksmctl/policies").mkdir(exist_ok=True)
    (root / CONFIG).write_text("edited: true\n")
    newer = [inst.Item(i.dest, i.content + b"\n# v2\n", i.mode) for i in items]
    report = inst.install(str(root), items=newer, exec_path=exe)
    assert (root / UNIT).read_bytes().endswith(b"# v2\n")  # unedited: upgraded
    assert UNIT in report.updated
    assert (root / CONFIG).read_text() == "edited: true\n"  # edited: kept
    assert (root / (CONFIG + ".new")).read_bytes().endswith(b"# v2\n")
    # The operator takes the new version: the stale .new goes away on the next run.
    os.replace(str(root / (CONFIG + ".new")), str(root / CONFIG))
    report = inst.install(str(root), items=newer, exec_path=exe)
    assert not (root / (CONFIG + ".new")).exists()
    assert CONFIG in report.unchanged


def test_uninstall_removes_exactly_what_install_added(root):
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system/other.service").write_text("[Service]\nExecStart=/bin/true\n")
    before_files, before_dirs = _tree(root), _dirs(root)
    inst.install(str(root))
    inst.install(str(root))  # idempotent
    report = inst.uninstall(str(root))
    assert _tree(root) == before_files
    assert _dirs(root) == before_dirs
    assert UNIT in report.removed and MANIFEST in report.removed
    assert report.kept_on_uninstall == []


def test_uninstall_keeps_edited_files_and_says_so(root):
    inst.install(str(root))
    (root / CONFIG).write_text("edited: true\n")
    inst.install(str(root))  # writes config.yaml.new beside it
    report = inst.uninstall(str(root))
    assert report.kept_on_uninstall == [CONFIG]
    assert any(line.endswith("config.yaml (edited since install)") for line in report.lines())
    assert _tree(root) == {CONFIG: hashlib.sha256(b"edited: true\n").hexdigest()}
    assert _dirs(root) == {"etc", "etc/ksmctl"}


def test_a_config_that_was_there_before_is_not_ours(root):
    (root / "etc/ksmctl").mkdir(parents=True)
    (root / CONFIG).write_text("mine: 1\n")
    report = inst.install(str(root))
    assert (CONFIG, CONFIG + ".new") in report.kept
    inst.uninstall(str(root))
    assert (root / CONFIG).read_text() == "mine: 1\n"
    assert not (root / (CONFIG + ".new")).exists()


def test_unit_execstart_points_at_this_installation(root):
    inst.install(str(root), exec_path="/opt/ksmctl/bin/ksmctl")
    assert "\nExecStart=/opt/ksmctl/bin/ksmctl --config " in (root / UNIT).read_text()
    with pytest.raises(UsageError, match="absolute"):
        inst.find_executable("bin/ksmctl")


def test_unit_hidden_from_service_is_warned_about(root):
    report = inst.install(str(root), exec_path="/root/venv/bin/ksmctl")
    assert any("ProtectHome" in w for w in report.warnings)


def test_debian_ksmctl_helper_is_never_taken_for_ours():
    # Debian's ksmtuned package ships an unrelated ELF /usr/sbin/ksmctl (start|stop).
    helper = Path("/usr/sbin/ksmctl")
    if helper.exists():
        assert not inst._is_our_script(helper)
    assert inst._is_our_script(Path(inst.find_executable()))


def test_shipped_file_missing_is_a_clear_error():
    with pytest.raises(UsageError, match="no/such.file not found"):
        inst.shipped_file("no/such.file")


def test_cli_install_and_uninstall(root):
    runner = CliRunner()
    res = runner.invoke(install_command, ["--root", str(root)])
    assert res.exit_code == EXIT_OK, res.output
    assert "installed  %s" % (root / UNIT) in res.output
    res = runner.invoke(uninstall_command, ["--root", str(root)])
    assert res.exit_code == EXIT_OK, res.output
    assert "removed    %s" % (root / UNIT) in res.output
    assert _tree(root) == {}


def test_cli_bad_input_is_a_message(root, tmp_path):
    runner = CliRunner()
    res = runner.invoke(uninstall_command, ["--root", str(root)])
    assert res.exit_code == EXIT_USAGE
    assert "nothing to uninstall" in res.output and MANIFEST in res.output
    res = runner.invoke(install_command, ["--root", "relative/dir"])
    assert res.exit_code == EXIT_USAGE
    assert "--root relative/dir: must be an absolute path" in res.output
    res = runner.invoke(install_command, ["--root", str(tmp_path / "missing")])
    assert res.exit_code == EXIT_USAGE and "no such directory" in res.output
    (root / "var/lib/ksmctl").mkdir(parents=True)
    (root / MANIFEST).write_text("{not json")
    res = runner.invoke(install_command, ["--root", str(root)])
    assert res.exit_code == EXIT_USAGE
    assert "install manifest" in res.output and "unreadable" in res.output
    assert "Traceback" not in res.output


def test_man_page_lists_exactly_the_cli_commands():
    from ksmctl.cli import cli
    text = inst.shipped_file("docs/ksmctl.8").read_text()
    section = text.split(".SH COMMANDS", 1)[1].split("\n.SH ", 1)[0]
    documented = {line.split()[1] for line in section.splitlines()
                  if line.startswith((".B ", ".BR ", ".BI "))}
    assert documented == set(cli.commands), "man page COMMANDS vs CLI differ"


def test_bash_completion_asks_the_installed_command(tmp_path):
    script = inst.shipped_file("completions/ksmctl.bash")
    exe = inst.find_executable()
    out = subprocess.run(
        ["bash", "-c", 'source "$1"; COMP_WORDS=(ksmctl unins); COMP_CWORD=1; '
         '_ksmctl_completion "$2"; printf "%s\\n" "${COMPREPLY[@]}"', "_", str(script), exe],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["uninstall"], out
