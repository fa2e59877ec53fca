"""ksmctl against what hosts run today, on real QEMU guests under libvirt (software emulation).

    sudo .venv/bin/python bench/run_guest_bench.py [--quick] [--controllers a,b,...|all] [--out DIR]

Boots six guests (the same kernel and initramfs: shared OS files, zero-filled memory,
per-guest data, a file rewritten every second), then runs each controller on them in
turn, from a clean KSM state each time, under real memory pressure (the process bench's
ballast); two more guests boot during pressure. The achievable saving is measured with
`ksmctl estimate` over the QEMU processes before each controller (and after it, with the
new guests), not assumed. Writes results.md, guest_bench.png, params.json and run.json
(default bench/results/guests/). Holds the KSM test lock for its whole run and destroys
every domain it created. Prints its expected and its actual duration. --quick: two small
guests and one more, short phases, ksmctl default and ksmtuned widened at 10 s (about 5
minutes).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ksm_bench import guests as gb  # noqa: E402
from ksm_bench import report  # noqa: E402
from ksm_bench.run import Params  # noqa: E402
from ksmctl.errors import KsmctlError  # noqa: E402

QUICK_CONTROLLERS = ["ksmctl:default", "ksmtuned-widened:10"]


def quick_params() -> Params:
    return Params(calm=3, pressure=30, slow_factor=2.0, growth=35, release=3, window=30,
                  pressure_free=0.40, controllers=list(QUICK_CONTROLLERS))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small guests, short phases, two controllers")
    ap.add_argument("--controllers", help="comma-separated, or 'all': %s" % ",".join(gb.ALL_CONTROLLERS))
    ap.add_argument("--out", help="results directory (default bench/results/guests, "
                                  "/tmp/ksmctl-guest-bench-quick with --quick)")
    for name in ("calm", "pressure", "slow_factor", "growth", "release", "window", "pressure_free", "floor_gib"):
        ap.add_argument("--" + name.replace("_", "-"), type=float, help="override the phase/pressure parameter")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (writes /sys/kernel/mm/ksm, runs libvirt guests)", file=sys.stderr)
        return 2
    p = quick_params() if args.quick else gb.guest_params()
    wl = gb.quick_guest_workload() if args.quick else gb.default_guest_workload()
    if args.controllers:
        p.controllers = (list(gb.ALL_CONTROLLERS) if args.controllers == "all"
                         else [c.strip() for c in args.controllers.split(",") if c.strip()])
    for c in p.controllers:
        try:
            gb.make(c)  # an unknown name fails here, before anything boots
        except (ValueError, OSError, KsmctlError) as e:
            print("--controllers: %s" % e, file=sys.stderr)
            return 2
    for name in ("calm", "pressure", "slow_factor", "growth", "release", "window", "pressure_free", "floor_gib"):
        v = getattr(args, name)
        if v is not None:
            setattr(p, name, v)
    out = Path(args.out) if args.out else (Path("/tmp/ksmctl-guest-bench-quick") if args.quick
                                           else ROOT / "bench" / "results" / "guests")
    est = gb.estimate_seconds(p)
    print("real-guest KSM benchmark: %d guests + %d, %d controllers, expected about %.0f minutes "
          "(waits for the KSM test lock first)" % (len(wl.guests), len(wl.growth), len(p.controllers), est / 60),
          flush=True)
    t0 = time.monotonic()
    result = gb.run_all(wl, p, out, log=lambda s: print(s, flush=True))
    waited = float(result.get("lock_wait_s") or 0.0)
    elapsed = time.monotonic() - t0 - waited   # the run itself, without the wait for the KSM lock
    files = gb.write(result, out, elapsed)
    print(report.table(result))
    print()
    print("\n".join(gb.targets(result)))
    print()
    print("\n".join(gb.estimate_lines(result)))
    print("\nwrote %s, %s, %s; took %.1f minutes (after %.1f minutes waiting for the KSM test lock)"
          % (files["md"], files["png"], files["json"], elapsed / 60, waited / 60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
