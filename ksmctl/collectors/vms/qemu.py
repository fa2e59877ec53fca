"""The one parser of QEMU command lines, and the /proc scanner that finds guests without libvirt.

Everything comes from the command line: the guest name (`-name guest=NAME,...` or
`-name NAME`, `,,` escaping a comma), the UUID (`-uuid`), the memory size (`-m`) and
whether the guest opted out of merging (`-machine ...,mem-merge=off`, or a memory backend
with merge=off). The VM collectors and the estimator's guest names both use it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ksmctl.readings import KsmStat, VmReading, VmSource, VmState
from ksmctl.collectors.pidfiles import Ident
from ksmctl.collectors.procfs import ProcFs, Statm, parse_ksm_stat, split_cmdline

_SUFFIXES = {"": 1 << 20, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def is_qemu_binary(argv0: str) -> bool:
    """qemu-system-<arch> (upstream, Debian, libvirt) or qemu-kvm (RHEL's
    /usr/libexec/qemu-kvm); not qemu-img, qemu-nbd or the like."""
    base = os.path.basename(argv0)
    return base.startswith("qemu-system-") or base == "qemu-kvm"


def _split_opts(value: str) -> List[str]:
    """QEMU option lists: comma-separated, ',,' escapes a literal comma."""
    if ",," not in value:
        return value.split(",")
    parts: List[str] = []
    cur = ""
    i = 0
    while i < len(value):
        c = value[i]
        if c == ",":
            if value[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    parts.append(cur)
    return parts


def _opts(value: str, implied: str) -> Dict[str, str]:
    """'a=1,b=2' -> {'a': '1', 'b': '2'}; a bare first word is the `implied` key."""
    out: Dict[str, str] = {}
    for n, part in enumerate(_split_opts(value)):
        key, sep, val = part.partition("=")
        if not sep:
            if n == 0:
                out[implied] = part
            continue
        out[key] = val
    return out


def _size(text: str) -> Optional[int]:
    """-m sizes: plain numbers are MiB; k/M/G/T suffixes; 'b' for bytes."""
    text = text.strip().lower()
    unit = text[-1:] if text[-1:] in _SUFFIXES else ""
    try:
        return int(float(text[:-1] if unit else text) * _SUFFIXES[unit])
    except ValueError:
        return None


@dataclass(frozen=True)
class QemuArgs:
    name: Optional[str]
    uuid: Optional[str]
    memory: Optional[int]  # bytes, from -m
    mem_merge_off: bool


def parse_qemu_cmdline(argv: Sequence[str]) -> Optional[QemuArgs]:
    """None unless argv is a QEMU process (is_qemu_binary). `-opt` and `--opt` alike;
    a later option wins, as in QEMU."""
    if not argv or not is_qemu_binary(argv[0]):
        return None
    name = uuid = None
    memory = None
    merge_off = False
    i = 1
    while i < len(argv):
        arg = argv[i]
        opt = arg[1:] if arg.startswith("--") else arg
        val = argv[i + 1] if i + 1 < len(argv) else ""
        if opt == "-name":
            o = _opts(val, "guest")
            name = o.get("guest") or None
            i += 2
        elif opt == "-uuid":
            uuid = val.lower() or None
            i += 2
        elif opt == "-m":
            o = _opts(val, "size")
            memory = _size(o["size"]) if o.get("size") else None
            i += 2
        elif opt in ("-machine", "-M"):
            if _opts(val, "type").get("mem-merge", "on") in ("off", "no", "false"):
                merge_off = True
            i += 2
        elif opt == "-object":
            if _backend_merge_off(val):
                merge_off = True
            i += 2
        else:
            i += 1
    return QemuArgs(name=name, uuid=uuid, memory=memory, mem_merge_off=merge_off)


def _backend_merge_off(val: str) -> bool:
    """A guest RAM backend with merge off (libvirt writes -object as JSON since 7.x)."""
    if val.startswith("{"):
        try:
            obj = json.loads(val)
        except ValueError:
            return False
        return (isinstance(obj, dict) and str(obj.get("qom-type", "")).startswith("memory-backend")
                and obj.get("merge") in (False, "off"))
    o = _opts(val, "qom-type")
    return o.get("qom-type", "").startswith("memory-backend") and o.get("merge") in ("off", "no", "false")


def proc_identity(args: QemuArgs, pid: int) -> Tuple[str, str]:
    """(uuid, name). Without -uuid the only stable handle is the process: 'pid:<pid>'."""
    uuid = args.uuid or "pid:%d" % pid
    return uuid, args.name or "qemu-%d" % pid


class Derived:
    """What a tick derives from one guest's raw figures, kept for the next: ksm_stat is
    parsed only when its bytes differ, and the VmReading is rebuilt only when one of its
    inputs does. An unchanged guest then yields the very same VmReading object, which the
    metrics and the state file cache their rendering by (a new figure is a new object)."""

    ksm_raw: Optional[bytes] = None
    ksm: Optional[KsmStat] = None
    reading_key: object = None
    reading: Optional[VmReading] = None

    statm_raw: Optional[bytes] = None
    statm: Optional[Statm] = None

    def statm_from(self, raw: Optional[bytes], proc: ProcFs) -> Optional[Statm]:
        """statm, parsed only when its bytes change."""
        if raw != self.statm_raw:
            self.statm_raw, self.statm = raw, proc.statm(raw)
        return self.statm

    def ksm_stat(self, raw: Optional[bytes]) -> Optional[KsmStat]:
        if raw is None:
            return None
        if raw != self.ksm_raw or self.ksm is None:
            self.ksm_raw, self.ksm = raw, parse_ksm_stat(raw.decode("ascii", "replace"))
        return self.ksm

    def reading_for(self, key: object, build: Callable[[], VmReading]) -> VmReading:
        if self.reading is None or key != self.reading_key:
            self.reading_key, self.reading = key, build()
        return self.reading


class _Proc(Derived):
    """A QEMU process the scanner found: its command line as read, as parsed, and the
    identity of its ksm_stat (while that holds, the command line is not read again)."""

    def __init__(self, argv_raw: bytes, args: QemuArgs) -> None:
        self.argv_raw = argv_raw
        self.args = args
        self.ident: Optional[Ident] = None


def _argv0_is_qemu(raw: bytes) -> bool:
    return is_qemu_binary(raw.split(b"\0", 1)[0].decode("utf-8", "replace"))


class QemuProcScanner:
    """Every QEMU process under `proc` as a VmReading(source=PROC).

    Per tick: the pid list; for a known QEMU process, one read of its kept-open ksm_stat
    (and statm), which also proves the pid is still that process; for every other
    process, its command line (a process may exec QEMU any time: never cached as "not
    QEMU"). A command line is parsed again only when its bytes change."""

    def __init__(self, proc: ProcFs) -> None:
        self.proc = proc
        self._files = proc.kept_files()
        self._known: Dict[int, _Proc] = {}

    def collect(self) -> Tuple[VmReading, ...]:
        out: List[VmReading] = []
        known, self._known = self._known, {}
        for pid in self.proc.pids():
            entry = known.pop(pid, None)
            got = self._files.read(pid, "ksm_stat") if entry is not None else None
            if entry is None or got is None or got[1] != entry.ident:
                raw = self.proc.cmdline_bytes(pid)
                if not raw or not _argv0_is_qemu(raw):
                    if entry is not None:
                        self._files.release(pid)
                    continue  # kernel thread, gone since the listing, or not QEMU
                if entry is None or entry.argv_raw != raw:
                    args = parse_qemu_cmdline(split_cmdline(raw))
                    if args is None:
                        continue
                    entry = _Proc(raw, args)
                if got is None:
                    got = self._files.read(pid, "ksm_stat")
                entry.ident = got[1] if got is not None else None
            r = self._reading(pid, entry, got[0] if got is not None else None)
            if r is not None:
                self._known[pid] = entry
                out.append(r)
        for pid in known:  # exited, or no longer QEMU
            self._files.release(pid)
        out.sort(key=lambda r: (r.name, r.uuid))
        return tuple(out)

    def _reading(self, pid: int, entry: _Proc, ksm_raw: Optional[bytes]) -> Optional[VmReading]:
        ksm = entry.ksm_stat(ksm_raw)
        # Read right after ksm_stat proved the pid is this process (unless it has none).
        statm = entry.statm_from(self._files.read_bytes(pid, "statm", verify=entry.ident is None), self.proc)
        if ksm is None and statm is None:
            return None  # exited between the listing and now
        args = entry.args

        def build() -> VmReading:
            uuid, name = proc_identity(args, pid)
            return VmReading(uuid=uuid, name=name, state=VmState.RUNNING, pid=pid, source=VmSource.PROC,
                             balloon_maximum=args.memory, rss=statm.resident if statm else None,
                             anon_rss=statm.anon if statm else None, ksm=ksm, excluded=args.mem_merge_off)
        return entry.reading_for((ksm, statm), build)

    def close(self) -> None:
        self._files.close()
        self._known.clear()
