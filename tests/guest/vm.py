"""A systemd guest under QEMU (software emulation) and the host side of its agent.

The image comes from build-image.sh (Debian 12, systemd as init, cached). The guest
boots from a copy-on-write view of it (`snapshot=on`: the cached image is never
modified), with no network device at all. Two links to the host:
  - a virtio-serial port, `ksmlab.agent`, to tests/guest/agent.py in the guest, which
    runs one command per request and answers with its exit code and output;
  - a read-only 9p share of one host directory (the packages to install), which
    Guest.mount_share() mounts at /mnt/host.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

HERE = Path(__file__).resolve().parent
SHARE_TAG = "hostshare"
SHARE_MOUNT = "/mnt/host"


@dataclass
class Result:
    argv: Sequence[str]
    rc: int
    out: str
    err: str

    def check(self) -> "Result":
        if self.rc != 0:
            raise AssertionError("guest command %r exited %d\nstdout:\n%s\nstderr:\n%s"
                                 % (list(self.argv), self.rc, self.out, self.err))
        return self


def build_image(env: Optional[Dict[str, str]] = None) -> Path:
    """Build (or find in the cache) the guest image; its directory."""
    p = subprocess.run(["sh", str(HERE / "build-image.sh")], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, universal_newlines=True, timeout=1800,
                       env=env)
    if p.returncode != 0:
        raise RuntimeError("tests/guest/build-image.sh failed:\n" + p.stdout[-6000:])
    return Path(p.stdout.strip().splitlines()[-1])


class Guest:
    def __init__(self, image_dir: Path, workdir: Path, share: Path, memory_mb: int = 1024,
                 cpus: int = 2) -> None:
        self.image_dir = image_dir
        self.workdir = workdir
        self.share = share
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.console = workdir / "console.log"
        self.sock_path = workdir / "agent.sock"
        self.proc: Optional[subprocess.Popen] = None
        self.sock: Optional[socket.socket] = None
        self._buf = b""
        self._next_id = 0
        self.boot_seconds: Optional[float] = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        img = self.image_dir
        argv = [
            "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
            "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(self.cpus),
            "-m", str(self.memory_mb), "-no-reboot",
            "-kernel", str(img / "vmlinuz"), "-initrd", str(img / "initrd.img"),
            "-append", "root=/dev/vda rw console=ttyS0 panic=-1 quiet loglevel=4",
            "-drive", "file=%s,format=raw,if=virtio,snapshot=on,cache=unsafe" % (img / "disk.img"),
            "-serial", "file:%s" % self.console,
            "-device", "virtio-serial-pci",
            "-chardev", "socket,id=agent,path=%s,server=on,wait=off" % self.sock_path,
            "-device", "virtserialport,chardev=agent,name=ksmlab.agent",
            "-virtfs", "local,path=%s,mount_tag=%s,security_model=none,readonly=on"
            % (self.share, SHARE_TAG),
            "-nic", "none",
        ]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, cwd=str(self.workdir))
        self.sock = connect_when_listening(self.sock_path, self.proc, timeout=30)

    def wait_booted(self, timeout: float = 150) -> float:
        """Until the agent answers and systemd reports the boot finished; seconds taken."""
        end = self.t0 + timeout
        while True:
            if time.monotonic() > end:
                raise AssertionError("guest agent did not answer within %ss; console:\n%s"
                                     % (timeout, self.console_text()[-4000:]))
            if self.proc and self.proc.poll() is not None:
                raise AssertionError("qemu exited (%s); console:\n%s"
                                     % (self.proc.returncode, self.console_text()[-4000:]))
            if self._request({}, timeout=3.0) is not None:   # few pings: each one queues until boot
                break
        left = max(5.0, end - time.monotonic())
        r = self.run(["systemctl", "is-system-running", "--wait"], timeout=left)
        if r.out.strip() not in ("running", "degraded"):
            raise AssertionError("guest boot: is-system-running says %r" % r.out)
        self.boot_seconds = time.monotonic() - self.t0
        return self.boot_seconds

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self._request({"argv": ["systemctl", "poweroff"], "timeout": 5}, timeout=5)
                self.proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, OSError):
                pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.sock:
            self.sock.close()
            self.sock = None

    # -- commands ----------------------------------------------------------------------
    def _request(self, req: Dict, timeout: float) -> Optional[Dict]:
        assert self.sock is not None
        self._next_id += 1
        rid = self._next_id
        # Before the guest opens its port QEMU reads nothing: unanswered boot pings queue
        # in the socket. A send may wait for room up to the request's own deadline.
        self.sock.settimeout(max(timeout, 10.0))
        try:
            self.sock.sendall((json.dumps(dict(req, id=rid)) + "\n").encode())
        except socket.timeout:
            raise AssertionError("guest agent: request not taken within %ss (guest not reading); console:\n%s"
                                 % (max(timeout, 10.0), self.console_text()[-4000:])) from None
        end = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if msg.get("id") == rid:
                    return msg
                # an answer to an earlier request we gave up on: drop it
            left = end - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                return None
            if not chunk:
                raise AssertionError("guest agent connection closed; console:\n%s"
                                     % self.console_text()[-4000:])
            self._buf += chunk

    def run(self, argv: Union[str, List[str]], timeout: float = 120, check: bool = False,
            input: str = "", env: Optional[Dict[str, str]] = None) -> Result:
        """Run argv (a list, or a string for `sh -c`) as root in the guest."""
        if isinstance(argv, str):
            argv = ["sh", "-c", argv]
        req = {"argv": list(argv), "timeout": timeout, "input": input, "env": env or {}}
        msg = self._request(req, timeout=timeout + 15)
        if msg is None:
            raise AssertionError("guest command %r: no answer within %ss" % (argv, timeout + 15))
        res = Result(argv, msg["rc"], msg["out"], msg["err"])
        return res.check() if check else res

    def sh(self, script: str, timeout: float = 120) -> str:
        """Run a shell script as root, which must succeed; its stdout."""
        return self.run(script, timeout=timeout, check=True).out

    def write_file(self, path: str, text: str, mode: str = "0644") -> None:
        self.run(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod %s "$1"' % mode,
                  "sh", path], input=text, check=True)

    def read_file(self, path: str) -> str:
        return self.run(["cat", path], check=True).out

    def mount_share(self) -> str:
        self.sh("mkdir -p %s && (mountpoint -q %s || mount -t 9p -o trans=virtio,version=9p2000.L,ro %s %s)"
                % (SHARE_MOUNT, SHARE_MOUNT, SHARE_TAG, SHARE_MOUNT))
        return SHARE_MOUNT


def connect_when_listening(path: Path, proc: subprocess.Popen, timeout: float) -> socket.socket:
    """Connect to a Unix socket the child serves, once it listens.

    QEMU binds the socket before it listens, and a connect in between is refused, so the
    socket file existing is not enough (CI once lost a whole guest module to that gap).
    """
    end = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
        if proc.poll() is not None or time.monotonic() > end:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError("%s did not accept connections within %ss: %s"
                               % (path, timeout, out))
        time.sleep(0.05)
