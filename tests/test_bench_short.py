"""A short run of the KSM benchmark on the real kernel (small guests, about a minute),
to keep the harness working: the full comparison stays a manual command
(bench/run_ksm_bench.py). Asserts sane numbers, never timing targets."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.ksmlock import KSM, ksm_exclusive
from tests.support import need, need_root

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from ksm_bench import report  # noqa: E402
from ksm_bench.run import Params, run_all  # noqa: E402
from ksm_bench.workload import GuestSpec, WorkloadSpec, meminfo  # noqa: E402

pytestmark = pytest.mark.kernel

GIB = 1024 ** 3


def test_short_benchmark_on_the_real_kernel(tmp_path):
    need_root()
    try:
        import matplotlib  # noqa: F401  (the bench extra, .[bench]: the plot is part of the harness)
    except ImportError:
        need(False, "matplotlib (pip install -e '.[bench]')")
    need(KSM.joinpath("run").exists(), "kernel without KSM")
    mi = meminfo()
    # The default policy starts when MemAvailable falls below half of RAM: the ballast
    # holds free memory at 40% of RAM, and never lets MemAvailable fall below 3 GiB.
    need(mi["MemAvailable"] > 0.40 * mi["MemTotal"] + 4 * GIB, "not enough free memory for the ballast")
    # The first guest also rewrites 5% of its pages with the contents they hold (the trickle
    # workload's rewrites): merges broken and made again, sampled as stale merges.
    spec = WorkloadSpec(guests=[GuestSpec(64, zero=0.10, os=0.40, within=0.10, within_pool=32, trickle=0.05,
                                          trickle_rate=0.1),
                                GuestSpec(48, zero=0.20, os=0.30, app=0.10, within_pool=16, churn=0.03)],
                        growth=[GuestSpec(48, zero=0.10, os=0.40, within=0.10, within_pool=20)])
    p = Params(calm=2, pressure=40, slow_factor=1.0, growth=8, release=2, window=40, pressure_free=0.40,
               controllers=["ksmctl:default"])
    with ksm_exclusive():
        result = run_all(spec, p, tmp_path, log=lambda s: None, lock=False)
    files = report.write(result, tmp_path, elapsed=1.0)
    (run,) = result["runs"]
    m = run["metrics"]
    a0, a1 = run["achievable_pages"]["initial"], run["achievable_pages"]["all"]
    assert 0 < a0 < a1
    # The ksmctl default policy merged something under pressure, and not more than exists
    # (other mergeable memory on the host may add a little; allow it).
    assert m["peak_gib"] > 0 and 0 < m["peak_fraction"] < 1.5, m
    assert m["cpu_total_s"] is not None and m["cpu_total_s"] > 0
    phases = [s["phase"] for s in run["samples"]]
    assert {"calm", "pressure", "growth", "release"} <= set(phases)
    assert min(s["mem_available"] for s in run["samples"]) > 2.5 * GIB
    # Only the rewritten pages can lose their merges behind the kernel's count, and some did.
    if m["stale_max_pages"] is not None:   # None: no KSM line in smaps_rollup (before Linux 6.x)
        assert 0 < m["stale_max_pages"] <= spec.guests[0].trickle_pages, m
    text = files["md"].read_text()
    assert "| ksmctl default |" in text
    assert files["png"].stat().st_size > 10000 and files["json"].exists()
