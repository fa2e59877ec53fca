"""Where ksmd puts a process that starts while it holds pages, on the real kernel.

The adaptive strategy's resume rule (policy/strategies/adaptive/resume.py) counts one
pass more when guests start while ksmd is part-way through a pass. mm/ksm.c
`__ksm_enter` inserts a new process just behind the scanning cursor, so the first pass
boundary after it starts ends a pass that never saw it. Early in a pass (as after an
idle crawl) the cursor is in the first process, so the new one becomes the start of
ksmd's list. That is also why the check after the growth phase's passes scans the newest
guests (bench/README.md, "Why min_pass_yield is 0.2"). This test holds both facts: a
process that registers just after a boundary has no rmap items at the next one, and it
is the first process scanned after that. Other mergeable processes on the host (a lab
guest) are part of ksmd's list too: the pace is set from the list's measured size.

It also holds that the daemon's coverage reading (collectors/coverage.py) tells the two
cases apart on the real kernel: processes ksmd has passed over read as seen, and the
newcomer at that boundary as unseen, until ksmd has scanned it."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from ksmctl.collectors.coverage import CoverageCollector
from ksmctl.collectors.procfs import ProcFs, parse_ksm_stat
from tests.ksmlock import KSM, ksm_exclusive
from tests.mergeable import Holder, release
from tests.support import need_root, wait_for

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.kernel

PAGES = 4096   # 16 MiB per process of ours
POLL = 0.005


def _read(name: str) -> int:
    return int((KSM / name).read_text())


def _write(name: str, value: int) -> None:
    (KSM / name).write_text(str(value))


def _rmap_items(pid: int) -> int:
    """ksm_rmap_items in /proc/PID/ksm_stat: the pages of it ksmd has seen."""
    with open("/proc/%d/ksm_stat" % pid) as f:
        items = parse_ksm_stat(f.read()).rmap_items
    assert items is not None, "/proc/%d/ksm_stat has no ksm_rmap_items on this kernel" % pid
    return items


def _coverage(pids):
    """The daemon's reading for these processes, each counted as grown from nothing."""
    proc = ProcFs()
    anon = {pid: proc.statm_bytes(pid).anon for pid in pids}
    reading = CoverageCollector(proc).read(anon, {})
    assert reading is not None, "no coverage reading on this kernel (ksm_rmap_items needs Linux 6.1)"
    return reading


def _boundary(after: int, deadline_s: float, what: str) -> int:
    """Waits for full_scans to pass `after`; pages_scanned at that moment."""
    def crossed():
        return _read("full_scans") > after and _read("pages_scanned")
    return wait_for(crossed, deadline_s, what, interval=POLL)


def test_a_process_that_starts_early_in_a_pass_is_first_in_ksmds_list():
    need_root()
    with ksm_exclusive():
        _write("run", 0)
        late = subprocess.Popen([sys.executable, "-m", "tests.mergeable", str(PAGES), "64", "late"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(REPO))
        try:
            assert late.stdout.readline().strip() == "filled"
            with Holder(PAGES, 64, count=2) as holders:
                # Two passes at speed; the second measures ksmd's whole list (ours and any other).
                _write("sleep_millisecs", 10)
                _write("pages_to_scan", 2000)
                _write("run", 1)
                fs = _read("full_scans")
                first = _boundary(fs, 120, "a first pass boundary")
                second = _boundary(fs + 1, 120, "a second pass boundary")
                listed = max(second - first, 2 * PAGES)
                held = _coverage(holders.pids)
                assert held.processes == 2 and held.mergeable_pages >= 2 * PAGES, held
                assert held.unseen_pages <= 2 * PAGES // 100, "ksmd passed over the holders twice: %r" % (held,)
                # A pass in about 4 s, at least 2000 pages/s: our first process takes 1 s or more.
                rate = max(2000.0, listed / 4.0)
                batch = int(math.ceil(rate / 100))   # pages per 10 ms
                _write("pages_to_scan", batch)
                fs = _read("full_scans")
                started = _boundary(fs, 30, "the boundary that starts a paced pass")
                # Until ksmd's next batch the cursor is the list head, where a newcomer would
                # go to the end: wait for the pass to be under way, in the first process.
                wait_for(lambda: _read("pages_scanned") >= started + batch, 5, "the paced pass under way",
                         interval=POLL)
                late.stdin.write("go\n")
                late.stdin.flush()
                assert late.stdout.readline().startswith("ready")
                joined = _read("full_scans")
                at = _boundary(joined, 30, "the boundary after the new process joined")
                assert _rmap_items(late.pid) == 0, "ksmd saw the new process in the pass it joined"
                behind = _coverage([late.pid])
                assert behind.processes == 1 and behind.mergeable_pages >= PAGES, behind
                assert behind.unseen_pages >= behind.mergeable_pages // 2, behind   # ksmd reaches it next
                # The first pages ksmd scans after that boundary are the new process's.
                wait_for(lambda: _rmap_items(late.pid) > 0, 30, "ksmd reaching the new process", interval=POLL)
                since = _read("pages_scanned") - at
                slack = rate * 4 * POLL   # the poll's own granularity
                assert since < PAGES // 4 + slack, "%d pages scanned after the boundary before the new process" % since
                wait_for(lambda: _rmap_items(late.pid) == PAGES, 30, "ksmd scanning the whole new process",
                         interval=POLL)
                assert _read("full_scans") == joined + 1, "the new process was scanned in the next pass"
                seen = _coverage([late.pid])
                assert seen.unseen_pages <= PAGES // 100 and seen.rmap_items >= PAGES, seen
        finally:
            release([late])
