"""`ksmctl vms`: from a running daemon's state file, and collected live (libvirt's test
driver plus generated /proc and /sys trees)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from click.testing import CliRunner

from ksmctl.cli import cli
from ksmctl.readings import KsmStat, VmReading, vms_table
from tests.fixtures import make_sys
from tests.lab import proctree
from tests.support import need

try:
    import libvirt  # noqa: F401
    HAVE_LIBVIRT = True
except ImportError:  # pragma: no cover
    HAVE_LIBVIRT = False

KSM = {"pages_sharing": "3000", "pages_shared": "1000", "ksm_zero_pages": "0"}


@pytest.fixture
def host(tmp_path):
    """Three guests (vm0000..vm0002) behind a test-driver URI, their /proc and pid files,
    a /sys with 3000 sharing / 1000 shared pages, and a config pointing at all of it."""
    need(HAVE_LIBVIRT, "libvirt-python is not installed")
    uri, proc_root, run_root, guests = proctree.host(tmp_path, 3, others=2)
    sys_root = make_sys(tmp_path / "sys", KSM)
    config = tmp_path / "ksmctl.yaml"
    config.write_text("libvirt_uri: %s\nrun_root: %s\nstate_file: %s\n"
                      % (uri, run_root, tmp_path / "state.json"))
    return {"uri": uri, "proc": str(proc_root), "sys": str(sys_root), "config": str(config),
            "state": tmp_path / "state.json", "guests": guests}


def invoke(host, *args):
    r = CliRunner().invoke(cli, ["--config", host["config"], "--proc-root", host["proc"],
                                 "--sys-root", host["sys"], "vms"] + list(args))
    return r


def test_live_table(host):
    r = invoke(host)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["NAME", "UUID", "STATE", "MEMORY", "MERGING", "SAVED", "SHARE", "EXCLUDED", "MERGE"]
    assert [l.split()[-1] for l in lines[1:4]] == ["allow:qemu_cmdline"] * 3  # each guest's setting and source
    # Default sort: most saved first (vm0002 has the most merging pages).
    assert [l.split()[0] for l in lines[1:4]] == ["vm0002", "vm0001", "vm0000"]
    assert "source: libvirt" in lines[-1] and "3 VMs" in lines[-1]


def test_live_json_attribution(host):
    r = invoke(host, "--json", "--sort", "name")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["source"] == "libvirt" and doc["host_saved_bytes"] == 3000 * 4096
    assert [v["name"] for v in doc["vms"]] == ["vm0000", "vm0001", "vm0002"]
    v0 = doc["vms"][0]
    assert v0["merging_pages"] == 1000 and v0["pid"] == 1000 and v0["excluded"] is False
    assert (v0["state"], v0["source"]) == ("running", "libvirt")  # enums print as their values
    # 3000 / (3000 + 1000) of a page per merging page
    assert v0["saved_bytes"] == 750 * 4096 and v0["share"] == pytest.approx(750 / 3000)


def test_sort_reverse(host):
    r = invoke(host, "--json", "--sort", "merging", "--reverse")
    assert [v["name"] for v in json.loads(r.output)["vms"]] == ["vm0000", "vm0001", "vm0002"]


@pytest.mark.parametrize("form", ["table", "dicts"])
def test_from_running_daemon_state_file(host, form):
    """The daemon writes VMs as a table (vms_table); a list of dicts is read too."""
    vms = [VmReading(uuid="u-%d" % i, name="daemon-vm%d" % i, pid=100 + i, balloon_current=1 << 30,
                     ksm=KsmStat(merging_pages=100 * i, zero_pages=0), excluded=(i == 0))
           for i in range(3)]
    state = {"pid": os.getpid(), "updated": 0,
             "readings": {"vms": vms_table(vms) if form == "table" else [asdict(v) for v in vms],
                          "ksm": {"values": {"pages_sharing": 200, "pages_shared": 100}, "page_size": 4096}}}
    host["state"].write_text(json.dumps(state))
    r = invoke(host, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["source"].startswith("daemon")
    assert [v["name"] for v in doc["vms"]] == ["daemon-vm2", "daemon-vm1", "daemon-vm0"]
    assert doc["vms"][-1]["excluded"] is True
    table = invoke(host)
    assert "excluded" in table.output.splitlines()[3] and "1.0 GiB" in table.output
    # --live ignores the daemon.
    assert json.loads(invoke(host, "--json", "--live").output)["source"] == "libvirt"


def test_state_file_with_unknown_state_and_garbage_readings(host):
    row = {"uuid": "u-1", "name": "odd", "state": "melting", "source": "proc"}
    host["state"].write_text(json.dumps({"pid": os.getpid(), "updated": 0,
                                         "readings": {"vms": [row], "ksm": None}}))
    doc = json.loads(invoke(host, "--json").output)
    assert [(v["name"], v["state"], v["source"]) for v in doc["vms"]] == [("odd", "unknown", "proc")]
    host["state"].write_text(json.dumps({"pid": os.getpid(), "readings": "garbage"}))
    r = invoke(host, "--json")
    # a state file of the wrong shape is bad input, named, never silently replaced (#11)
    assert r.exit_code == 2 and str(host["state"]) in r.output and "readings" in r.output, r.output


def test_state_of_a_dead_daemon_is_ignored(host):
    host["state"].write_text(json.dumps({"pid": 2 ** 22 + 12345, "readings": {"vms": []}}))
    assert json.loads(invoke(host, "--json").output)["source"] == "libvirt"


def test_unreachable_libvirt_lists_from_proc(host):
    r = invoke(host, "--json", "--uri", "qemu+unix:///system?socket=/nonexistent/sock")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["source"].startswith("proc (cannot connect to libvirt")
    assert {v["name"] for v in doc["vms"]} == {"vm0000", "vm0001", "vm0002"}


def test_bad_sort_key_is_a_usage_error(host):
    r = invoke(host, "--sort", "colour")
    assert r.exit_code == 2 and "colour" in r.output


def test_real_subprocess(host):
    exe = Path(sys.executable).parent / "ksmctl"
    out = subprocess.run([str(exe), "--config", host["config"], "--proc-root", host["proc"],
                          "--sys-root", host["sys"], "vms"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "vm0001" in out.stdout and "Traceback" not in out.stderr and out.stderr == ""
