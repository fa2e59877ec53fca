"""A short run of bench/balloon_bench.py (one real lab guest, a few ticks), to keep the
harness working. Asserts that every line is printed with a number, never the timing."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab.fixtures import _need_lab

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.lab, pytest.mark.kernel]


def test_balloon_bench_prints_both_ways_side_by_side():
    _need_lab()
    done = subprocess.run([sys.executable, str(ROOT / "bench/balloon_bench.py"), "--guests", "1", "--ticks", "5"],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for line in (r"getAllDomainStats\(STATE\) +[\d.]+ ms \(p90 [\d.]+\): [\d.]+ ms per guest",
                 r"getAllDomainStats\(STATE\|BALLOON\) +[\d.]+ ms \(p90 [\d.]+\): [\d.]+ ms per guest",
                 r"collection, balloon every tick +[\d.]+ ms", r"collection, balloon when due +[\d.]+ ms",
                 r"ratio \(every tick / when due\) +[\d.]+x"):
        assert re.search(line, out), (line, out)
