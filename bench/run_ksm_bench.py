"""ksmctl against what hosts run today, side by side on this machine's real KSM.

    sudo .venv/bin/python bench/run_ksm_bench.py [--quick] [--controllers a,b,...] [--out DIR]

Runs every controller (ksmctl with each shipped policy, ksmtuned with its defaults and
with a 10 s interval, the kernel's advisor, the kernel's defaults, KSM off) one after
another on the same workload of guest-like processes with a known duplicate structure,
from a clean KSM state each time, under real memory pressure (a ballast), and writes
results.md, ksm_bench.png and params.json. Holds the KSM test lock for its whole run.
Prints its expected and its actual duration. --quick: small guests, short phases, four
controllers (about 2 minutes).
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

from ksm_bench import controllers as ctl  # noqa: E402
from ksm_bench import report  # noqa: E402
from ksm_bench.run import Params, estimate_seconds, run_all  # noqa: E402
from ksm_bench.workload import default_workload, quick_workload  # noqa: E402

QUICK_CONTROLLERS = ["ksmctl:default", "ksmtuned:10", "advisor", "kernel-defaults"]


def quick_params() -> Params:
    return Params(calm=5, pressure=30, slow_factor=2.0, growth=12, release=5, window=30,
                  pressure_free=0.40, controllers=list(QUICK_CONTROLLERS))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, short phases, four controllers")
    ap.add_argument("--controllers", help="comma-separated: %s" % ",".join(ctl.ALL))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results directory")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every guest's size")
    for name in ("calm", "pressure", "growth", "release", "window", "pressure_free", "floor_gib"):
        ap.add_argument("--" + name.replace("_", "-"), type=float, help="override the phase/pressure parameter")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (writes /sys/kernel/mm/ksm)", file=sys.stderr)
        return 2
    p = quick_params() if args.quick else Params()
    spec = quick_workload() if args.quick else default_workload()
    if args.scale != 1.0:
        from dataclasses import replace
        spec = replace(spec, guests=[replace(g, mib=int(g.mib * args.scale)) for g in spec.guests],
                       growth=[replace(g, mib=int(g.mib * args.scale)) for g in spec.growth])
    if args.controllers:
        p.controllers = [c.strip() for c in args.controllers.split(",") if c.strip()]
    for name in ("calm", "pressure", "growth", "release", "window", "pressure_free", "floor_gib"):
        v = getattr(args, name)
        if v is not None:
            setattr(p, name, v)
    est = estimate_seconds(p)
    print("KSM benchmark: %d controllers, expected about %.0f minutes (waits for the KSM test lock first)"
          % (len(p.controllers), est / 60), flush=True)
    t0 = time.monotonic()
    result = run_all(spec, p, Path(args.out), log=lambda s: print(s, flush=True))
    elapsed = time.monotonic() - t0
    files = report.write(result, Path(args.out), elapsed)
    print(report.table(result))
    print()
    print("\n".join(report.targets(result)))
    print("\nwrote %s, %s, %s; took %.1f minutes" % (files["md"], files["png"], files["json"], elapsed / 60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
