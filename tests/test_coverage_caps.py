"""The coverage reading with the shipped unit's capabilities, on the real /proc.

The unit runs the daemon as root with only CAP_DAC_READ_SEARCH (systemd/ksmctl.service).
That reads another user's 0400 ksm_stat, but smaps is a ptrace-mode read: without
CAP_SYS_PTRACE the kernel refuses it for a process of another user, as QEMU is under
libvirt (libvirt-qemu, qemu). The reading must then say unreadable (the policy keeps the
pass more and says why), not count the process as seen, and not fail the tick. With
every capability, as on this lab where QEMU runs as root, the same process reads whole."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import need_root, need_tool

REPO = Path(__file__).resolve().parent.parent
PAGES = 512

# A process of another user holding mergeable memory, with nothing from this tree: the
# test's checkout may sit where that user cannot read.
HOLDER = """
import mmap, sys
m = mmap.mmap(-1, %d * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(%d):
    m[i * mmap.PAGESIZE] = 1 + i %% 7
m.madvise(mmap.MADV_MERGEABLE)
print("ready", flush=True)
sys.stdin.read()
""" % (PAGES, PAGES)

READ = """
import json, sys
from ksmctl.collectors.coverage import CoverageCollector
from ksmctl.collectors.procfs import ProcFs
pid = int(sys.argv[1])
proc = ProcFs()
c = CoverageCollector(proc).read({pid: proc.statm_bytes(pid).anon}, {})
print(json.dumps(None if c is None else vars(c)))
"""


def _read(pid: int, *prefix: str):
    p = subprocess.run([*prefix, sys.executable, "-c", READ, str(pid)], capture_output=True, text=True,
                       timeout=60, cwd=str(REPO))
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    return json.loads(p.stdout)


def test_the_shipped_units_capabilities_read_another_users_qemu_as_unreadable():
    need_root()
    need_tool("setpriv")
    holder = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                               "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert holder.stdout.readline().strip() == "ready"
        unit = _read(holder.pid, "setpriv", "--bounding-set", "-all,+dac_read_search", "--inh-caps", "-all")
        assert unit is not None and (unit["processes"], unit["unreadable"]) == (0, 1), unit
        full = _read(holder.pid)
        assert full is not None and (full["processes"], full["unreadable"]) == (1, 0), full
        assert full["mergeable_pages"] >= PAGES and 0 <= full["unseen_pages"] <= full["mergeable_pages"], full
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
