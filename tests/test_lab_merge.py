"""Per-VM merge control against real libvirtd, real QEMU guests and the real ksmd.

Needs root, libvirt, QEMU and busybox-static (tests/lab). The session's lab_guests are
reused (three sharing guests, one nosharepages); one more guest starts for the policy
test. Every check of a guest leaving KSM also checks its QEMU pid did not change: merge
control must never restart a guest."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

import pytest

from ksmctl.guests.audit import RESIDUAL_PAGES
from tests.lab.lab import URI, Guest, Lab, kill_pid, read_pidfile
from tests.support import wait_for

from .test_lab_vms import MIN_MERGED, PROC, merging, merging_fast, sharing

pytestmark = [pytest.mark.lab, pytest.mark.kernel]

REPO = Path(__file__).resolve().parent.parent


def qom_merge(lab: Lab, g: Guest, value: Optional[bool] = None) -> Optional[bool]:
    """Read (or, given value, set: behind ksmctl's back) pc.ram's merge through QMP."""
    import libvirt_qemu
    dom = lab.conn().lookupByUUIDString(g.uuid)
    if value is not None:
        libvirt_qemu.qemuMonitorCommand(dom, json.dumps({"execute": "qom-set", "arguments": {
            "path": "/objects/pc.ram", "property": "merge", "value": value}}), 0)
    got = libvirt_qemu.qemuMonitorCommand(dom, json.dumps({"execute": "qom-get", "arguments": {
        "path": "/objects/pc.ram", "property": "merge"}}), 0)
    return json.loads(got)["return"]


def pid_of(lab: Lab, g: Guest) -> Optional[int]:
    return read_pidfile(lab.run_root / "libvirt/qemu" / (g.name + ".pid"))




@pytest.fixture(scope="module")
def merged(lab_guests):
    with merging_fast(lab_guests):
        yield lab_guests


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("libvirt_uri: %s\nstate_dir: %s\nstate_file: %s\nexporter: {enabled: false}\n"
                    % (URI, tmp_path / "lib", tmp_path / "state.json"))
    return path


def ksmctl(config: Path, *args: str, proc_root: Optional[str] = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("KSMCTL_CONFIG", None)
    pre = ["--proc-root", proc_root] if proc_root else []
    return subprocess.run([sys.executable, "-m", "ksmctl", "--config", str(config)] + pre + list(args),
                          env=env, capture_output=True, text=True, timeout=120)


def vms_json(config: Path) -> Dict[str, dict]:
    r = ksmctl(config, "vms", "--live", "--json")
    assert r.returncode == 0, r.stderr
    return {v["name"]: v for v in json.loads(r.stdout)["vms"]}


def test_merge_off_then_on_without_restarting_the_guest(merged, lab, config):
    g1, g2, g3 = sharing(merged)[:3]
    pid = pid_of(lab, g2)
    try:
        r = ksmctl(config, "merge", "off", g2.name, "--dry-run")
        assert r.returncode == 0 and "would set merge off on pc.ram" in r.stdout, r.stdout + r.stderr
        assert qom_merge(lab, g2) is True  # a dry run changes nothing
        r = ksmctl(config, "merge", "off", g2.uuid)
        assert r.returncode == 0, r.stderr
        assert "merge off on pc.ram" in r.stdout and "unmerges up to" in r.stdout
        wait_for(lambda: merging(pid) <= RESIDUAL_PAGES, 30, "guest2's merged pages to be broken apart", 0.2)
        assert pid_of(lab, g2) == pid and PROC.cmdline(pid) is not None  # the same QEMU, still running
        assert merging(g1.pid) >= MIN_MERGED or merging(g3.pid) > 0, "the other guests stopped merging"
        assert merging(g1.pid) > RESIDUAL_PAGES and merging(g3.pid) > RESIDUAL_PAGES
        row = vms_json(config)[g2.name]
        assert row["merge"]["merge"] == "deny" and row["merge"]["source"] == "runtime"
        assert vms_json(config)[g1.name]["merge"]["source"] == "qemu_cmdline"
        nosh = [g for g in merged if g.nosharepages][0]
        assert vms_json(config)[nosh.name]["merge"] == {**vms_json(config)[nosh.name]["merge"], "merge": "deny",
                                                        "source": "domain_xml"}
    finally:
        r = ksmctl(config, "merge", "on", g2.name)
    assert r.returncode == 0 and "merge on on pc.ram" in r.stdout, r.stderr
    assert qom_merge(lab, g2) is True
    wait_for(lambda: merging(pid) >= MIN_MERGED, 120, "guest2 to merge again", 0.5)
    assert pid_of(lab, g2) == pid


def test_guard_refuses_when_the_host_cannot_absorb(merged, lab, config, tmp_path):
    """Only MemAvailable is simulated (the collector's injected /proc root); the guests,
    their QEMU processes and ksm_stat are the real ones."""
    g1 = sharing(merged)[0]
    root = tmp_path / "proc"
    root.mkdir()
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    low = "\n".join("MemAvailable:   300000 kB" if l.startswith("MemAvailable:") else l for l in meminfo) + "\n"
    (root / "meminfo").write_text(low)
    for pid in PROC.pids():
        os.symlink("/proc/%d" % pid, str(root / str(pid)))
    before = merging(g1.pid)
    assert before > RESIDUAL_PAGES
    r = ksmctl(config, "merge", "off", g1.name, proc_root=str(root))
    assert r.returncode == 4, r.stdout + r.stderr
    assert "refusing merge off" in r.stderr and "MemAvailable is 293.0 MiB" in r.stderr
    assert qom_merge(lab, g1) is True and merging(g1.pid) > RESIDUAL_PAGES
    r = ksmctl(config, "merge", "off", g1.name, "--dry-run", proc_root=str(root))
    assert r.returncode == 0 and "the guard would refuse" in r.stdout, r.stdout + r.stderr


def test_unknown_guest_is_named(merged, config):
    r = ksmctl(config, "merge", "off", "no-such-guest")
    assert r.returncode == 2 and "no running guest named 'no-such-guest'" in r.stderr, r.stderr


def _state(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _merge_rows(path: Path) -> Dict[str, dict]:
    st = _state(path) or {}
    return {g["name"]: g for g in (st.get("merge") or {}).get("guests", [])}


def test_policy_deny_on_start_on_new_guests_audit_and_restore(merged, lab, tmp_path):
    g1, g2, g3 = sharing(merged)[:3]
    pid3 = pid_of(lab, g3)
    glob = "%s-*-late" % lab.prefix  # the guest started below, whatever its number

    policy = tmp_path / "labmerge.yaml"
    policy.write_text("name: labmerge\ninterval: 1s\nrun: {mode: always}\n"
                      "scan:\n  strategy: step\n  pages_to_scan: {initial: 5000, min: 5000, max: 5000}\n"
                      "  sleep_millisecs: {base: 10, floor: 10}\n"
                      "vms:\n  rules:\n    - match: {name: '%s'}\n      merge: deny\n"
                      "    - match: {name: '%s'}\n      merge: deny\n" % (g3.name, glob))
    state = tmp_path / "state.json"
    config = tmp_path / "config.yaml"
    config.write_text("libvirt_uri: %s\nstate_dir: %s\nstate_file: %s\nexporter: {enabled: false}\n"
                      "policy: %s\nrestore_on_exit: true\n" % (URI, tmp_path / "lib", state, policy))
    log = open(str(tmp_path / "daemon.log"), "w")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen([sys.executable, "-m", "ksmctl", "--config", str(config), "daemon", "--force"],
                         env=env, stdout=log, stderr=subprocess.STDOUT)
    late = None
    try:
        wait_for(lambda: merging(pid3) <= RESIDUAL_PAGES, 60, "the daemon to take guest3 out of KSM", 0.2)
        assert pid_of(lab, g3) == pid3 and qom_merge(lab, g3) is False
        assert merging(g1.pid) > RESIDUAL_PAGES and merging(g2.pid) > RESIDUAL_PAGES
        rows = wait_for(lambda: _merge_rows(state).get(g3.name) and _merge_rows(state), 30, "merge rows")
        assert rows[g3.name]["source"] == "policy" and rows[g3.name]["why"] == "vms.rules[0]"
        assert rows[g1.name]["merge"] == "allow" and rows[g1.name]["source"] == "qemu_cmdline"
        runtime = json.loads((tmp_path / "lib" / "merge-runtime.json").read_text())["guests"]
        assert runtime[g3.uuid]["by"] == "policy" and runtime[g3.uuid]["original"] == {"pc.ram": True}

        late = lab.start_guest(tag="late")
        lab.wait_ready([late])
        wait_for(lambda: qom_merge(lab, late) is False, 60, "the daemon to deny the new guest", 0.5)
        wait_for(lambda: _merge_rows(state).get(late.name, {}).get("source") == "policy", 30, "late guest's row")
        assert merging(pid_of(lab, late)) <= RESIDUAL_PAGES

        # Behind ksmctl's back: the audit counts it, and the deny is put back.
        assert (_state(state) or {})["merge"]["violations_total"] == 0
        qom_merge(lab, g3, True)
        wait_for(lambda: ((_state(state) or {}).get("merge") or {}).get("violations_total", 0) >= 1, 30,
                 "the audit to count the violation")
        wait_for(lambda: qom_merge(lab, g3) is False, 30, "the daemon to re-deny guest3")
        assert "merge violation: guest %s" % g3.name in (tmp_path / "daemon.log").read_text()
        assert pid_of(lab, g3) == pid3
    finally:
        kill_pid(p.pid)
        log.close()
        if late is not None:   # also when the test failed: no stray guest for the next tests
            lab.destroy_guest(late)
    # restore_on_exit: what the policy changed is undone; the runtime file forgets it.
    assert qom_merge(lab, g3) is True, (tmp_path / "daemon.log").read_text()[-3000:]
    assert json.loads((tmp_path / "lib" / "merge-runtime.json").read_text())["guests"] == {}
    wait_for(lambda: merging(pid3) >= MIN_MERGED, 120, "guest3 to merge again after the daemon stopped", 0.5)
