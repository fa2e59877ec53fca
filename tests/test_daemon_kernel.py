"""The daemon on this machine's real KSM: it turns KSM on for a policy whose start
condition the host meets, merges real MADV_MERGEABLE memory, stops when a reloaded
policy says so, rejects an invalid reload, notices other writers, and restores the
knobs on exit."""
from __future__ import annotations

import signal

from ksmctl.kernel.sysfs import KsmSysfs

from .daemon_proc import ALWAYS_ON_POLICY, STOP_POLICY, DaemonProc, adaptive_on_policy, wait_ticks
from .ksmlock import ksm_exclusive
from .mergeable import Holder
from .support import need_root, wait_for


def test_daemon_merges_stops_on_reload_and_restores(tmp_path):
    need_root()
    sysfs = KsmSysfs()
    with ksm_exclusive() as found, Holder(pages=20000, distinct=7):
        assert found["run"] == "0" or found["run"] == "1"
        with DaemonProc(tmp_path, ALWAYS_ON_POLICY) as d:
            wait_for(lambda: sysfs.read().get("run") == 1, 20, "the daemon to start KSM")
            assert sysfs.read().get("pages_to_scan") == 5000
            wait_for(lambda: sysfs.read().get("pages_sharing") >= 19000, 60, "pages_sharing to grow")
            s = wait_ticks(d, 1)
            assert s["decision"]["run_rule"] in ("start", "keep_running")
            assert s["policy"]["name"] == "test-on"

            # Another writer changes pages_to_scan: logged, reported, re-asserted.
            with open(sysfs.path("pages_to_scan"), "w") as f:
                f.write("123")
            wait_for(lambda: "pages_to_scan was changed by another writer" in d.log_text(), 20, "drift log")
            wait_for(lambda: sysfs.read().get("pages_to_scan") == 5000, 20, "re-assert")

            # An invalid policy on reload is rejected; the old one keeps running.
            good_hash = d.state()["policy"]["sha256"]
            d.policy.write_text("name: broken\nscan: {cpu_budget: 500}\n")
            d.signal(signal.SIGHUP)
            wait_for(lambda: "reload rejected" in d.log_text(), 20, "reload rejection")
            assert "scan.cpu_budget: 500 is not allowed" in d.log_text()
            s = wait_ticks(d, 2)
            assert s["policy"]["sha256"] == good_hash and d.alive()

            # A valid policy whose stop condition holds: KSM stops, merged pages stay.
            d.policy.write_text(STOP_POLICY)
            d.signal(signal.SIGHUP)
            wait_for(lambda: sysfs.read().get("run") == 0, 20, "the daemon to stop KSM")
            s = wait_ticks(d, 1)
            assert s["policy"]["name"] == "test-stop" and s["decision"]["run_rule"] in ("stop", "stay_stopped")
            assert sysfs.read().get("pages_sharing") > 0
            assert d.stop() == 0
        after = sysfs.read()
        assert str(after.get("pages_to_scan")) == found["pages_to_scan"]
        assert str(after.get("sleep_millisecs")) == found["sleep_millisecs"]
        assert not d.state_file.exists()


def test_dry_run_decides_but_never_writes(tmp_path):
    need_root()
    sysfs = KsmSysfs()
    with ksm_exclusive():
        before = sysfs.read().values
        with DaemonProc(tmp_path, ALWAYS_ON_POLICY, args=["--dry-run"]) as d:
            s = wait_ticks(d, 3)
            assert s["dry_run"] and s["decision"]["targets"]["run"] == 1
            assert "dry run: would set" in d.log_text()
            now = sysfs.read().values
            assert {k: now[k] for k in ("run", "pages_to_scan", "sleep_millisecs")} == \
                   {k: before[k] for k in ("run", "pages_to_scan", "sleep_millisecs")}


def test_periodic_estimate_feeds_state_and_policy_signal(tmp_path):
    """With estimate.enabled the daemon scans mergeable memory in the background and
    publishes achievable/achieved; the policy sees it as merge_potential."""
    need_root()
    policy = ALWAYS_ON_POLICY.replace(
        "start_when: [{signal: memory_available, below: 100%}]",
        "start_when: [{signal: merge_potential, above: 1MiB}]").replace(
        "stop_when: [{signal: memory_available, above: 100%}]",
        "stop_when: [{signal: merge_potential, below: 1MiB}]")
    sysfs = KsmSysfs()
    with ksm_exclusive(), Holder(pages=3000, distinct=3):
        with DaemonProc(tmp_path, policy, extra_config={"estimate": {"enabled": True, "interval": "1h",
                                                                     "rate_mib_s": 2000}}) as d:
            def estimated():
                assert d.alive(), "daemon exited:\n" + d.log_text()
                s = d.state() or {}
                return s if (s.get("readings") or {}).get("estimate") else None
            s = wait_for(estimated, 120, "the first estimate")
            est = s["readings"]["estimate"]
            # Our holder alone offers 2997 pages (3000 pages, 3 contents); other mergeable
            # processes on the host (lab guests) can only add to it.
            assert est["achievable"] >= 2997 * 4096 and est["scanned"] >= 3000 * 4096
            wait_for(lambda: sysfs.read().get("run") == 1, 30, "merge_potential to start KSM")
            assert "merge_potential" in d.state()["decision"]["reasons"][0]


SWEEP_POLICY = adaptive_on_policy("test-sweep", "target_pass_seconds: 0.5, sweep_cpu: 0.5")


def test_an_idle_daemon_sweeps_with_one_full_pass_at_the_merging_pace(tmp_path):
    """sweep_cpu 0.5: a sweep comes once the daemon has idled for twice what a pass cost."""
    need_root()
    sysfs = KsmSysfs()
    with ksm_exclusive(), Holder(pages=20000, distinct=7):
        with DaemonProc(tmp_path, SWEEP_POLICY) as d:
            wait_for(lambda: sysfs.read().get("pages_sharing", 0) >= 19000, 60, "the passes to merge")
            wait_for(lambda: (d.state() or {}).get("decision", {}).get("scan_rule") == "idle", 60, "idle")
            idle_scans = sysfs.read().get("full_scans")
            wait_for(lambda: (d.state() or {}).get("decision", {}).get("scan_rule") == "sweep", 60, "a sweep")
            s = d.state()
            assert "sweep: idle for" in " ".join(s["decision"]["reasons"]) and "(sweep_cpu)" in d.log_text()
            assert sysfs.read().get("pages_to_scan") > 100   # the merging pace, not the idle scan's
            # The rest of the pass ksmd was in, and one whole pass, before it idles again.
            wait_for(lambda: (d.state() or {}).get("decision", {}).get("scan_rule") == "idle", 60, "idle again")
            assert sysfs.read().get("full_scans") >= idle_scans + 2
            assert sysfs.read().get("pages_sharing", 0) >= 19000
