"""A short run of bench/unstable_tree_probe.py on the real KSM (small sizes), to keep it
working and to hold what its comparison rests on: with no rewrites, or rewrites of the
pages' last bytes only, two passes merge every pair. (What header rewrites cost is a
probability; the bench prints it, the test does not judge it.)"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.support import need_root

ROOT = Path(__file__).resolve().parent.parent


def test_probe_merges_every_pair_when_no_header_is_rewritten():
    need_root()
    done = subprocess.run([sys.executable, str(ROOT / "bench/unstable_tree_probe.py"), "--pairs", "2000",
                           "--unique", "6000", "--rate", "20000", "--repeats", "1"],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for way in ("none", "tail"):
        assert re.search(r"^  %s run 1: 2000 of 2000 pairs merged \(0\.0%% missed\)" % way, out, re.M), out
    assert re.search(r"^  head run 1: \d+ of 2000 pairs merged", out, re.M), out
    assert re.search(r"^head\s+\| [\d.]+%$", out, re.M), out


def test_coverage_probe_counts_what_ksmd_looked_at():
    """bench/coverage_probe.py's reading on a real process: its mergeable mapping's
    Anonymous pages, and after two full passes as many rmap items; nothing before."""
    need_root()
    from bench.coverage_probe import reading
    from tests.ksmlock import KSM, ksm_exclusive
    from tests.mergeable import Holder
    from tests.support import wait_for

    pages = 4096
    with ksm_exclusive(), Holder(pages=pages, distinct=pages) as h:
        pid = h.pids[0]
        before = reading(pid)
        assert before["rmap"] == 0 and before["mg"] >= pages, before
        start = int((KSM / "full_scans").read_text())
        for k, v in (("pages_to_scan", 5000), ("sleep_millisecs", 10), ("run", 1)):
            (KSM / k).write_text(str(v))
        wait_for(lambda: int((KSM / "full_scans").read_text()) >= start + 2, 60, "two full passes")
        after = reading(pid)
    assert abs(after["mg"] - after["rmap"]) <= pages // 100, after
    assert after["rmap"] >= pages, after
    assert after["statm_anon"] >= after["mg"], after
