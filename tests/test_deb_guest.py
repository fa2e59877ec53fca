"""The Debian package under a real systemd: a Debian 12 guest (systemd as PID 1, its own
kernel with KSM) booted once under QEMU with software emulation; the package installed
with apt/dpkg as an operator would, then every scenario in sequence through the guest's
own systemctl and journalctl. Only the guest's /sys/kernel/mm/ksm is touched.

The scenarios depend on each other's state (installed package, config) and run in file
order; each one puts back what it changed that a later one relies on.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Dict, List

import pytest

from tests.guest import debs
from tests.guest.vm import SHARE_MOUNT, Guest, build_image
from tests.support import need_root, need_tool, wait_for

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parent.parent
KSM = "/sys/kernel/mm/ksm"
UNIT = "ksmctl.service"
DROPIN_DIR = "/etc/systemd/system/ksmctl.service.d"
NEXT_VERSION_SUFFIX = "+test1"
TIMINGS: Dict[str, float] = {}


# -- the session's guest ------------------------------------------------------------------

@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    need_root()
    for tool in ("qemu-system-x86_64", "mmdebstrap", "mkfs.ext4", "dpkg-buildpackage", "dh_virtualenv"):
        need_tool(tool)
    work = tmp_path_factory.mktemp("guest")
    share = work / "share"
    share.mkdir()
    t0 = time.monotonic()
    image = build_image()
    TIMINGS["image_build_or_cache_s"] = time.monotonic() - t0
    deb_n = debs.build()
    TIMINGS["deb_build_s"] = debs.BUILD_SECONDS.get(debs.version(), 0.0)
    shutil.copy(str(deb_n), str(share / deb_n.name))
    # Version N+1 (same tree, higher version) builds while the guest boots and runs.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    next_version = debs.version() + NEXT_VERSION_SUFFIX
    future = pool.submit(debs.build, next_version)
    g = Guest(image, work, share)
    try:
        g.start()
        TIMINGS["boot_s"] = g.wait_booted(timeout=150)
        g.mount_share()
        g.deb_n = SHARE_MOUNT + "/" + deb_n.name
        g.next_version = next_version

        def deb_next() -> str:
            path = future.result(timeout=1800)
            shutil.copy(str(path), str(share / path.name))
            return SHARE_MOUNT + "/" + path.name
        g.deb_next = deb_next
        t0 = time.monotonic()
        yield g
        TIMINGS["scenarios_s"] = time.monotonic() - t0
    finally:
        g.stop()
        pool.shutdown(wait=True)
        out = Path(os.environ.get("KSMCTL_GUEST_TIMINGS", str(work / "timings.json")))
        out.write_text(json.dumps(TIMINGS, indent=2, sort_keys=True) + "\n")
        print("\nguest timings (%s): %s" % (out, json.dumps(TIMINGS, sort_keys=True)))


# -- helpers --------------------------------------------------------------------------------

def show(g: Guest, *props: str) -> Dict[str, str]:
    out = g.run(["systemctl", "show", UNIT] + ["-p" + p for p in props], check=True).out
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def knobs(g: Guest, *names: str) -> Dict[str, int]:
    return {n: int(g.read_file("%s/%s" % (KSM, n)).strip()) for n in names}


def set_knobs(g: Guest, **values: int) -> None:
    # run first to 0 so that the others are accepted in any order
    for name, value in values.items():
        g.sh("echo %d > %s/%s" % (value, KSM, name))


def cursor(g: Guest) -> str:
    out = g.run(["journalctl", "-n", "0", "--show-cursor", "--no-pager"], check=True).out
    m = re.search(r"-- cursor: (\S+)", out)
    assert m, out
    return m.group(1)


def journal(g: Guest, after: str, unit: str = UNIT) -> List[Dict]:
    out = g.run(["journalctl", "-u", unit, "--after-cursor", after, "-o", "json", "--no-pager"],
                check=True).out
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    for e in entries:
        if isinstance(e.get("MESSAGE"), list):   # non-UTF-8 messages come as byte arrays
            e["MESSAGE"] = bytes(e["MESSAGE"]).decode("utf-8", "replace")
    return entries


def messages(entries: List[Dict], pattern: str, daemon_only: bool = True) -> List[Dict]:
    rx = re.compile(pattern)
    return [e for e in entries if rx.search(e.get("MESSAGE", ""))
            and (not daemon_only or e.get("SYSLOG_IDENTIFIER") == "ksmctl")]


def ctl(g: Guest, *verb: str, timeout: float = 150) -> None:
    """systemctl VERB... that must succeed; on failure the unit's journal says why."""
    r = g.run(["systemctl"] + list(verb), timeout=timeout)
    if r.rc != 0:
        logs = g.run(["journalctl", "-u", UNIT, "-n", "40", "--no-pager"]).out
        raise AssertionError("systemctl %s exited %d: %s\n%s" % (" ".join(verb), r.rc, r.err, logs))


def wait_active(g: Guest, timeout: float = 90) -> Dict[str, str]:
    return wait_for(lambda: (lambda s: s if (s["ActiveState"], s["SubState"]) == ("active", "running") else None)(
        show(g, "ActiveState", "SubState", "MainPID", "StatusText", "NRestarts")), timeout,
        "ksmctl.service active (running)", interval=0.5)


def state(g: Guest) -> Dict:
    return json.loads(g.read_file("/run/ksmctl/state.json"))


LAB_POLICY = (REPO / "policies/aggressive.yaml").read_text().replace("name: aggressive", "name: lab") \
    .replace("interval: 5s", "interval: 2s")


def configure(g: Guest, estimate: bool = False) -> None:
    """The scenarios' config, edited in place as an operator would: the lab policy (always
    on), no libvirt in this guest, the periodic estimate on or off."""
    text = g.read_file("/etc/ksmctl/config.yaml")
    text = re.sub(r"(?m)^policy: .*$", "policy: lab", text)
    text = re.sub(r"(?m)^libvirt: .*$", "libvirt: false", text)
    text = re.sub(r"(?m)^(estimate:\n  enabled: )\w+$", r"\g<1>" + ("true" if estimate else "false"), text)
    text = re.sub(r"(?m)^(  rate_mib_s: )\d+$", r"\g<1>" + ("512" if estimate else "64"), text)
    assert ("estimate:\n  enabled: true" in text) == estimate, text
    g.write_file("/etc/ksmctl/config.yaml", text, mode="0640")


# -- the scenarios, in order ----------------------------------------------------------------

def test_boots_quickly(guest):
    assert guest.boot_seconds < 120, "guest boot took %.0fs" % guest.boot_seconds
    assert guest.sh("cat /proc/1/comm").strip() == "systemd"
    assert guest.run(["test", "-d", KSM]).rc == 0


def test_install_replaces_ksmtuned(guest):
    g = guest
    # Before: Debian's ksmtuned manages KSM, and its C helper is root's `ksmctl`.
    assert g.run(["dpkg-query", "-W", "-f", "${Status}", "ksmtuned"]).out == "install ok installed"
    assert g.run(["systemctl", "is-active", "ksmtuned.service", "ksm.service"]).out.split() == ["active", "active"]
    assert g.run(["pgrep", "-f", "/usr/sbin/ksmtuned"]).rc == 0
    assert g.sh("bash -lc 'command -v ksmctl'").strip() == "/usr/sbin/ksmctl"
    t0 = time.monotonic()
    r = g.run("DEBIAN_FRONTEND=noninteractive apt-get install -y %s </dev/null 2>&1" % g.deb_n,
              timeout=600)
    TIMINGS["apt_install_s"] = time.monotonic() - t0
    assert r.rc == 0, r.out
    assert "Removing ksmtuned" in r.out
    # After: one KSM manager, ours; ksmtuned's package (and its ksm.service) is gone.
    assert g.run(["dpkg-query", "-W", "-f", "${Status}", "ksmtuned"]).out != "install ok installed"
    assert g.run(["pgrep", "-f", "ksmtuned"]).rc == 1
    for unit in ("ksmtuned.service", "ksm.service"):
        assert show_other(g, unit)["LoadState"] == "not-found", unit
    s = wait_active(g)
    assert g.run(["systemctl", "is-enabled", UNIT]).out.strip() == "enabled"
    # postinst byte-compiled the venv (the unit's /usr is read-only)
    assert g.sh("find /usr/lib/ksmctl/venv -name '*.pyc' | head -n1").strip()
    assert g.sh("bash -lc 'command -v ksmctl'").strip() == "/usr/bin/ksmctl"
    assert g.sh("bash -lc 'ksmctl --version'").startswith("ksmctl, version ")
    managers = g.sh("ps -eo comm=,args= | grep -E 'ksmtuned|ksmctl .*daemon|momd' | grep -v grep || true")
    assert len(managers.strip().splitlines()) == 1, managers
    assert str(s["MainPID"]) in g.sh("pgrep -f 'ksmctl --config /etc/ksmctl/config.yaml daemon'")


def show_other(g: Guest, unit: str) -> Dict[str, str]:
    out = g.run(["systemctl", "show", unit, "-pLoadState", "-pActiveState"], check=True).out
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_start_reaches_running_after_ready_and_writes_ksm(guest):
    g = guest
    ctl(g, "stop", UNIT)
    g.write_file("/etc/ksmctl/policies/lab.yaml", LAB_POLICY)
    configure(g)
    set_knobs(g, run=0, pages_to_scan=123, sleep_millisecs=45)
    c = g.start_cursor = cursor(g)
    t0 = time.monotonic()
    ctl(g, "start", UNIT)
    TIMINGS["systemctl_start_s"] = time.monotonic() - t0
    # `systemctl start` of a Type=notify unit returns once READY=1 came: already running,
    # with the first tick's STATUS= and its writes in the guest's real sysfs, done under
    # the unit's sandbox (ProtectKernelTunables=yes + ReadWritePaths=/sys/kernel/mm/ksm).
    s = show(g, "ActiveState", "SubState", "StatusText", "MainPID", "Type")
    assert (s["ActiveState"], s["SubState"], s["Type"]) == ("active", "running", "notify"), s
    assert s["StatusText"].startswith("saving ") and "policy lab" in s["StatusText"], s
    now = knobs(g, "run", "pages_to_scan", "sleep_millisecs")
    assert now["run"] == 1 and now["pages_to_scan"] != 123, now
    assert state(g)["pid"] == int(s["MainPID"]) and state(g)["ticks"] >= 1
    # READY=1 comes after the first tick: its change lines precede systemd's "Started".
    entries = journal(g, c)
    started = [i for i, e in enumerate(entries) if e.get("MESSAGE", "").startswith("Started ")
               and e.get("_PID") == "1"]
    first_write = [i for i, e in enumerate(entries) if e.get("SYSLOG_IDENTIFIER") == "ksmctl"
                   and "run 0 -> 1" in e.get("MESSAGE", "")]
    assert started and first_write, [e.get("MESSAGE") for e in entries]
    assert first_write[0] < started[0], [e.get("MESSAGE") for e in entries]
    status = g.run(["systemctl", "status", UNIT, "--no-pager"]).out
    assert re.search(r'Status: "saving .*policy lab', status), status
    # The exporter serves under the sandbox (AF_INET, the syscall filter, MDWE).
    metrics = g.run(["python3", "-c", "import urllib.request; print(urllib.request.urlopen("
                     "'http://127.0.0.1:19839/metrics', timeout=20).read().decode())"], check=True).out
    assert re.search(r"(?m)^ksmctl_\w+", metrics), metrics[:2000]


def test_journal_gets_one_line_per_change_with_priority(guest):
    g = guest
    # The start above (knobs run=0, pages_to_scan=123, sleep_millisecs=45 before it): its
    # first tick changed each of them, one line each, at priority info.
    entries = journal(g, g.start_cursor)
    for knob in ("run", "pages_to_scan", "sleep_millisecs"):
        lines = messages(entries, r"ksmctl\.daemon: %s \d+ -> \d+ \(" % knob)
        first = [e for e in lines if re.search(r"%s (0|123|45) -> " % knob, e["MESSAGE"])]
        assert len(first) == 1, (knob, [e["MESSAGE"] for e in entries])
        for e in lines:
            assert e["PRIORITY"] == "6", e
            assert not e["MESSAGE"].startswith("<"), e     # the prefix was parsed, not logged
    # A warning keeps its level: the daemon's log of a knob someone else changed.
    c = cursor(g)
    g.sh("echo 77 > %s/pages_to_scan" % KSM)
    e = wait_for(lambda: messages(journal(g, c), r"pages_to_scan was changed by another writer"), 30,
                 "the external change logged")
    assert e[0]["PRIORITY"] == "4", e
    wait_for(lambda: knobs(g, "pages_to_scan")["pages_to_scan"] != 77, 20, "pages_to_scan re-asserted")


def test_adaptive_goes_idle_on_a_kernel_without_pages_scanned(guest):
    """The guest's kernel (Debian 12's 6.1) has no pages_scanned: Linux 6.7
    added it. The adaptive strategy judges whole passes there; before, every interval looked
    empty and it scanned at full pace forever. A process with duplicate pages joins, merges,
    and the lab policy (aggressive) drops to its idle scan point."""
    g = guest
    assert g.run(["test", "-e", KSM + "/pages_scanned"]).rc == 1, "the guest kernel counts pages scanned"
    wait_active(g)
    shutil.copy(str(REPO / "tests" / "mergeable.py"), str(g.share / "mergeable.py"))
    before = knobs(g, "pages_sharing")["pages_sharing"]
    # 64 MiB (above the policy's resume_growth of 32 MiB) of 16 contents, held while `sleep` runs.
    g.sh("(sleep 900 | python3 %s/mergeable.py 16384 16) >/tmp/mergeable.out 2>&1 </dev/null &" % SHARE_MOUNT)
    try:
        wait_for(lambda: "ready" in g.read_file("/tmp/mergeable.out"), 60, "the mergeable process", interval=0.5)

        def idle_after_merging():
            d = state(g)["decision"]
            merged = knobs(g, "pages_sharing")["pages_sharing"] - before
            if d["scan_rule"] == "idle" and merged > 15000 and any(
                    "full passes since merging started" in r for r in d["reasons"]):
                return d
            return None
        d = wait_for(idle_after_merging, 240, "idle after the passes (pages_scanned absent)", interval=1)
        assert knobs(g, "pages_to_scan", "sleep_millisecs") == {"pages_to_scan": 1000, "sleep_millisecs": 200}
        assert any("new merges per 1000 pages" in r for r in d["reasons"]), d
    finally:
        g.sh("pkill -f '[m]ergeable.py'; pkill -f '[s]leep 900'; true")


def test_reload_keeps_old_policy_on_error_and_switches_on_good_one(guest):
    g = guest
    s0 = wait_active(g)
    before = state(g)["policy"]
    g.write_file("/etc/ksmctl/policies/lab.yaml", LAB_POLICY + "bogus_key: 1\n")
    c = cursor(g)
    r = g.run(["systemctl", "reload", UNIT], timeout=90)
    # The reload job fails (ExecReload exits 2) and says where to look; the unit runs on.
    assert r.rc != 0 and "ksmctl.service" in r.err, (r.rc, r.err)
    # journald reads the daemon's stderr stream on its own schedule: wait for the line.
    rejected = wait_for(lambda: messages(journal(g, c), r"reload rejected, keeping policy lab"), 30,
                        "the daemon's 'reload rejected' line in the journal", interval=0.5)
    assert rejected[0]["PRIORITY"] == "3" and "bogus_key" in rejected[0]["MESSAGE"], rejected[0]
    s = wait_active(g)
    assert s["MainPID"] == s0["MainPID"]
    assert state(g)["policy"]["sha256"] == before["sha256"]
    # A good policy: once `systemctl reload` returns, the daemon already runs it (read at
    # once, no wait: ExecReload waited for the daemon's own account of the reload).
    good = LAB_POLICY.replace("name: lab", "name: lab2")
    g.write_file("/etc/ksmctl/policies/lab.yaml", good)
    c = cursor(g)
    g.run(["systemctl", "reload", UNIT], check=True, timeout=90)
    after = state(g)
    assert after["policy"]["name"] == "lab2" and after["reload"]["ok"] is True, after.get("reload")
    wait_for(lambda: messages(journal(g, c), r"reloaded: policy lab2"), 30, "the 'reloaded' line in the journal", interval=0.5)
    assert wait_active(g)["MainPID"] == s0["MainPID"]
    g.write_file("/etc/ksmctl/policies/lab.yaml", LAB_POLICY)
    g.run(["systemctl", "reload", UNIT], check=True, timeout=90)
    assert state(g)["policy"]["name"] == "lab"


def test_watchdog_kills_and_restarts_a_stuck_daemon(guest):
    g = guest
    g.write_file(DROPIN_DIR + "/watchdog.conf", "[Service]\nWatchdogSec=6s\nRestartSec=1s\n")
    ctl(g, "daemon-reload")
    ctl(g, "restart", UNIT)
    s0 = wait_active(g)
    pid = s0["MainPID"]
    c = cursor(g)
    g.sh("kill -STOP %s" % pid)
    s1 = wait_for(lambda: (lambda s: s if s["MainPID"] not in ("0", pid) and s["ActiveState"] == "active"
                           and s["SubState"] == "running" else None)(
        show(g, "ActiveState", "SubState", "MainPID", "NRestarts", "StatusText")),
        120, "a new ksmctl main process after the watchdog", interval=0.5)
    assert int(s1["NRestarts"]) == int(s0["NRestarts"]) + 1, (s0, s1)
    entries = journal(g, c)
    assert any("Watchdog timeout" in e.get("MESSAGE", "") for e in entries), [e.get("MESSAGE") for e in entries]
    assert g.run(["kill", "-0", pid]).rc != 0          # the stuck one is gone
    # KSM was left sane: no unmerge, and the new daemon is managing it again.
    k = knobs(g, "run", "pages_to_scan", "sleep_millisecs")
    assert k["run"] == 1 and k["pages_to_scan"] >= 1000, k
    assert s1["StatusText"].startswith("saving ")
    g.sh("rm -f %s/watchdog.conf && systemctl daemon-reload" % DROPIN_DIR)


def test_stop_restores_knobs_and_compat_start_stop(guest):
    g = guest
    ctl(g, "stop", UNIT)
    set_knobs(g, run=0, pages_to_scan=123, sleep_millisecs=45)
    ctl(g, "start", UNIT)
    assert knobs(g, "run")["run"] == 1
    c = cursor(g)
    ctl(g, "stop", UNIT)
    assert knobs(g, "run", "pages_to_scan", "sleep_millisecs") == {"run": 0, "pages_to_scan": 123,
                                                                   "sleep_millisecs": 45}
    assert messages(journal(g, c), r"restored run 1 -> 0")
    assert show(g, "ActiveState")["ActiveState"] == "inactive"
    # ksmtuned's helper, `ksmctl start|stop`, as its ksm.service used it.
    assert g.run(["ksmctl", "start"], check=True).out.strip() == "run: 0 -> 1"
    assert knobs(g, "run")["run"] == 1
    g.run(["ksmctl", "stop"], check=True)
    assert knobs(g, "run")["run"] == 0


def test_refusal_exits_4_without_restart_loop(guest):
    g = guest
    # Another KSM writer: a process that runs a script named ksmtuned, as Debian's does.
    g.write_file("/usr/local/sbin/ksmtuned", "#!/bin/bash\nwhile :; do sleep 1; done\n", mode="0755")
    g.sh("systemd-run --unit=other-writer /usr/local/sbin/ksmtuned")
    c = cursor(g)
    try:
        r = g.run(["systemctl", "start", UNIT], timeout=150)
        assert r.rc != 0
        s = show(g, "ActiveState", "Result", "ExecMainStatus", "NRestarts")
        assert (s["ActiveState"], s["Result"], s["ExecMainStatus"]) == ("failed", "exit-code", "4"), s
        refused = messages(journal(g, c), r"refusing to start: another KSM writer")
        assert refused and refused[0]["PRIORITY"] == "3"
        # RestartPreventExitStatus=4: over twice RestartSec=5s, no restart is attempted.
        end = time.monotonic() + 12
        while time.monotonic() < end:   # an observation window, not a wait for a condition
            now = show(g, "ActiveState", "NRestarts")
            assert now == {"ActiveState": "failed", "NRestarts": s["NRestarts"]}, now
            time.sleep(1)
    finally:
        g.run("systemctl stop other-writer; rm -f /usr/local/sbin/ksmtuned; systemctl reset-failed ksmctl")
    ctl(g, "start", UNIT)
    wait_active(g)


def test_security_exposure_as_the_readme_claims(guest):
    out = guest.run(["systemd-analyze", "security", UNIT, "--no-pager"], check=True).out
    m = re.search(r"Overall exposure level for ksmctl\.service: (\d+\.\d+)", out)
    assert m, out
    readme = (REPO / "README.md").read_text()
    claimed = re.search(r"rated \*\*(\d+\.\d+)\*\*", readme).group(1)
    assert m.group(1) == claimed, (m.group(1), claimed)
    assert "exposure level %s" % claimed in (REPO / "docs/service.md").read_text()


def test_unprivileged_status_reads_the_daemon(guest):
    g = guest
    s = wait_active(g)
    r = g.run(["runuser", "-u", "nobody", "--", "ksmctl", "status", "--json", "--cpu-window", "0"])
    assert r.rc == 0, r.err
    d = json.loads(r.out)
    assert d["daemon"]["pid"] == int(s["MainPID"]) and d["daemon"]["policy"]["name"] == "lab"
    human = g.run(["runuser", "-u", "nobody", "--", "ksmctl", "status", "--cpu-window", "0"], check=True).out
    assert re.search(r"Daemon\s+running \(pid %s\), policy lab" % s["MainPID"], human), human


MERGEABLE = r"""
import mmap, time
n = 16384                                   # 64 MiB of 4 KiB pages, 7 distinct contents
m = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(n):
    m[i * 4096:(i + 1) * 4096] = bytes([i % 7 + 1]) * 4096
m.madvise(mmap.MADV_MERGEABLE)
print("ready", flush=True)
time.sleep(3600)
"""


def test_estimate_dropin_scans_a_guest_process(guest):
    g = guest
    g.write_file("/root/mergeable.py", MERGEABLE)
    g.sh("systemd-run --unit=mergeable /usr/bin/python3 /root/mergeable.py")
    try:
        wait_for(lambda: "ready" in g.run(["journalctl", "-u", "mergeable", "--no-pager", "-o", "cat"]).out,
                 60, "the mergeable process")
        configure(g, estimate=True)
        # Without the drop-in the unit's bounding set lacks the capabilities: the scan fails, says so.
        c = cursor(g)
        ctl(g, "restart", UNIT)
        failed = wait_for(lambda: messages(journal(g, c), r"periodic estimate failed"), 120,
                          "the estimate failing without the drop-in")
        assert failed[0]["PRIORITY"] == "3"
        # With docs/estimate.md's drop-in: a real scan of the guest process.
        dropin = re.search(r"# systemctl edit ksmctl\n(\[Service\]\nCapabilityBoundingSet=[^\n]+)\n",
                           (REPO / "docs/estimate.md").read_text()).group(1)
        g.write_file(DROPIN_DIR + "/estimate.conf", dropin + "\n")
        c = cursor(g)
        ctl(g, "daemon-reload")
        ctl(g, "restart", UNIT)
        done = wait_for(lambda: messages(journal(g, c), r"estimate: \d+ processes, achievable \d+ MiB"),
                        180, "a finished estimate")
        m = re.search(r"estimate: (\d+) processes, achievable (\d+) MiB", done[0]["MESSAGE"])
        assert int(m.group(1)) >= 1 and int(m.group(2)) >= 60, done[0]["MESSAGE"]
        assert not messages(journal(g, c), r"periodic estimate failed")
        est = wait_for(lambda: (state(g).get("readings") or {}).get("estimate"), 30, "estimate in the state file")
        assert est["achievable"] >= 60 << 20, est
    finally:
        g.run("systemctl stop mergeable; rm -f %s/estimate.conf; systemctl daemon-reload" % DROPIN_DIR)
        configure(g)
        g.run(["systemctl", "restart", UNIT], timeout=150)
    wait_active(g)


def test_upgrade_keeps_edited_config_and_restarts(guest):
    g = guest
    deb_next = g.deb_next()
    g.sh("echo '# edited by the operator before the upgrade' >> /etc/ksmctl/config.yaml")
    edited = g.read_file("/etc/ksmctl/config.yaml")
    s0 = wait_active(g)
    t0 = time.monotonic()
    r = g.run("DEBIAN_FRONTEND=noninteractive dpkg -i %s </dev/null 2>&1" % deb_next, timeout=600)
    TIMINGS["dpkg_upgrade_s"] = time.monotonic() - t0
    assert r.rc == 0, r.out
    assert g.run(["dpkg-query", "-W", "-f", "${Version}", "ksmctl"]).out == g.next_version
    assert g.read_file("/etc/ksmctl/config.yaml") == edited
    assert g.run(["test", "-e", "/etc/ksmctl/config.yaml.dpkg-new"]).rc != 0
    s1 = wait_active(g)
    assert s1["MainPID"] != s0["MainPID"], (s0, s1)
    assert state(g)["policy"]["name"] == "lab"       # running on the kept config


def test_remove_keeps_config_purge_removes_it(guest):
    g = guest
    ctl(g, "stop", UNIT)
    set_knobs(g, run=0, pages_to_scan=321, sleep_millisecs=54)
    ctl(g, "start", UNIT)
    assert knobs(g, "run")["run"] == 1
    edited = g.read_file("/etc/ksmctl/config.yaml")
    r = g.run("dpkg -r ksmctl </dev/null 2>&1", timeout=300)
    assert r.rc == 0, r.out
    # stopped on remove, which put the knobs back (run=0: stopped, merged pages kept)
    assert knobs(g, "run", "pages_to_scan", "sleep_millisecs") == {"run": 0, "pages_to_scan": 321,
                                                                   "sleep_millisecs": 54}
    assert g.run(["pgrep", "-f", "ksmctl.*daemon"]).rc == 1
    assert g.run(["test", "-e", "/usr/bin/ksmctl"]).rc != 0
    assert g.run(["test", "-e", "/usr/lib/ksmctl"]).rc != 0     # no byte-code left behind
    assert g.read_file("/etc/ksmctl/config.yaml") == edited
    r = g.run("dpkg -P ksmctl </dev/null 2>&1", timeout=300)
    assert r.rc == 0, r.out
    assert g.run(["test", "-e", "/etc/ksmctl/config.yaml"]).rc != 0
    assert g.run(["test", "-e", "/var/lib/ksmctl"]).rc != 0
