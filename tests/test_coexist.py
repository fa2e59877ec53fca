"""Other KSM writers: detection at start (fixture trees and a real ksmtuned) and drift."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from ksmctl.kernel.ownership import KnobOwnership
from ksmctl.kernel.sysfs import KsmSysfs
from ksmctl.kernel.writer import KsmWriter
from ksmctl.service.coexist import CoexistenceChecker, check_or_refuse
from ksmctl.errors import EXIT_REFUSED, Refused
from tests.ksmlock import KSM, ksm_exclusive
from tests.support import need, need_root, wait_for

KSMTUNED = "/usr/sbin/ksmtuned"


def _proc(root: Path, pid: int, argv, comm: str) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
    (d / "comm").write_text(comm + "\n")


def _ksm(root: Path, advisor: str = "[none] scan-time") -> Path:
    d = root / "kernel" / "mm" / "ksm"
    d.mkdir(parents=True)
    (d / "advisor_mode").write_text(advisor + "\n")
    return root


@pytest.fixture
def roots(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    sys_root = _ksm(tmp_path / "sys")
    return proc, sys_root, tmp_path / "run"


def _checker(roots, self_pid=99999):
    proc, sys_root, run = roots
    return CoexistenceChecker(proc_root=str(proc), sys_root=str(sys_root),
                              run_root=str(run), self_pid=self_pid)


def test_nothing_found_on_a_quiet_host(roots):
    proc = roots[0]
    _proc(proc, 1, ["/sbin/init"], "systemd")
    _proc(proc, 50, [], "ksmd")  # kernel thread: empty cmdline
    _proc(proc, 51, ["vim", "/usr/sbin/ksmtuned"], "vim")  # editing it is not running it
    _proc(proc, 52, ["/usr/sbin/ksmctl", "start"], "ksmctl")  # Debian's helper, not a daemon
    (proc / "self").mkdir()  # non-pid entries are ignored
    assert _checker(roots).scan() == []


def test_ksmtuned_found_by_script_and_by_comm(roots):
    proc = roots[0]
    # How the loop looks after `ksmtuned` forked it: shebang-run, comm is the script.
    _proc(proc, 1234, ["/bin/bash", "/usr/sbin/ksmtuned"], "ksmtuned")
    # Started explicitly through the shell: comm is bash.
    _proc(proc, 1240, ["bash", "-e", "/usr/sbin/ksmtuned"], "bash")
    [c] = _checker(roots).scan()
    assert c.kind == "ksmtuned"
    assert c.pids == (1234, 1240)
    assert c.message() == (
        "ksmtuned is running (pids 1234, 1240): stop it with `systemctl stop ksmtuned` and "
        "`systemctl disable ksmtuned`, or start with --force")


def test_mom_and_other_ksmctl_daemon_found_but_not_ourselves(roots):
    proc = roots[0]
    _proc(proc, 300, ["/usr/bin/python3", "/usr/sbin/momd", "-c", "/etc/vdsm/mom.conf"], "momd")
    _proc(proc, 400, ["/usr/local/bin/ksmctl", "--config", "x", "daemon"], "ksmctl")
    _proc(proc, 401, ["/usr/bin/python3.9", "-m", "ksmctl", "daemon"], "python3.9")
    _proc(proc, 500, ["/usr/local/bin/ksmctl", "daemon"], "ksmctl")  # that is us
    _proc(proc, 402, ["/usr/local/bin/ksmctl", "daemon", "--dry-run"], "ksmctl")  # writes nothing
    found = {c.kind: c for c in _checker(roots, self_pid=500).scan()}
    assert set(found) == {"mom", "ksmctl"}
    assert found["mom"].pids == (300,)
    assert "systemctl stop mom-vdsm momd" in found["mom"].how_to_stop
    assert found["ksmctl"].pids == (400, 401)


def test_unlistable_proc_finds_no_process_and_does_not_raise(tmp_path):
    c = CoexistenceChecker(proc_root=str(tmp_path / "no-proc"), sys_root=str(tmp_path),
                           run_root=str(tmp_path), self_pid=1)
    assert c.process_conflicts() == []


def test_processes_that_vanish_or_are_kernel_threads_are_skipped(roots):
    proc = roots[0]
    _proc(proc, 70, ["/bin/bash", "/usr/sbin/ksmtuned"], "ksmtuned")
    (proc / "70" / "comm").unlink()  # exited between reading cmdline and comm
    _proc(proc, 71, [], "ksmtuned")   # a zombie keeps its comm, writes nothing
    _proc(proc, 72, ["/bin/bash", "/usr/sbin/ksmtuned"], "ksmtuned")
    assert [(c.kind, c.pids) for c in _checker(roots).process_conflicts()] == [("ksmtuned", (72,))]


def test_active_advisor_is_a_conflict_unless_it_is_ours(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    sys_root = _ksm(tmp_path / "sys", advisor="none [scan-time]")
    checker = CoexistenceChecker(str(proc), str(sys_root), run_root=str(tmp_path / "run"))
    [c] = checker.scan()
    assert c.kind == "advisor"
    assert "[scan-time]" in c.description
    assert "echo none > %s" % (sys_root / "kernel/mm/ksm/advisor_mode") in c.how_to_stop
    assert checker.scan(advisor_is_ours=True) == []


def test_kernel_without_advisor(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "sys/kernel/mm/ksm").mkdir(parents=True)  # 6.1: no advisor_mode file
    checker = CoexistenceChecker(str(tmp_path / "proc"), str(tmp_path / "sys"),
                                 run_root=str(tmp_path / "run"))
    assert checker.scan() == []


def test_units_asked_only_when_systemd_is_init(roots, tmp_path):
    proc, sys_root, run = roots
    fake = tmp_path / "systemctl"
    fake.write_text("#!/bin/sh\n[ \"$3\" = ksm.service ] && exit 0; exit 3\n")
    fake.chmod(0o755)
    checker = CoexistenceChecker(str(proc), str(sys_root), run_root=str(run),
                                 systemctl=str(fake))
    assert checker.scan() == []  # not booted with systemd: never asked
    (run / "systemd" / "system").mkdir(parents=True)
    [c] = checker.scan()
    assert c.kind == "ksm.service"
    assert "systemctl stop ksm` and `systemctl disable ksm`" in c.how_to_stop


def test_refuse_names_what_to_stop_and_force_lets_through(roots, caplog):
    _proc(roots[0], 1234, ["/bin/bash", "/usr/sbin/ksmtuned"], "ksmtuned")
    conflicts = _checker(roots).scan()
    with pytest.raises(Refused) as exc:
        check_or_refuse(conflicts, force=False)
    assert exc.value.exit_code == EXIT_REFUSED
    assert ("ksmtuned is running (pid 1234): stop it with `systemctl stop ksmtuned` and "
            "`systemctl disable ksmtuned`, or start with --force") in str(exc.value)
    caplog.set_level("WARNING")
    assert check_or_refuse(conflicts, force=True) == conflicts
    assert "ksmtuned is running" in caplog.text
    assert check_or_refuse([], force=False) == []


# -- the real thing ---------------------------------------------------------------


PR_SET_CHILD_SUBREAPER = 36


def _set_subreaper(on: bool) -> bool:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0


@pytest.fixture
def real_ksmtuned(tmp_path):
    """Debian's ksmtuned, as its unit starts it: it forks its loop and exits.

    KSM_MONITOR_INTERVAL keeps it from ever reaching its first write to
    /sys/kernel/mm/ksm during the test (the script reads the variable with a
    default, so the environment wins over the commented-out /etc/ksmtuned.conf).
    The test process is a child subreaper meanwhile, so the orphaned loop is
    ours to reap instead of a zombie left to an init that may not reap.
    """
    need(os.path.exists(KSMTUNED), "Debian's ksmtuned package is not installed")
    pidfile = tmp_path / "ksmtune.pid"
    env = dict(os.environ, PIDFILE=str(pidfile), KSM_MONITOR_INTERVAL="3600")
    reaper = _set_subreaper(True)
    starter = subprocess.Popen([KSMTUNED], env=env, start_new_session=True,
                               stdin=subprocess.DEVNULL)
    pgid = starter.pid  # session leader: the loop stays in its process group
    try:
        assert starter.wait(timeout=30) == 0
        pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 10,
                           "ksmtuned's pid file"))
        yield pid
    finally:
        members = _group_members(pgid, zombies=True)
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        for member in members:
            try:
                os.waitpid(member, 0)
            except ChildProcessError:
                pass  # not ours (no subreaper support): init reaps it
        if reaper:
            _set_subreaper(False)
        wait_for(lambda: not _group_members(pgid), 10, "ksmtuned's process group to exit")


def _group_members(pgid: int, zombies: bool = False):
    """Processes of a process group (zombies only when asked: they are to reap)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and (zombies or fields[0] != "Z"):
            out.append(int(entry.name))
    return out


def test_real_ksmtuned_is_found_and_start_refused(real_ksmtuned):
    conflicts = CoexistenceChecker().process_conflicts()
    tuned = [c for c in conflicts if c.kind == "ksmtuned"]
    assert tuned, "running ksmtuned (pid %d) not detected: %r" % (real_ksmtuned, conflicts)
    assert real_ksmtuned in tuned[0].pids
    with pytest.raises(Refused) as exc:
        check_or_refuse(tuned, force=False)
    assert "ksmtuned is running (pid" in str(exc.value)
    assert "systemctl stop ksmtuned" in str(exc.value)


def test_real_ksmtuned_gone_is_not_reported(real_ksmtuned):
    assert any(c.kind == "ksmtuned" for c in CoexistenceChecker().process_conflicts())
    os.kill(real_ksmtuned, signal.SIGTERM)
    wait_for(lambda: not any(c.kind == "ksmtuned" for c in CoexistenceChecker().process_conflicts()),
             10, "ksmtuned to disappear from the scan")


@pytest.mark.kernel
def test_external_write_to_pages_to_scan_is_detected():
    need_root()
    need((KSM / "pages_to_scan").exists(), "no KSM in this kernel")
    with ksm_exclusive():
        if (KSM / "advisor_mode").exists():
            (KSM / "advisor_mode").write_text("none")
        sysfs = KsmSysfs()
        owner = KnobOwnership()
        ours = 778 if sysfs.read().get("pages_to_scan") == 777 else 777  # a real write
        wanted = {"pages_to_scan": ours}
        KsmWriter(sysfs).apply(wanted, sysfs.read(), wrote=owner.wrote)  # "the daemon" writes
        assert sysfs.read().get("pages_to_scan") == ours
        assert owner.plan(wanted, sysfs.read()).drifts == ()
        # Another writer, between ticks (as ksmtuned's KSMCTL start does).
        subprocess.run(["sh", "-c", "echo 1250 > /sys/kernel/mm/ksm/pages_to_scan"], check=True)
        [drift] = owner.plan(wanted, sysfs.read()).drifts
        assert (drift.knob, drift.expected, drift.found, drift.first) == ("pages_to_scan", ours, 1250, True)
