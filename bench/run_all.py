"""Runs every benchmark in bench/, one after another (`make bench` calls this).

    sudo .venv/bin/python bench/run_all.py [--quick] [--only ksm,guests,estimate,tick,scrape,balloon]

--quick gives each benchmark its small variant (the KSM benchmark's --quick: small guests,
short phases, four controllers; the real-guest one's: two small guests and one more).
Without it the KSM benchmark runs in full (about 31 minutes) and writes bench/results/,
the real-guest one (under 20 minutes) bench/results/guests/. Prints each benchmark's duration and a summary; the
exit status is non-zero if any benchmark failed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

# name -> (script, full arguments, --quick arguments, needs root)
BENCHMARKS: Dict[str, Tuple[str, List[str], List[str], bool]] = {
    "tick": ("tick_bench.py", [], ["--ticks", "1000", "--timed", "50"], False),
    "scrape": ("scrape_bench.py", [], ["--scrapes", "10"], False),
    "estimate": ("estimate_bench.py", [], ["--gib", "0.5", "--runs", "1"], True),
    "ksm": ("run_ksm_bench.py", [], ["--quick", "--out", "/tmp/ksmctl-bench-quick"], True),
    "guests": ("run_guest_bench.py", [], ["--quick"], True),
    "balloon": ("balloon_bench.py", [], ["--guests", "2", "--ticks", "20"], True),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small variants of every benchmark")
    ap.add_argument("--only", help="comma-separated subset of: %s" % ",".join(BENCHMARKS))
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error("unknown benchmark(s): %s" % ", ".join(unknown))
    results = []
    t_all = time.monotonic()
    for name in names:
        script, full, quick, root = BENCHMARKS[name]
        path = BENCH / script
        if not path.exists():
            results.append((name, "missing", 0.0))
            continue
        if root and os.geteuid() != 0:
            results.append((name, "skipped (needs root)", 0.0))
            continue
        cmd = [sys.executable, str(path)] + (quick if args.quick else full)
        print("\n=== %s: %s" % (name, " ".join(cmd)), flush=True)
        t = time.monotonic()
        rc = subprocess.call(cmd, cwd=str(ROOT))
        results.append((name, "ok" if rc == 0 else "FAILED (exit %d)" % rc, time.monotonic() - t))
    print("\n=== summary (%.1f minutes)" % ((time.monotonic() - t_all) / 60))
    for name, status, secs in results:
        print("  %-9s %-22s %6.0f s" % (name, status, secs))
    return 0 if all(s in ("ok",) or s.startswith("skipped") for _, s, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
