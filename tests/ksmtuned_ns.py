"""The inside of the sandbox that tests/test_ksmtuned_real.py runs Debian's ksmtuned in.

Run by tests/ksmtuned_sandbox.py as PID 1 of fresh PID and mount namespaces
(`unshare --mount --propagation private --pid --fork --kill-child --mount-proc`), with
the standard library only (python -I). Two roles:

  ksmtuned_ns.py init CONFIG.json   PID 1: bind-mounts the fakes over the real paths,
                                    checks that each real path now IS the fake (same
                                    st_dev and st_ino), then serves commands, one JSON
                                    object per line on stdin, one answer per line on stdout.
  ksmtuned_ns.py guest KIB          a stand-in QEMU: started with argv[0]
                                    "qemu-system-x86_64" and "-enable-kvm" last, so that
                                    ksmtuned's `pgrep -f '^qemu-system.*-enable-kvm'`
                                    finds it; touches KIB KiB of anonymous memory, says
                                    "ok", then holds it (its RSS stays put) until stdin closes.

Commands: {"op": "guest", "kib": N} -> {"pid": namespace pid};
{"op": "stop_guest", "pid": P} -> {"ok": true}; {"op": "statm"} -> {"statm": {pid: text}}
for the live guests, as /proc inside the namespace shows them; {"op": "start"} runs
ksmtuned (it forks its loop and exits) -> {"rc": exit status}. When stdin closes PID 1
exits, and the kernel kills everything else in the namespace: ksmtuned's loop, its
`sleep`, the guests. The mounts go with the mount namespace.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import select
import subprocess
import sys
import time

GUEST_ARGV0 = "qemu-system-x86_64"
PR_SET_THP_DISABLE = 41


def guest(kib: int) -> None:
    size = kib * 1024
    m = mmap.mmap(-1, size)
    for off in range(0, size, mmap.PAGESIZE):
        m[off] = 1
    buf = bytearray(1)
    sys.stdout.write("ok\n")
    sys.stdout.flush()
    # Hold the memory until the sandbox closes our stdin, reading into a buffer made
    # beforehand: blocked here, nothing allocates, and the RSS stays put.
    while os.readv(0, [buf]):
        pass


def _reply(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _same_file(a: str, b: str) -> bool:
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _mount(config) -> list:
    """Bind every fake over its real path; return the checks done, or raise."""
    checked = []
    for src, dst in config["binds"]:
        subprocess.run(["mount", "--bind", src, dst], check=True)
        pairs = [(src, dst)]
        if os.path.isdir(src):
            pairs += [(os.path.join(src, n), os.path.join(dst, n)) for n in sorted(os.listdir(src))]
        for s, d in pairs:
            if not _same_file(s, d):
                raise RuntimeError("%s is not the fake %s after mount --bind" % (d, s))
            checked.append(d)
    return checked


def _spawn_guest(kib: int, bin_dir: str) -> subprocess.Popen:
    # Python finds its standard library from argv[0] looked up on PATH: bin_dir holds a
    # symlink by that name to this interpreter (else it may find a real QEMU binary).
    p = subprocess.Popen([GUEST_ARGV0, "-I", os.path.abspath(__file__), "guest", str(kib), "-enable-kvm"],
                         executable=os.path.join(bin_dir, GUEST_ARGV0), env={"PATH": bin_dir},
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    ready, _, _ = select.select([p.stdout], [], [], 30)
    line = p.stdout.readline() if ready else b""
    deadline = time.monotonic() + 30
    while line.strip() == b"ok" and _state(p.pid) != "S":  # until it blocks in its read
        if time.monotonic() > deadline:
            line = b"ok, but never blocked"
            break
        time.sleep(0.005)
    if line.strip() != b"ok":
        p.kill()
        p.wait()
        raise RuntimeError("guest of %d KiB did not come up (said %r)" % (kib, line))
    return p


def _state(pid: int) -> str:
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _stop_guest(p: subprocess.Popen) -> None:
    p.stdin.close()
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def init(config_path: str) -> None:
    with open(config_path) as f:
        config = json.load(f)
    try:
        checked = _mount(config)
    except Exception as e:  # noqa: BLE001 - report anything, start nothing
        _reply({"error": "mounting the fakes failed: %s" % e})
        sys.exit(1)
    _reply({"mounted": checked, "pid": os.getpid()})
    # No transparent huge pages for anything started from here: khugepaged collapsing a
    # guest's pages would change its RSS between the test's reading and ksmtuned's.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)
    guests = {}
    log = open(config["log"], "ab")
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "guest":
                p = _spawn_guest(int(cmd["kib"]), config["guest_bin"])
                guests[p.pid] = p
                _reply({"pid": p.pid})
            elif op == "stop_guest":
                _stop_guest(guests.pop(int(cmd["pid"])))
                _reply({"ok": True})
            elif op == "statm":
                out = {}
                for pid in guests:
                    with open("/proc/%d/statm" % pid) as f:
                        out[str(pid)] = f.read()
                _reply({"statm": out})
            elif op == "start":
                # The mounts were checked above; check once more right before the only
                # program here that writes /sys/kernel/mm/ksm starts.
                for src, dst in config["binds"]:
                    if not _same_file(src, dst):
                        raise RuntimeError("%s is no longer the fake %s" % (dst, src))
                p = subprocess.Popen([config["ksmtuned"]], env=config["env"], stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log, cwd="/")
                _reply({"rc": p.wait(timeout=30)})
            else:
                _reply({"error": "unknown op %r" % op})
        except Exception as e:  # noqa: BLE001 - the test shows it
            _reply({"error": "%s: %s: %s" % (op, type(e).__name__, e)})
    # stdin closed: the test is done. Exiting as PID 1 kills the rest of the namespace.
    for p in guests.values():
        p.kill()
        p.wait(timeout=5)


if __name__ == "__main__":
    if sys.argv[1] == "guest":
        guest(int(sys.argv[2]))
    elif sys.argv[1] == "init":
        init(sys.argv[2])
    else:
        sys.exit("usage: ksmtuned_ns.py init CONFIG.json | guest KIB")
