"""Where ksmd puts a process that starts while it holds pages, on the real kernel.

The adaptive strategy's resume rule (policy/strategies/adaptive/resume.py) counts one
pass more when guests start while ksmd is part-way through a pass. mm/ksm.c
`__ksm_enter` inserts a new process just behind the scanning cursor, so the first pass
boundary after it starts ends a pass that never saw it. After a pass and an idle crawl
the cursor sits in the first process, so the new one becomes the start of ksmd's list.
That is also why the check after the growth phase's passes scans the newest guests
(bench/README.md, "Why min_pass_yield is 0.2"). This test holds both facts: the new
process has no rmap items when the next boundary comes, and it is the first process
scanned after that boundary."""
from __future__ import annotations

import time

import pytest

from tests.ksmlock import KSM, ksm_exclusive
from tests.mergeable import Holder
from tests.support import need_root

pytestmark = pytest.mark.kernel

PAGES = 4096   # 16 MiB per process


def _read(name: str) -> int:
    return int((KSM / name).read_text())


def _write(name: str, value: int) -> None:
    (KSM / name).write_text(str(value))


def _rmap_items(pid: int) -> int:
    """ksm_rmap_items in /proc/PID/ksm_stat: the pages of it ksmd has seen."""
    for line in open("/proc/%d/ksm_stat" % pid):
        if line.startswith("ksm_rmap_items"):
            return int(line.split()[1])
    raise AssertionError("/proc/%d/ksm_stat has no ksm_rmap_items on this kernel" % pid)


def _until(cond, deadline_s: float, what: str, poll_s: float = 0.005):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(poll_s)
    raise AssertionError("not within %gs: %s" % (deadline_s, what))


def test_a_process_that_starts_after_a_pass_is_first_in_ksmds_list():
    need_root()
    with ksm_exclusive():
        _write("run", 0)
        with Holder(PAGES, 64, count=2) as old:
            _write("pages_to_scan", 100)   # 10k pages/s: a pass of 0.8 s, 0.4 s in the first process
            _write("sleep_millisecs", 10)
            _write("run", 1)
            start = _read("full_scans")
            _until(lambda: _read("full_scans") >= start + 2, 60, "two passes over the first two processes")
            assert all(_rmap_items(p.pid) == PAGES for p in old.procs)
            # The idle crawl: the cursor moves into the first process and stays there.
            _write("pages_to_scan", 10)
            _write("sleep_millisecs", 100)
            time.sleep(0.5)
            with Holder(PAGES, 64) as new:
                pid = new.procs[0].pid
                boundary = _read("full_scans")
                # A steady pace: the rest of the list takes seconds, the new process 2 s.
                _write("pages_to_scan", 20)
                _write("sleep_millisecs", 10)

                def at_boundary():
                    return _read("full_scans") > boundary and (_read("pages_scanned"), _rmap_items(pid))
                scanned_at, seen_at = _until(at_boundary, 60, "the next pass boundary")
                assert seen_at == 0, "ksmd saw the new process before the boundary: %d rmap items" % seen_at
                # The first pages ksmd scans after the boundary are the new process's.
                _until(lambda: _rmap_items(pid) > 0, 30, "ksmd reaching the new process")
                since = _read("pages_scanned") - scanned_at
                assert since < PAGES // 4, "%d pages scanned after the boundary before the new process" % since
                _until(lambda: _rmap_items(pid) == PAGES, 30, "ksmd scanning the whole new process")
                assert _read("full_scans") == boundary + 1, "the new process was scanned in the next pass"
