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
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ksmctl.readings import VmReading, VmSource, VmState
from ksmctl.collectors.procfs import ProcFs

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


class QemuProcScanner:
    """Every QEMU process under `proc` as a VmReading(source=PROC)."""

    def __init__(self, proc: ProcFs) -> None:
        self.proc = proc

    def find(self) -> Iterable[Tuple[int, QemuArgs]]:
        for pid in self.proc.pids():
            argv = self.proc.cmdline(pid)
            if not argv:
                continue  # kernel thread, or gone since the listing
            args = parse_qemu_cmdline(argv)
            if args is not None:
                yield pid, args

    def reading(self, pid: int, args: QemuArgs) -> Optional[VmReading]:
        ksm = self.proc.ksm_stat(pid)
        rss = self.proc.rss_bytes(pid)
        if ksm is None and rss is None:
            return None  # exited between the listing and now
        uuid, name = proc_identity(args, pid)
        return VmReading(uuid=uuid, name=name, state=VmState.RUNNING, pid=pid, source=VmSource.PROC,
                         balloon_maximum=args.memory, rss=rss, ksm=ksm,
                         excluded=args.mem_merge_off)

    def collect(self) -> Tuple[VmReading, ...]:
        out = []
        for pid, args in self.find():
            r = self.reading(pid, args)
            if r is not None:
                out.append(r)
        out.sort(key=lambda r: (r.name, r.uuid))
        return tuple(out)
