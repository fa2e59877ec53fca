"""A short run of the real-guest KSM benchmark (bench/run_guest_bench.py): two small
libvirt guests (software emulation) and one more started during pressure, the default
ksmctl policy, under two minutes on the real kernel. The full comparison stays
a manual command. Asserts what the harness must get right: the achievable saving measured
by `ksmctl estimate` over the QEMU processes, the kernel's saving reaching it, the table
row, every domain gone afterwards. Never timing targets."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ksmlock import KSM, ksm_exclusive
from tests.lab.fixtures import _need_lab
from tests.support import need

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from ksm_bench import guests as gb  # noqa: E402
from ksm_bench import report  # noqa: E402
from ksm_bench.run import Params  # noqa: E402
from ksm_bench.workload import meminfo  # noqa: E402

pytestmark = [pytest.mark.lab, pytest.mark.kernel]

GIB = 1024 ** 3


def _our_domains(prefix: str):
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, universal_newlines=True, timeout=30).stdout
    return [n for n in out.split() if n.startswith(prefix)]


def test_short_guest_benchmark(tmp_path):
    _need_lab()
    try:
        import matplotlib  # noqa: F401  (the bench extra: the plot is part of the harness)
    except ImportError:
        need(False, "matplotlib (pip install -e '.[bench]')")
    need(KSM.joinpath("run").exists(), "kernel without KSM")
    wl = gb.GuestWorkload(guests=[gb.VMSpec(320, 48, 24, 256), gb.VMSpec(320, 32, 32, 256)],
                          growth=[gb.VMSpec(320, 32, 24, 256)], os_mib=48, os_files=12)
    p = Params(calm=2, pressure=30, slow_factor=1.0, growth=35, release=2, window=30, pressure_free=0.40,
               controllers=["ksmctl:default"])
    with ksm_exclusive():
        # Checked holding the lock (other benchmarks' guests and ballasts are gone by then).
        # The default policy starts when MemAvailable falls by a tenth of RAM: the ballast
        # holds free memory at 40% of RAM and never lets MemAvailable fall below 3 GiB.
        mi = meminfo()
        need(mi["MemAvailable"] > 0.40 * mi["MemTotal"] + 4 * GIB, "not enough free memory for the ballast")
        result = gb.run_all(wl, p, tmp_path, log=lambda s: None, lock=False)
    prefix = "%s-%d-" % (gb.PREFIX, os.getpid())
    assert _our_domains(prefix) == [], "the bench left domains behind"
    files = gb.write(result, tmp_path, elapsed=1.0)
    (run,) = result["runs"]
    m = run["metrics"]
    e0, e1 = run["estimate"]["initial"], run["estimate"]["all"]
    a0, a1 = run["achievable_pages"]["initial"], run["achievable_pages"]["all"]
    # Measured, not assumed: the OS files alone are shared by both guests.
    assert a0 == e0["achievable_capped"] and a1 == e1["achievable_capped"]
    os_pages = wl.os_mib * 1024 * 1024 // result["page_size"]
    assert a0 >= 0.9 * os_pages, (a0, os_pages)
    assert a1 > a0, (a0, a1)        # the guest started during pressure adds to it
    assert e1["scanned"] > e0["scanned"]
    # The default policy merged, under pressure, at least 90% of what the estimate found
    # achievable, and the kernel's count agrees with the estimate's own frame count.
    assert m["peak_fraction"] is not None and 0.90 <= m["peak_fraction"] < 1.05, m
    host = e1["host"]
    kernel_saved = host["pages_sharing"] + host["ksm_zero_pages"]
    assert kernel_saved > 0 and abs(e1["achieved"] - kernel_saved) <= 0.02 * kernel_saved, (e1, kernel_saved)
    assert m["cpu_total_s"] is not None and m["cpu_total_s"] > 0
    assert {"calm", "pressure", "growth", "release"} <= {s["phase"] for s in run["samples"]}
    assert min(s["mem_available"] for s in run["samples"]) > 2.5 * GIB
    assert run["growth_guests_ready_s"] is not None
    # The daemon's decisions are kept, timed on the samples' clock, and the notes count them.
    ph = run["phases"]
    assert any(ph["onset"] <= d["t"] <= ph["end"] for d in run["decisions"]), run["decisions"][:3]
    text = files["md"].read_text()
    assert "| ksmctl default |" in text
    assert re.search(r"- ksmctl default \(.*after the passes: \d+ checks, \d+ more passes", text), text
    assert "**HOLDS**" in text or "**MISSED**" in text
    assert any(line.startswith("| ksmctl default |") for line in report.table(result).splitlines())
    assert files["png"].stat().st_size > 10000 and files["json"].exists()
