#!/usr/bin/env python3
"""Can the daemon tell that ksmd has looked at all of a guest's memory? A probe on real
QEMU guests (the real-guest bench's, under libvirt).

The adaptive policy counts a pass more when mergeable memory grows while ksmd is part-way
through a pass, since the growth may lie behind its cursor (bench/README.md, "Real guests
with park, against ksmtuned"). Where the growth was in fact seen, that pass is wasted.
Whether it was seen is a matter of each process's ksm_rmap_items (pages ksmd holds an
rmap item for, i.e. has looked at) against the pages it could look at. This probe boots
guests, lets them load, and prints, for every QEMU, before KSM runs and after two full
passes: resident anonymous memory (statm), the Anonymous pages of its mergeable mappings
(smaps, `VmFlags: mg`) and of the rest, and ksm_rmap_items.

    sudo .venv/bin/python bench/coverage_probe.py [--guests 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ksm_bench import controllers as ctl  # noqa: E402
from bench.ksm_bench.guests import GuestPool, default_guest_workload  # noqa: E402
from ksmctl.collectors.memlayout import parse_smaps  # noqa: E402
from ksmctl.collectors.procfs import ProcFs  # noqa: E402
from tests.ksmlock import KSM, ksm_exclusive  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def reading(pid: int, proc: Optional[ProcFs] = None) -> Dict[str, int]:
    """In pages; the process must be alive (a probe of our own guests)."""
    proc = proc or ProcFs()
    statm, stat, smaps = proc.statm_bytes(pid), proc.ksm_stat(pid), proc.smaps(pid)
    if statm is None or stat is None or smaps is None:
        raise SystemExit("process %d is gone, or this kernel has no /proc/<pid>/ksm_stat (Linux 6.1+)" % pid)
    maps = parse_smaps(smaps)
    mg = sum(m.anon for m in maps if m.mergeable)
    other = sum(m.anon for m in maps if not m.mergeable)
    return {"statm_anon": statm.anon // PAGE, "mg": mg // PAGE, "other": other // PAGE, "rmap": stat.rmap_items or 0}


def show(title: str, pids: List[int]) -> None:
    print(title)
    print("| QEMU pid | statm anon pages | mg Anonymous pages | other Anonymous MiB | ksm_rmap_items | "
          "mg - rmap | statm - rmap |")
    print("|---|---|---|---|---|---|---|")
    for pid in pids:
        r = reading(pid)
        print("| %d | %d | %d | %.1f | %d | %d | %d |" % (
            pid, r["statm_anon"], r["mg"], r["other"] * PAGE / 2**20, r["rmap"], r["mg"] - r["rmap"],
            r["statm_anon"] - r["rmap"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--guests", type=int, default=2)
    a = ap.parse_args()
    wl = default_guest_workload()
    with ksm_exclusive():
        ctl.kernel_reset()
        pool = GuestPool(wl)
        pool.start()
        guests = []
        try:
            guests = pool.boot(wl.guests[:a.guests], "probe")
            pool.wait_ready(guests, 300)
            pids = [int(g.pid) for g in guests]  # type: ignore[arg-type]
            show("Loaded, KSM off:", pids)
            start = int((KSM / "full_scans").read_text())
            for k, v in (("pages_to_scan", 100000), ("sleep_millisecs", 10), ("run", 1)):
                (KSM / k).write_text(str(v))
            end = time.monotonic() + 300
            while int((KSM / "full_scans").read_text()) < start + 2:
                if time.monotonic() > end:
                    print("ksmd did not finish two passes in 300 s", file=sys.stderr)
                    return 1
                time.sleep(0.05)
            (KSM / "pages_to_scan").write_text("0")
            show("\nAfter two full passes (full_scans %s):" % (KSM / "full_scans").read_text().strip(), pids)
        finally:
            pool.destroy(guests)
            pool.stop()
            ctl.kernel_reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
