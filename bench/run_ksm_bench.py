"""ksmctl against what hosts run today, side by side on this machine's real KSM.

    sudo .venv/bin/python bench/run_ksm_bench.py [--quick] [--controllers a,b,...] [--out DIR]
                                                 [--workload default,churn,trickle,fill]

Runs every controller (ksmctl with each shipped policy, ksmtuned with its defaults and
with a 10 s interval, the kernel's advisor, the kernel's defaults, KSM off) one after
another on the same workload of guest-like processes with a known duplicate structure,
from a clean KSM state each time, under real memory pressure (a ballast), and writes
results.md, ksm_bench.png and params.json. Holds the KSM test lock for its whole run.
Prints its expected and its actual duration. --quick: small guests, short phases, four
controllers (about 2 minutes). --workload: one or more of default (1-4% of guest pages
rewritten continuously), churn (a fifth of them: pages_volatile well above zero) and
trickle (2% of guest pages rewritten with the contents they hold: merges broken and made
again) and fill (guests keep turning unique pages into copies of OS contents: the achievable
saving grows at a known rate, a trickle of new merges); with more than one, each workload's
results go to DIR/<workload>/ and every workload's targets are printed. The "floor" controller is ksmd at full pace for exactly
two passes from pressure onset (and from new guests): the cost of the merges themselves.
A ksmctl policy with a setting changed runs as e.g. ksmctl:default:min_pass_yield=0.
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
from ksm_bench.workload import FILL_RATE, WORKLOADS  # noqa: E402
from ksmctl.errors import KsmctlError  # noqa: E402

QUICK_CONTROLLERS = ["ksmctl:default", "floor", "ksmtuned:10", "advisor", "kernel-defaults"]


def quick_params() -> Params:
    return Params(calm=5, pressure=30, slow_factor=2.0, growth=12, release=5, window=30,
                  pressure_free=0.40, controllers=list(QUICK_CONTROLLERS))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, short phases, four controllers")
    ap.add_argument("--controllers", help="comma-separated: %s; or ksmctl:<policy>:<key>=<value>[:...], the "
                    "policy with settings changed (e.g. ksmctl:default:min_pass_yield=0)" % ",".join(ctl.ALL))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results directory")
    ap.add_argument("--workload", default="default", help="comma-separated: %s" % ",".join(WORKLOADS))
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every guest's size")
    ap.add_argument("--fill-rate", type=float, help="fill workload: the share of every guest's pages filled per "
                    "second (default %g)" % FILL_RATE)
    for name in ("calm", "pressure", "growth", "release", "window", "pressure_free", "floor_gib"):
        ap.add_argument("--" + name.replace("_", "-"), type=float, help="override the phase/pressure parameter")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (writes /sys/kernel/mm/ksm)", file=sys.stderr)
        return 2
    names = [w.strip() for w in args.workload.split(",") if w.strip()]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown or not names:
        print("unknown workload %s (choose from %s)" % (",".join(unknown), ",".join(WORKLOADS)), file=sys.stderr)
        return 2
    p = quick_params() if args.quick else Params()
    if args.controllers:
        p.controllers = [c.strip() for c in args.controllers.split(",") if c.strip()]
    for name in ("calm", "pressure", "growth", "release", "window", "pressure_free", "floor_gib"):
        v = getattr(args, name)
        if v is not None:
            setattr(p, name, v)
    try:
        est = estimate_seconds(p) * len(names)   # builds every controller: a bad name fails here
    except (ValueError, OSError, KsmctlError) as e:
        print("--controllers: %s" % e, file=sys.stderr)
        return 2
    print("KSM benchmark: %d controllers on %d workload(s), expected about %.0f minutes (waits for the KSM "
          "test lock first)" % (len(p.controllers), len(names), est / 60), flush=True)
    t0 = time.monotonic()
    summary = []
    # One lock for every workload: side by side means nobody else's KSM work in between.
    from tests.ksmlock import ksm_exclusive
    with ksm_exclusive():
        _run_workloads(names, args, p, summary)
    elapsed = time.monotonic() - t0
    for wname, lines, files in summary:
        print("\n== targets, workload %s (%s)" % (wname, files["md"]))
        print("\n".join(lines))
    print("\ntook %.1f minutes" % (elapsed / 60))
    return 0


def _run_workloads(names, args, p, summary) -> None:
    for wname in names:
        full, quick = WORKLOADS[wname]
        spec = quick() if args.quick else full()
        if args.scale != 1.0:
            from dataclasses import replace
            spec = replace(spec, guests=[replace(g, mib=int(g.mib * args.scale)) for g in spec.guests],
                           growth=[replace(g, mib=int(g.mib * args.scale)) for g in spec.growth])
        if args.fill_rate is not None and spec.fill_per_s() > 0:
            from dataclasses import replace
            spec = replace(spec, guests=[replace(g, fill_rate=args.fill_rate) for g in spec.guests],
                           growth=[replace(g, fill_rate=args.fill_rate) for g in spec.growth])
        out = Path(args.out) if len(names) == 1 else Path(args.out) / wname
        print("== workload %s" % wname, flush=True)
        t1 = time.monotonic()
        result = run_all(spec, p, out, log=lambda s: print(s, flush=True), lock=False)
        result["workload_name"] = wname
        files = report.write(result, out, time.monotonic() - t1)
        print(report.table(result))
        print()
        lines = report.targets(result)
        print("\n".join(lines))
        summary.append((wname, lines, files))


if __name__ == "__main__":
    sys.exit(main())
