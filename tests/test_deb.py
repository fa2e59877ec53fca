"""`make deb`: the Debian package, built with debhelper + dh-virtualenv, checked by lintian
and by what it contains. The package is installed and run under a real systemd in
tests/test_deb_guest.py."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ksmctl.service import install as inst
from tests.guest import debs
from tests.support import need_tool

REPO = Path(__file__).resolve().parent.parent
VENV = "usr/lib/ksmctl/venv"


def _need_build_tools():
    for tool in ("dpkg-buildpackage", "dh", "dh_virtualenv", "lintian"):
        need_tool(tool)


@pytest.fixture(scope="module")
def deb():
    _need_build_tools()
    return debs.build()


@pytest.fixture(scope="module")
def unpacked(deb, tmp_path_factory):
    d = tmp_path_factory.mktemp("deb")
    subprocess.run(["dpkg-deb", "-R", str(deb), str(d)], check=True)
    return d


def _field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], check=True, stdout=subprocess.PIPE,
                          universal_newlines=True).stdout.strip()


def _lintian(path: Path):
    p = subprocess.run(["lintian", "--tag-display-limit", "0", str(path)], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, universal_newlines=True, timeout=600)
    return p.returncode, p.stdout


def test_name_version_arch(deb):
    arch = subprocess.run(["dpkg", "--print-architecture"], check=True, stdout=subprocess.PIPE,
                          universal_newlines=True).stdout.strip()
    assert deb.name == "ksmctl_%s_%s.deb" % (debs.version(), arch)
    from ksmctl import __version__
    assert debs.version().split("-")[0].startswith(__version__)


def test_lintian_reports_no_errors(deb):
    rc, out = _lintian(deb)
    errors = [l for l in out.splitlines() if l.startswith("E:")]
    assert errors == [], out
    assert rc == 0, out


def test_lintian_would_report_an_error(unpacked, tmp_path):
    """The check above can fail: the same package without its copyright file is an error."""
    broken = tmp_path / "broken"
    shutil.copytree(str(unpacked), str(broken), symlinks=True)
    (broken / "usr/share/doc/ksmctl/copyright").unlink()
    out = tmp_path / "ksmctl_broken.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(broken), str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    rc, text = _lintian(out)
    assert rc != 0 and "E: ksmctl: no-copyright-file" in text, text


def test_installs_what_the_issue_lists(unpacked):
    r = unpacked
    for path in ("usr/bin/ksmctl", "lib/systemd/system/ksmctl.service", "etc/ksmctl/config.yaml",
                 "usr/share/man/man8/ksmctl.8.gz", "usr/share/bash-completion/completions/ksmctl",
                 "usr/share/zsh/vendor-completions/_ksmctl", "usr/share/doc/ksmctl/copyright",
                 "usr/share/doc/ksmctl/changelog.gz"):
        assert (r / path).exists() or (r / path).is_symlink(), path
    assert (r / "usr/bin/ksmctl").resolve().relative_to(r.resolve()) == Path(VENV, "bin/ksmctl")
    for p in inst.shipped_policies():
        assert (r / "etc/ksmctl/policies" / p.name).read_bytes() == p.read_bytes()
    assert (r / "etc/ksmctl/config.yaml").read_bytes() == (REPO / "config.example.yaml").read_bytes()
    assert (r / "etc/ksmctl/config.yaml").stat().st_mode & 0o777 == 0o640
    # the project's licence: in copyright, and as LICENSE with the installed distribution
    assert "License: Apache-2.0" in (r / "usr/share/doc/ksmctl/copyright").read_text()
    lic = list(r.glob(VENV + "/lib/python3*/site-packages/ksmctl-*.dist-info/licenses/LICENSE"))
    assert lic and lic[0].read_bytes() == (REPO / "LICENSE").read_bytes()
    unit = (r / "lib/systemd/system/ksmctl.service").read_text()
    assert "\nExecStart=/usr/bin/ksmctl --config /etc/ksmctl/config.yaml daemon\n" in unit
    assert "\nExecReload=/usr/bin/ksmctl --config /etc/ksmctl/config.yaml reload --pid $MAINPID\n" in unit
    assert unit == inst.render_unit((REPO / "systemd/ksmctl.service").read_text(), "/usr/bin/ksmctl")


def test_dashboard_and_rules_are_those_of_ksmctl_install(unpacked, tmp_path):
    """The pip path (`ksmctl install --prefix /usr`) and the package ship the same files."""
    root = tmp_path / "root"
    root.mkdir()
    inst.install(str(root), prefix="/usr")

    def tree(base: Path):
        return {str(p.relative_to(base)): p.read_bytes() for p in base.rglob("*") if p.is_file()}
    ours = tree(root / "usr/share/ksmctl")
    assert {"grafana/ksmctl-dashboard.json", "prometheus/ksmctl-rules.yml"} <= set(ours)
    assert tree(unpacked / "usr/share/ksmctl") == ours


def test_conffiles_and_relations(deb, unpacked):
    conffiles = (unpacked / "DEBIAN/conffiles").read_text().split()
    assert "/etc/ksmctl/config.yaml" in conffiles
    assert all(c.startswith("/etc/ksmctl/") for c in conffiles)
    assert _field(deb, "Conflicts") == "ksmtuned"
    assert _field(deb, "Replaces") == "ksmtuned"
    assert "python3-libvirt" in _field(deb, "Recommends")
    assert "python3-yaml" in _field(deb, "Depends")


def test_maintainer_scripts_follow_policy(unpacked):
    d = unpacked / "DEBIAN"
    postinst, prerm, postrm = ((d / n).read_text() for n in ("postinst", "prerm", "postrm"))
    assert "deb-systemd-helper enable 'ksmctl.service'" in postinst
    assert re.search(r"_dh_action=restart", postinst)          # restart on upgrade
    assert "deb-systemd-invoke stop 'ksmctl.service'" in prerm  # stop on remove
    assert "deb-systemd-helper purge 'ksmctl.service'" in postrm
    for text in (postinst, prerm, postrm):
        # The scripts leave KSM to the daemon (whose stop restores, never unmerges).
        assert "/sys/kernel/mm/ksm" not in text and "unmerge" not in text


def test_venv_carries_every_python_dependency(unpacked):
    site = next(unpacked.glob(VENV + "/lib/python3*/site-packages"))
    dists = {p.name.split("-")[0].lower().replace("_", "-") for p in site.glob("*.dist-info")}
    for dep in ("click", "prometheus-client", "pydantic", "pydantic-core", "numpy", "xxhash", "bcrypt", "ksmctl"):
        assert dep in dists, (dep, sorted(dists))
    assert "pyyaml" not in dists           # Debian's python3-yaml, see debian/rules
    assert not list(site.rglob("__pycache__"))   # compiled by postinst, not shipped
    cfg = (unpacked / VENV / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = true" in cfg


def test_venv_imports_as_installed(unpacked):
    """Every module the daemon, the estimator and basic auth need loads from the packaged
    files themselves (a stripped numpy.libs once made numpy fail to import)."""
    p = subprocess.run(["/usr/bin/python3", str(REPO / "packaging/check-venv.py"),
                        str(unpacked / VENV)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True, timeout=120)
    assert p.returncode == 0, p.stdout
    assert "venv ok" in p.stdout
