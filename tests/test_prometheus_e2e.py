"""End to end with a real Prometheus (Debian's package) scraping a real daemon that drives
this machine's real KSM.

Two stand-in guests (processes whose argv[0] is qemu-system-x86_64, each with 80 MB of
mergeable duplicate memory) give per-VM series. After a few scrapes:
- every dashboard query (variables at "All") returns at least one series;
- every recording rule returns data, and so does every operand of every alert and
  annotation condition (the conditions themselves are rightly empty on a healthy host);
- the dashboard's variables resolve;
- the saved-bytes series in Prometheus equals (pages_sharing + ksm_zero_pages) x page
  size read from sysfs, compared while KSM is settled.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import urllib.parse
import urllib.request
import uuid

import pytest
import yaml

from .dashboard_exprs import RULES, dashboard, dashboard_exprs, operands, rule_exprs, substitute
from .ksmlock import KSM, ksm_exclusive
from .support import need, need_root, need_tool, terminate, wait_for

pytestmark = [pytest.mark.prometheus, pytest.mark.kernel, pytest.mark.timeout(300)]

PAGE = os.sysconf("SC_PAGE_SIZE")
PAGES = 20000
GUEST = textwrap.dedent("""
    import mmap, sys
    n = %d
    m = mmap.mmap(-1, n * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(n):
        m[i * mmap.PAGESIZE:(i + 1) * mmap.PAGESIZE] = bytes([1 + i %% 7]) * mmap.PAGESIZE
    m.madvise(mmap.MADV_MERGEABLE)
    print("ready", flush=True)
    sys.stdin.read()
""") % PAGES
POLICY = """name: e2e-prometheus
interval: 1s
run:
  mode: always
scan:
  strategy: step
  pages_to_scan: {initial: 5000, min: 5000, max: 5000}
  sleep_millisecs: {base: 10, floor: 10}
  cpu_budget: 100
"""
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sysfs_saved() -> int:
    read = lambda n: int((KSM / n).read_text()) if (KSM / n).exists() else 0  # noqa: E731
    return (read("pages_sharing") + read("ksm_zero_pages")) * PAGE


class Prom:
    def __init__(self, port: int) -> None:
        self.base = "http://127.0.0.1:%d" % port

    def get(self, path: str, **params) -> dict:
        url = self.base + path + ("?" + urllib.parse.urlencode(params, doseq=True) if params else "")
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())

    def query(self, expr: str) -> list:
        out = self.get("/api/v1/query", query=expr)
        assert out["status"] == "success", (expr, out)
        return out["data"]["result"]


def _stop(p: subprocess.Popen) -> None:
    terminate(p)


@pytest.fixture
def stack(tmp_path):
    need_root()
    need(KSM.joinpath("run").exists(), "no KSM in this kernel")
    prometheus = need_tool("prometheus")
    procs = []
    try:
        with ksm_exclusive():
            # Stand-in guests: argv[0] qemu-system-x86_64, the rest parsed as QEMU options.
            guests = []
            # The third opts out of merging on its command line (mem-merge=off): the doctor
            # table's series. It still madvises itself, so it merges like the others.
            for i, extra in ((1, []), (2, []), (3, ["-machine", "pc,mem-merge=off"])):
                g = subprocess.Popen(["qemu-system-x86_64", "-c", GUEST, "-name", "guest=e2e-vm%d,debug-threads=on" % i,
                                      "-uuid", str(uuid.uuid4()), "-m", "128"] + extra, executable=sys.executable,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                procs.append(g)
                guests.append(g)
            for g in guests:
                assert g.stdout.readline().strip() == "ready"
            port = free_port()
            (tmp_path / "policy.yaml").write_text(POLICY)
            (tmp_path / "config.yaml").write_text(yaml.safe_dump({
                "policy": str(tmp_path / "policy.yaml"), "libvirt": False, "state_file": str(tmp_path / "state.json"),
                "exporter": {"listen": "127.0.0.1:%d" % port},
                # The estimate panel's series: scan the guests' memory once, fast.
                "estimate": {"enabled": True, "interval": "1h", "rate_mib_s": 4000}}))
            dlog = (tmp_path / "daemon.log").open("w")
            daemon = subprocess.Popen([sys.executable, "-m", "ksmctl", "--config", str(tmp_path / "config.yaml"),
                                       "daemon", "--log-level", "info"], stdout=dlog, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
            procs.append(daemon)
            # Rules as shipped, but evaluated every second like the scrapes.
            rules = yaml.safe_load(RULES.read_text())
            for g in rules["groups"]:
                g.pop("interval", None)
            (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
            pport = free_port()
            (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(tmp_path / "rules.yml")],
                "scrape_configs": [{"job_name": "ksmctl", "static_configs": [{"targets": ["127.0.0.1:%d" % port]}]}]}))
            plog = (tmp_path / "prometheus.log").open("w")
            prom = subprocess.Popen([prometheus, "--config.file=%s" % (tmp_path / "prometheus.yml"),
                                     "--storage.tsdb.path=%s" % (tmp_path / "tsdb"),
                                     "--web.listen-address=127.0.0.1:%d" % pport, "--log.level=warn"],
                                    stdout=plog, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            procs.append(prom)
            p = Prom(pport)

            def ready():
                assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
                assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()
                try:
                    return p.get("/api/v1/status/buildinfo")["status"] == "success"
                except OSError:
                    return False
            wait_for(ready, 60, "Prometheus to answer", interval=0.2)
            yield p, tmp_path
    finally:
        for proc in reversed(procs):
            if proc.stdin:
                proc.stdin.close()
            _stop(proc)


def test_dashboard_and_rules_against_real_prometheus(stack):
    p, tmp = stack

    def scraped():
        r = p.query('count_over_time(up{job="ksmctl"}[1m])')
        up = p.query('up{job="ksmctl"}')
        return r and float(r[0]["value"][1]) >= 8 and up and up[0]["value"][1] == "1"
    wait_for(scraped, 60, "8 scrapes of the daemon", interval=0.5)
    wait_for(lambda: p.query("ksmctl_vm_merging_pages > 0"), 60, "the stand-in guests merged", interval=0.5)

    # Dashboard: every query returns data at "All".
    missing = []
    # Merge control's series exist only while it runs, which needs libvirt guests (not
    # here): those panels say so in their noValue text, and their queries must evaluate.
    merge_control = {e for w, e in dashboard_exprs() if "merge_violation" in e or "guests_merge" in e
                     or "merge_denied" in e}
    for where, expr in dashboard_exprs():
        if expr in merge_control:
            p.query(substitute(expr))
            continue
        exprs = [expr] if where.startswith("panel") else operands(expr)
        if where.startswith("annotation"):
            p.query(substitute(expr))  # the full condition must at least evaluate
        for e in exprs:
            if not p.query(substitute(e)):
                missing.append((where, substitute(e)))
    # Rules: recording rules return data, and Prometheus has recorded them; alerts: every operand.
    for name, expr, is_alert in rule_exprs():
        p.query(expr)
        if "ksmctl_merge_violations_total" in expr:
            continue   # merge control: see above
        for e in operands(expr) if is_alert else [expr]:
            if not p.query(e):
                missing.append((name, e))
    for name, _expr, is_alert in rule_exprs():
        if not is_alert and not wait_for(lambda: p.query(name), 20, "recorded %s" % name, interval=0.5):
            missing.append((name, "recorded series"))
    assert not missing, "queries without data:\n" + "\n".join("%s: %s" % m for m in missing)

    # Variables resolve to values.
    inst = p.get("/api/v1/label/instance/values", **{"match[]": "ksm_run"})["data"]
    assert inst == [p.query("ksm_run")[0]["metric"]["instance"]]
    doms = p.get("/api/v1/label/domain/values", **{"match[]": 'ksmctl_vm_merging_pages{instance=~".*"}'})["data"]
    assert {"e2e-vm1", "e2e-vm2"} <= set(doms)
    assert {v["name"] for v in dashboard()["templating"]["list"]} == {"datasource", "job", "instance", "vm", "topn"}

    # Alerts: none firing or pending on this healthy host.
    rules = p.get("/api/v1/rules")["data"]["groups"]
    states = {r["name"]: r.get("state") for g in rules for r in g["rules"] if r["type"] == "alerting"}
    assert states and all(s == "inactive" for s in states.values()), states

    # Saved bytes: Prometheus equals sysfs once KSM has settled (same value before and after).
    def equal():
        before = sysfs_saved()
        got = p.query("ksm_memory_saved_bytes")
        after = sysfs_saved()
        return before == after and got and float(got[0]["value"][1]) == before and before > 0
    wait_for(equal, 60, "ksm_memory_saved_bytes in Prometheus to equal sysfs", interval=0.5)
    assert sysfs_saved() >= (2 * PAGES - 14) * PAGE * 0.9
