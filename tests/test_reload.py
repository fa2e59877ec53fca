"""Reload means reload, and never kills the daemon: every config key is either applied on
SIGHUP or named as waiting for a restart; any failure while reading the new config or
policy keeps the running ones and is counted; signals that arrive while the daemon is
still starting are queued, not fatal. Dry run reports what it would write and nothing
more; a write the kernel refuses is counted by knob."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ksmctl.collectors.host import HostCollector
from ksmctl.collectors.procfs import ProcFs
from ksmctl.config import AT_RESTART, ON_RELOAD, Config
from ksmctl.errors import ErrorSource
from ksmctl.export.metrics import MetricsCollector, render_text
from ksmctl.kernel.sysfs import KsmSysfs
from ksmctl.kernel.writer import KsmWriter
from ksmctl.policy.loader import LoadedPolicy, parse_policy
from ksmctl.service.daemon import Daemon

from .daemon_proc import ALWAYS_ON_POLICY, DaemonProc, wait_ticks
from .fixtures import make_proc, make_sys
from .support import wait_for

ON = "name: on\ninterval: 3600\nrun: {mode: always}\nscan: {strategy: step, pages_to_scan: {initial: 700, min: 64, max: 1250, boost: 0, decay: 0}}\n"
REPO = Path(__file__).resolve().parent.parent


def _daemon(tmp_path, dry_run=False, config_loader=None, policy_loader=None, **cfg):
    sys_root = make_sys(tmp_path / "sys", {"run": "0", "pages_to_scan": "100"})
    proc_root = make_proc(tmp_path / "proc")
    collector = HostCollector(KsmSysfs(str(sys_root)), ProcFs(str(proc_root)))
    lp = LoadedPolicy(parse_policy(ON, "on.yaml"), "on.yaml", "1" * 64)
    metrics = MetricsCollector()
    kw = {}
    if config_loader is not None:
        kw["config_loader"] = config_loader
    if policy_loader is not None:
        kw["policy_loader"] = policy_loader
    d = Daemon(Config(state_file=str(tmp_path / "state.json"), **cfg), lp, collector,
               KsmWriter(collector.sysfs, dry_run=dry_run), observers=[metrics.observe], **kw)
    return d, sys_root, metrics


def _sample(metrics, line_start):
    for line in render_text(metrics).decode().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no sample %r" % line_start)


def test_every_config_key_is_applied_on_reload_or_named_as_needing_a_restart():
    fields = set(Config.model_fields)
    assert ON_RELOAD | AT_RESTART == fields and not ON_RELOAD & AT_RESTART, \
        sorted(fields ^ (ON_RELOAD | AT_RESTART))


def test_restart_keys_are_named_kept_and_the_rest_applied(tmp_path, caplog):
    new = {}
    d, _, _ = _daemon(tmp_path, config_loader=lambda: Config(**new))
    d.config = Config(state_file=str(tmp_path / "state.json"))
    new.update(state_file=str(tmp_path / "state.json"), interval=5, libvirt_uri="qemu+ssh://elsewhere/system",
               exporter={"listen": "127.0.0.1:29999"}, log_level="warning")
    d.policy_loader = lambda name: d.loaded
    caplog.set_level(logging.INFO, logger="ksmctl.daemon")
    root_level = logging.getLogger().level
    try:
        assert d.reload()
        warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("exporter.listen, libvirt_uri changed" in w and "next restart" in w for w in warning), warning
        assert d.config.libvirt_uri == "qemu:///system" and d.config.exporter.listen == "127.0.0.1:19839"
        assert d.interval == 5 and d.config.log_level == "warning"
        assert logging.getLogger().level == logging.WARNING
    finally:
        logging.getLogger().setLevel(root_level)


@pytest.mark.parametrize("where,source", [("config", ErrorSource.CONFIG), ("policy", ErrorSource.POLICY)])
def test_any_failure_while_reloading_keeps_the_running_policy_and_is_counted_once(tmp_path, where, source):
    def boom(*_a):
        raise RuntimeError("disk on fire")
    kw = {"config_loader": boom} if where == "config" else {"config_loader": lambda: Config(), "policy_loader": boom}
    d, _, metrics = _daemon(tmp_path, **kw)
    before = d.loaded
    assert d.reload() is False
    assert d.loaded is before
    rec = d.tick()
    assert (source, "reload rejected: RuntimeError: disk on fire") in rec.errors
    assert _sample(metrics, 'ksmctl_errors_total{source="%s"}' % source.value) == 1.0
    d.tick()
    assert _sample(metrics, 'ksmctl_errors_total{source="%s"}' % source.value) == 1.0


def test_dry_run_reports_what_it_would_write_and_nothing_more(tmp_path):
    d, sys_root, metrics = _daemon(tmp_path, dry_run=True)
    for _ in range(3):
        rec = d.tick()
    knobs = sys_root / "kernel/mm/ksm"
    assert (knobs / "run").read_text() == "0\n" and (knobs / "pages_to_scan").read_text() == "100\n"
    assert rec.changes == [] and {c.knob for c in rec.would_change} >= {"run", "pages_to_scan"}
    assert rec.external == []                           # no "another writer" for imagined values
    state = d.state_dict(rec)
    assert state["dry_run"] is True and state["changes"] == []
    assert {"knob": "pages_to_scan", "old": 100, "new": 700} in state["would_change"]
    text = render_text(metrics).decode()
    assert "ksmctl_dry_run 1.0" in text
    assert all(l.endswith(" 0.0") for l in text.splitlines() if l.startswith("ksmctl_changes_total"))


def test_a_write_the_kernel_refuses_is_counted_by_knob(tmp_path):
    d, sys_root, metrics = _daemon(tmp_path)
    target = sys_root / "kernel/mm/ksm/pages_to_scan"
    target.unlink()
    target.symlink_to("/proc/version")   # reads as garbage, and the kernel refuses writes to it
    rec = d.tick()
    assert "pages_to_scan" in rec.failed_writes and not rec.ok, rec.errors
    assert _sample(metrics, 'ksmctl_write_failures_total{knob="pages_to_scan"}') == 1.0
    assert _sample(metrics, 'ksmctl_write_failures_total{knob="run"}') == 0.0


def test_signal_handlers_are_in_place_before_the_cli_is_imported(tmp_path):
    """The entry point queues SIGHUP before the slow imports: a reload sent by systemd
    while the daemon is still starting must not kill it with SIGHUP's default action."""
    probe = ("import signal, sys\n"
             "class Probe:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'ksmctl.cli':\n"
             "            print('HUP handled:', signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, None), flush=True)\n"
             "            raise SystemExit(0)\n"
             "sys.meta_path.insert(0, Probe())\n"
             "sys.argv = ['ksmctl', 'daemon', '--help']\n"
             "from ksmctl.entry import main\n"
             "main()\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=str(REPO),
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert "HUP handled: True" in out.stdout, out.stdout + out.stderr


def _hup_caught(pid: int) -> bool:
    try:
        for line in Path("/proc/%d/status" % pid).read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    except OSError:
        pass
    return False


def test_sighup_storm_while_starting_and_with_broken_files_of_every_kind(tmp_path):
    """A real daemon (dry run, fixture trees): SIGHUPs from its first instructions on, then
    its policy swapped for a FIFO, a directory, /dev/zero, a huge sparse file, invalid
    UTF-8 and a policy that does not validate, one SIGHUP each: it keeps ticking on the
    last good policy and counts each rejection; a good new policy is then taken."""
    sys_root = make_sys(tmp_path / "sys", {"run": "0"})
    proc_root = make_proc(tmp_path / "proc")
    d = DaemonProc(tmp_path, ALWAYS_ON_POLICY, {"sys_root": str(sys_root), "proc_root": str(proc_root)},
                   args=["--dry-run"])
    with d:
        wait_for(lambda: _hup_caught(d.proc.pid) or d.proc.poll() is not None, 30, "the entry point's handler")
        sent = 0
        while d.state() is None and d.alive() and sent < 2000:
            d.signal(signal.SIGHUP)
            sent += 1
            time.sleep(0.002)
        assert d.alive(), d.log_text()
        first = wait_ticks(d, 1)
        assert first["policy"]["name"] == "test-on", first["policy"]
        good = d.policy.read_text()
        broken = []
        fifo = tmp_path / "fifo.yaml"
        os.mkfifo(str(fifo))
        broken.append(("fifo", lambda: (d.policy.unlink(), d.policy.symlink_to(fifo))))
        broken.append(("directory", lambda: (d.policy.unlink(), d.policy.mkdir())))
        broken.append(("device", lambda: (d.policy.rmdir(), d.policy.symlink_to("/dev/zero"))))
        sparse = tmp_path / "sparse.yaml"
        with open(str(sparse), "wb") as f:
            f.truncate(100 << 20)
        broken.append(("sparse", lambda: (d.policy.unlink(), d.policy.symlink_to(sparse))))
        broken.append(("utf8", lambda: (d.policy.unlink(), d.policy.write_bytes(b"name: \xff\xfe\n"))))
        broken.append(("invalid", lambda: d.policy.write_text("name: x\nscan: {strategy: nonsense}\n")))
        for n, (what, swap) in enumerate(broken, 1):
            swap()
            d.signal(signal.SIGHUP)
            wait_for(lambda: d.log_text().count("reload rejected") >= n or not d.alive(), 30,
                     "the %s policy to be rejected" % what)
            assert d.alive(), d.log_text()
            s = wait_ticks(d, 1)
            assert s["policy"]["name"] == "test-on", (what, s["policy"])
        d.policy.unlink()
        d.policy.write_text(good.replace("name: test-on", "name: test-new"))
        d.signal(signal.SIGHUP)
        wait_for(lambda: (d.state() or {}).get("policy", {}).get("name") == "test-new", 30, "the good policy")
        assert (sys_root / "kernel/mm/ksm/run").read_text() == "0\n"   # a dry run never writes
        assert d.stop() == 0


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_POLICYISH = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(str.encode),
    st.dictionaries(st.sampled_from(["name", "interval", "run", "scan", "mode", "strategy", "x"]),
                    st.one_of(st.integers(), st.floats(), st.text(max_size=8), st.booleans(), st.none(),
                              st.lists(st.integers(), max_size=3)), max_size=5)
    .map(lambda d: ("\n".join("%s: %s" % kv for kv in d.items()) + "\n").encode()))


@settings(max_examples=120, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=_POLICYISH)
def test_reload_of_any_bytes_keeps_or_switches_but_never_raises(tmp_path, raw):
    """The reload path fuzzed with whatever a policy file could hold: reload() returns,
    keeps the running policy unless the new one validates, and nothing reaches the kernel."""
    from ksmctl.policy.loader import load_policy
    policy = tmp_path / "fuzz.yaml"
    policy.write_bytes(raw)
    d, sys_root, _ = _daemon(tmp_path / ("d%d" % (abs(hash(raw)) % 10 ** 9)),
                             config_loader=lambda: Config(policy=str(policy)), policy_loader=load_policy)
    before = d.loaded
    knobs = {p.name: p.read_bytes() for p in (sys_root / "kernel/mm/ksm").iterdir()}
    switched = d.reload()
    assert (d.loaded is not before) == switched
    if not switched:
        assert d._pending_errors and d._pending_errors[-1][0] in (ErrorSource.POLICY, ErrorSource.CONFIG)
    assert {p.name: p.read_bytes() for p in (sys_root / "kernel/mm/ksm").iterdir()} == knobs


@pytest.mark.timeout(90)
def test_a_burst_of_sighups_never_deadlocks_the_loop(tmp_path):
    """Signal handlers run between any two bytecodes of the main thread, handlers
    included: with a threading.Event in the handler, a SIGHUP arriving while another
    handler held the Event's lock recursed until the daemon died (the storm test above
    caught it in CI; the nesting it needs is timing-dependent). The handlers now only set
    a flag and write a byte to a pipe. Here: 2,000 SIGHUPs, then a stop, and the loop
    (its interval an hour) must wake, reload and end at once, i.e. the pipe wakes it."""
    import threading
    d, _, _ = _daemon(tmp_path, config_loader=lambda: Config(state_file=str(tmp_path / "state.json")))
    d.policy_loader = lambda name: d.loaded
    old = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    d.install_signal_handlers()
    reloads = []
    real_reload = d.reload
    d.reload = lambda: reloads.append(real_reload()) or True

    def storm():
        wait_for(lambda: d.ticks >= 1, 30, "the first tick")
        for _ in range(2000):
            os.kill(os.getpid(), signal.SIGHUP)
        wait_for(lambda: reloads, 30, "a reload")
        d.request_stop()

    t = threading.Thread(target=storm, daemon=True)
    t.start()
    try:
        d.run()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    t.join(30)
    assert reloads and all(reloads) and not t.is_alive()


def _ksmctl(d: DaemonProc, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ksmctl", "--config", str(d.config)] + list(args),
                          capture_output=True, text=True, timeout=timeout, cwd=str(REPO))


def test_ksmctl_reload_returns_once_the_daemon_switched_or_refused(tmp_path):
    """The unit's ExecReload: when `ksmctl reload` returns, the state file already names the
    new policy (no wait after it), a rejected policy exits 2 naming the key while the daemon
    keeps the old one, and a stopped daemon is reported after --timeout, not waited on forever."""
    sys_root = make_sys(tmp_path / "sys", {"run": "0"})
    proc_root = tmp_path / "proc"
    d = DaemonProc(tmp_path, ALWAYS_ON_POLICY.replace("interval: 0.3s", "interval: 1h"),
                   {"sys_root": str(sys_root), "proc_root": str(make_proc(proc_root))}, args=["--dry-run"])
    with d:
        wait_ticks(d, 1)
        pid = d.proc.pid
        good = d.policy.read_text()
        d.policy.write_text(good + "bogus_key: 1\n")
        r = _ksmctl(d, "reload", "--pid", str(pid))
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert "reload rejected, the daemon keeps policy test-on" in r.stderr and "bogus_key" in r.stderr
        assert "Traceback" not in r.stderr
        assert d.state()["policy"]["name"] == "test-on" and d.state()["reload"]["ok"] is False
        d.policy.write_text(good.replace("name: test-on", "name: test-two"))
        r = _ksmctl(d, "reload")                      # pid from the state file
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert r.stdout.startswith("reloaded: policy test-two")
        s = d.state()                                 # read at once: the interval is an hour
        assert s["policy"]["name"] == "test-two" and s["reload"] == dict(s["reload"], ok=True, count=2)
        assert d.alive() and s["pid"] == pid
        if os.geteuid() == 0:    # not root: may not signal the daemon, said so (exit 3)
            from click.testing import CliRunner
            from ksmctl.cli import cli
            rfd, wfd = os.pipe()
            child = os.fork()
            if child == 0:   # a real non-root uid (kill() checks the real one too)
                try:
                    os.setresuid(65534, 65534, 65534)
                    res = CliRunner().invoke(cli, ["--config", str(d.config), "reload", "--pid", str(pid),
                                                   "--timeout", "5"])
                    os.write(wfd, ("%d %s" % (res.exit_code, res.output)).encode())
                finally:
                    os._exit(0)
            os.close(wfd)
            with os.fdopen(rfd) as f:
                out = f.read()
            os.waitpid(child, 0)
            assert out.startswith("3 ") and "not permitted to signal the daemon" in out, out
            assert d.state()["reload"]["count"] == 2
        # A stuck daemon: the command gives up with a message; the reload happens on SIGCONT.
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            r = _ksmctl(d, "reload", "--pid", str(pid), "--timeout", "1")
            assert r.returncode == 1 and "did not confirm the reload within 1s" in r.stderr, r.stderr
            assert time.monotonic() - t0 < 30
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: (d.state() or {}).get("reload", {}).get("count") == 3, 30, "the late reload")
        assert d.stop() == 0


def test_ksmctl_reload_signals_only_a_ksmctl_daemon(tmp_path):
    """--pid of another process is refused without a signal (SIGHUP would kill it), and no
    daemon at all is a message, not a wait."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text("state_file: %s\n" % (tmp_path / "state.json"))
    other = subprocess.Popen(["sleep", "60"])
    try:
        r = subprocess.run([sys.executable, "-m", "ksmctl", "--config", str(cfg), "reload", "--pid", str(other.pid)],
                           capture_output=True, text=True, timeout=60, cwd=str(REPO))
        assert r.returncode == 2 and "not a running `ksmctl daemon` process" in r.stderr, r.stderr
        assert other.poll() is None                    # not signalled
    finally:
        other.kill()
        other.wait()
    r = subprocess.run([sys.executable, "-m", "ksmctl", "--config", str(cfg), "reload"],
                       capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert r.returncode == 1 and "no running ksmctl daemon" in r.stderr, r.stderr
    for bad in ("0", "-5", "x", "99999999999"):
        r = subprocess.run([sys.executable, "-m", "ksmctl", "--config", str(cfg), "reload", "--pid", bad],
                           capture_output=True, text=True, timeout=60, cwd=str(REPO))
        assert r.returncode == 2 and "--pid" in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)
