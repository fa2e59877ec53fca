"""A real libvirt + QEMU lab on this host: virtlogd, libvirtd and small software-emulated guests.

The per-VM side of ksmctl is only worth trusting if it has seen real QEMU processes merged
by the real ksmd, tied to real libvirt domains. This module brings that up the way
HOST-LAB.md describes (no systemd here, so the daemons are started by hand), reuses daemons
that are already running, and tears down by pid exactly what it started.
"""
from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from tests.support import wait_for

LAB_DIR = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("KSMCTL_LAB_CACHE", "/var/cache/ksmctl-lab"))
URI = "qemu:///system"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
QEMU_CONF_SETTINGS = (
    ("user", '"root"'), ("group", '"root"'), ("dynamic_ownership", "0"), ("security_driver", '"none"'),
)
READY_MARKER = "KSMLAB-READY"
BOOT_MARKER = "KSMLAB-INIT"
MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
           "virtio_pci", "virtio_balloon")

# How every lab and bench guest's busybox init begins: the basic mounts, output on the
# serial console, and BOOT_MARKER.
INIT_PREAMBLE = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
exec >/dev/console 2>&1
echo KSMLAB-INIT
"""

# The guest init: the same shared_mb in every guest (mergeable across guests), then
# unique_mb that differs per guest (never mergeable), both in tmpfs, which lives in guest
# RAM and so in QEMU's anonymous, mergeable memory. Loads virtio_balloon so the guest
# reports its free memory. Prints READY_MARKER on the serial console when done.
INIT_SCRIPT = INIT_PREAMBLE + r"""for m in %(modules)s; do insmod /lib/modules/$m.ko || echo "KSMLAB-NOMOD $m"; done
SEED=0
for w in $(cat /proc/cmdline); do
    case "$w" in ksmlab.seed=*) SEED=${w#ksmlab.seed=} ;; esac
done
mount -t tmpfs -o size=%(tmpfs_mb)dm tmpfs /mnt
# Shared: copies of the busybox binary, identical in every guest. Its size is not a
# multiple of the page size, so successive copies are shifted and their pages differ.
i=0
while [ $i -lt %(shared_copies)d ]; do cat /bin/busybox; i=$((i + 1)); done > /mnt/shared
# Unique: random bytes, so no page matches another guest's (or any other page).
dd if=/dev/urandom of=/mnt/unique bs=65536 count=%(unique_blocks)d 2>/dev/null
sync
echo "KSMLAB-READY seed=$SEED"
while true; do sleep 3600; done
"""


def _run(argv: List[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, timeout=timeout, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True)


def pid_alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0): look at its state.
    try:
        stat = Path("/proc/%d/stat" % pid).read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return False


def read_pidfile(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _proc_is(pid: int, binary: str) -> bool:
    try:
        argv0 = Path("/proc/%d/cmdline" % pid).read_bytes().split(b"\0")[0].decode()
    except (OSError, IndexError, UnicodeDecodeError):
        return False
    return os.path.basename(argv0) == binary


def kill_pid(pid: int, timeout: float = 20.0, sig: int = signal.SIGTERM) -> None:
    """Signal one process we started and wait until it is gone (SIGKILL after timeout)."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not pid_alive(pid):
            _reap(pid)
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    end = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < end:
        time.sleep(0.05)
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def ensure_kernel() -> Path:
    """The guest kernel from the distribution's package, fetched once into CACHE."""
    if not (CACHE / "vmlinuz").exists() or not (CACHE / "modules").is_dir():
        out = _run(["sh", str(LAB_DIR / "get-kernel.sh")], check=False, timeout=600)
        if out.returncode != 0:
            raise RuntimeError("lab: tests/lab/get-kernel.sh failed:\n" + out.stdout)
    return CACHE / "vmlinuz"


def build_initramfs(dest: Path, shared_mb: int = 48, unique_mb: int = 8, tmpfs_mb: int = 100,
                    init: Optional[str] = None, add_files: Optional[Callable[[Path], None]] = None,
                    compress: bool = True) -> Path:
    """A gzip'd newc cpio of busybox-static plus INIT_SCRIPT, built from the host's packages
    at test time so no binary is ever committed. Sizes are approximate MiB of text.

    init: another init script instead of INIT_SCRIPT (the sizes are then unused);
    add_files(root): puts more files into the tree before it is archived; compress=False
    writes a plain cpio (the kernel unpacks it without decompressing, much faster under
    software emulation for a large initramfs)."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        raise RuntimeError("lab: busybox (Debian busybox-static) is not installed")
    root = Path(tempfile.mkdtemp(prefix="initramfs.", dir=str(dest.parent)))
    try:
        for d in ("bin", "dev", "proc", "sys", "mnt", "tmp", "lib/modules"):
            (root / d).mkdir(parents=True)
        shutil.copy2(busybox, root / "bin" / "busybox")
        for ko in (CACHE / "modules").glob("*.ko"):
            shutil.copy2(ko, root / "lib" / "modules" / ko.name)
        copies = max(1, int(shared_mb * 1024 * 1024 / os.path.getsize(busybox)))
        if init is None:
            init = INIT_SCRIPT % {
                "modules": " ".join(MODULES), "tmpfs_mb": tmpfs_mb,
                "shared_copies": copies, "unique_blocks": unique_mb * 16,
            }
        (root / "init").write_text(init)
        if add_files is not None:
            add_files(root)
        os.chmod(root / "init", 0o755)
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        archive = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc"], cwd=str(root),
                                 input=("\n".join(names) + "\n").encode(), stdout=subprocess.PIPE,
                                 check=True).stdout
        if compress:
            with gzip.open(str(dest), "wb", compresslevel=1) as f:
                f.write(archive)
        else:
            dest.write_bytes(archive)
    finally:
        shutil.rmtree(str(root), ignore_errors=True)
    return dest


@dataclass
class Guest:
    name: str
    uuid: str
    serial_log: Path
    nosharepages: bool = False
    pid: Optional[int] = None

    def serial(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace")
        except OSError:
            return ""

    def ready(self) -> bool:
        return READY_MARKER in self.serial()


def domain_xml(name: str, uuid: str, kernel: Path, initrd: Path, serial_log: Path, seed: int,
               memory_mib: int = 256, nosharepages: bool = False, memory_backing: str = "",
               cmdline_extra: str = "") -> str:
    """memory_backing: the inner XML of <memoryBacking> (e.g. "<hugepages/><source type='memfd'/>");
    cmdline_extra: more words for the guest kernel's command line (read by a custom init)."""
    inner = memory_backing + ("<nosharepages/>" if nosharepages else "")
    backing = "<memoryBacking>%s</memoryBacking>" % inner if inner else ""
    return """<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>{mem}</memory>
  <currentMemory unit='MiB'>{mem}</currentMemory>
  {backing}
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet loglevel=3 ksmlab.seed={seed}{extra}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'>
      <source path='{serial}'/>
      <target port='0'/>
    </serial>
    <memballoon model='virtio'>
      <stats period='2'/>
    </memballoon>
  </devices>
</domain>
""".format(name=name, uuid=uuid, mem=memory_mib, backing=backing, kernel=kernel, initrd=initrd,
           seed=seed, serial=serial_log, extra=(" " + cmdline_extra) if cmdline_extra else "")


@dataclass
class Lab:
    """One lab session. `start()` is idempotent; `stop()` undoes only what this object did."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ksmctl-lab.")))
    prefix: str = field(default_factory=lambda: "ksmlab%d" % os.getpid())
    run_root: Path = Path("/run")
    started_virtlogd: Optional[int] = None
    started_libvirtd: Optional[int] = None
    guests: Dict[str, Guest] = field(default_factory=dict)
    kernel: Optional[Path] = None
    initrd: Optional[Path] = None
    _seed: int = 0
    _conn: object = None

    # ---- daemons -------------------------------------------------------------------
    @staticmethod
    def prepare_host() -> None:
        """What the QEMU driver needs without systemd (HOST-LAB.md): users, qemu.conf, dirs."""
        for group in ("kvm", "libvirt-qemu"):
            if _run(["getent", "group", group], check=False).returncode != 0:
                _run(["groupadd", "-r", group])
        if _run(["getent", "passwd", "libvirt-qemu"], check=False).returncode != 0:
            _run(["useradd", "-r", "-g", "libvirt-qemu", "-G", "kvm", "-d", "/var/lib/libvirt",
                  "-s", "/usr/sbin/nologin", "libvirt-qemu"])
        text = QEMU_CONF.read_text() if QEMU_CONF.exists() else ""
        lines = text.splitlines()
        changed = False
        for key, value in QEMU_CONF_SETTINGS:
            want = "%s = %s" % (key, value)
            hits = [i for i, l in enumerate(lines) if l.split("=", 1)[0].strip() == key]
            if hits and all(lines[i].strip() == want for i in hits):
                continue
            lines = [l for l in lines if l.split("=", 1)[0].strip() != key] + [want]
            changed = True
        if changed:
            QEMU_CONF.parent.mkdir(parents=True, exist_ok=True)
            QEMU_CONF.write_text("\n".join(lines) + "\n")
        for d in ("/var/log/libvirt/qemu", "/var/lib/libvirt/qemu", "/var/cache/libvirt/qemu"):
            Path(d).mkdir(parents=True, exist_ok=True)
        # libvirt looks for a hugetlbfs mount when its QEMU driver starts, and refuses
        # <hugepages/> guests without one (systemd mounts /dev/hugepages on real hosts).
        if " hugetlbfs " not in Path("/proc/mounts").read_text():
            Path("/dev/hugepages").mkdir(exist_ok=True)
            _run(["mount", "-t", "hugetlbfs", "hugetlbfs", "/dev/hugepages"])

    def libvirtd_pid(self) -> Optional[int]:
        pid = read_pidfile(self.run_root / "libvirtd.pid")
        return pid if pid and pid_alive(pid) and _proc_is(pid, "libvirtd") else None

    def virtlogd_pid(self) -> Optional[int]:
        pid = read_pidfile(self.run_root / "virtlogd.pid")
        return pid if pid and pid_alive(pid) and _proc_is(pid, "virtlogd") else None

    def libvirt_answers(self) -> bool:
        import libvirt
        try:
            c = libvirt.openReadOnly(URI)
        except libvirt.libvirtError:
            return False
        try:
            c.getVersion()
            return True
        except libvirt.libvirtError:
            return False
        finally:
            c.close()

    def start_daemons(self) -> None:
        self.prepare_host()
        if self.virtlogd_pid() is None:
            _run(["virtlogd", "-d"])
            pid = wait_for(self.virtlogd_pid, 20, "virtlogd to write its pid file")
            self.started_virtlogd = pid
        self.start_libvirtd()

    def start_libvirtd(self) -> int:
        pid = self.libvirtd_pid()
        if pid is None:
            _run(["libvirtd", "-d"])
            pid = wait_for(self.libvirtd_pid, 30, "libvirtd to write its pid file")
            # We own whatever libvirtd runs from now on (it may replace one we killed).
            self.started_libvirtd = pid
        wait_for(self.libvirt_answers, 30, "libvirtd to answer on " + URI)
        self._conn = None
        return pid

    def kill_libvirtd(self, sig: int = signal.SIGKILL) -> None:
        """Used by tests to take libvirtd away under a running collector; guests keep running."""
        pid = self.libvirtd_pid()
        if pid is not None:
            self._drop_conn()
            kill_pid(pid, sig=sig)
            if self.started_libvirtd is None:
                # The one we kill was not ours; the one start_libvirtd() brings back is ours
                # to keep running at the end (it stands in for the original).
                self.started_libvirtd = -1

    # ---- guests --------------------------------------------------------------------
    def conn(self):
        import libvirt
        if self._conn is None:
            self._conn = libvirt.open(URI)
        return self._conn

    def _drop_conn(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    def prepare_guest_files(self) -> None:
        if self.kernel is None:
            self.kernel = ensure_kernel()
        if self.initrd is None:
            self.initrd = build_initramfs(self.workdir / "initramfs.cpio.gz")

    def start_guest(self, nosharepages: bool = False, memory_mib: int = 256, memory_backing: str = "",
                    tag: str = "", cmdline_extra: str = "") -> Guest:
        self.prepare_guest_files()
        self._seed += 1
        name = "%s-%d%s%s" % (self.prefix, self._seed, "-noshare" if nosharepages else "", "-" + tag if tag else "")
        guest = Guest(name=name, uuid=str(uuidlib.uuid4()),
                      serial_log=self.workdir / (name + ".serial.log"), nosharepages=nosharepages)
        xml = domain_xml(name, guest.uuid, self.kernel, self.initrd, guest.serial_log, self._seed,
                         memory_mib=memory_mib, nosharepages=nosharepages, memory_backing=memory_backing,
                         cmdline_extra=cmdline_extra)
        (self.workdir / (name + ".xml")).write_text(xml)
        self.guests[name] = guest
        self.conn().createXML(xml, 0)  # transient: gone for good once destroyed
        guest.pid = wait_for(lambda: read_pidfile(self.run_root / "libvirt/qemu" / (name + ".pid")),
                             30, "the pid file of " + name)
        return guest

    def wait_ready(self, guests: List[Guest], timeout: float = 300) -> None:
        for g in guests:
            try:
                wait_for(g.ready, timeout, "guest %s to print %s" % (g.name, READY_MARKER), 0.2)
            except AssertionError as e:  # wait_for's timeout: add what the guest printed
                raise RuntimeError("%s\nserial log tail:\n%s" % (e, g.serial()[-2000:])) from None

    def destroy_guest(self, guest: Guest) -> None:
        import libvirt
        try:
            self.conn().lookupByUUIDString(guest.uuid).destroy()
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                self._drop_conn()
        if guest.pid and pid_alive(guest.pid) and _proc_is(guest.pid, "qemu-system-x86_64"):
            kill_pid(guest.pid)  # libvirtd is gone or refused: take the QEMU process down ourselves
        self.guests.pop(guest.name, None)

    # ---- all -----------------------------------------------------------------------
    def stop(self) -> None:
        if self.guests and self.libvirtd_pid() is None:
            try:
                self.start_libvirtd()
            except Exception:
                pass
        for g in list(self.guests.values()):
            try:
                self.destroy_guest(g)
            except Exception:
                if g.pid and pid_alive(g.pid):
                    kill_pid(g.pid)
        self._drop_conn()
        if self.started_libvirtd is not None and self.started_libvirtd != -1:
            pid = self.libvirtd_pid()
            if pid is not None:
                kill_pid(pid)
        if self.started_virtlogd is not None and self.virtlogd_pid() == self.started_virtlogd:
            kill_pid(self.started_virtlogd)
        shutil.rmtree(str(self.workdir), ignore_errors=True)
