"""Benchmark: what per-VM collection costs on real libvirt guests with the balloon
statistics asked for every tick, against asking for them only when they can have changed.

    sudo .venv/bin/python bench/balloon_bench.py [--guests 4] [--ticks 40] [--every 0.25]

Boots N lab guests (tests/lab: real libvirtd, real QEMU under software emulation, a
virtio balloon with a 2 s statistics period), then times two VmCollectors over the same
guests, tick by tick, alternately: events off (getAllDomainStats(STATE|BALLOON) every
tick: one QEMU monitor round trip per guest inside libvirtd) and events on (the daemon's
way: the state every tick, balloon statistics per guest when due). Also times libvirt's
two calls alone. Prints the medians side by side and their ratio; nothing is asserted
(tests/test_lab_vms.py checks the behaviour). Touches no KSM knob, but the guests' memory
is mergeable: it holds the KSM test lock so that no KSM benchmark measures meanwhile.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def median_ms(samples: List[float]) -> str:
    return "%.2f ms (p90 %.2f)" % (statistics.median(samples), sorted(samples)[int(len(samples) * 0.9) - 1])


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guests", type=int, default=4)
    ap.add_argument("--ticks", type=int, default=40)
    ap.add_argument("--every", type=float, default=0.25, help="seconds between ticks")
    args = ap.parse_args()
    import libvirt
    from ksmctl.collectors.vms import VmCollector
    from tests.ksmlock import ksm_exclusive
    from tests.lab.lab import URI, Lab
    from tests.support import wait_for
    with ksm_exclusive():
        lab = Lab()
        try:
            lab.start_daemons()
            print("booting %d lab guests ..." % args.guests, flush=True)
            guests = [lab.start_guest() for _ in range(args.guests)]
            lab.wait_ready(guests)
            eager, lazy = VmCollector(URI, events=False), VmCollector(URI, events=True)
            wait_for(lambda: all(v.guest_usable for v in eager.collect()), 60, "the guests' balloon statistics")
            conn = libvirt.openReadOnly(URI)
            for _ in range(3):
                lazy.collect()
            t_eager, t_lazy, t_state, t_both = [], [], [], []
            for _ in range(args.ticks):
                t_eager.append(timed(eager.collect))
                t_lazy.append(timed(lazy.collect))
                t_state.append(timed(lambda: conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE, 1)))
                t_both.append(timed(lambda: conn.getAllDomainStats(
                    libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_BALLOON, 1)))
                time.sleep(args.every)
            n = args.guests
            print("\n%d real guests, %d ticks %.2f s apart (medians):" % (n, args.ticks, args.every))
            print("  getAllDomainStats(STATE)          %s: %.3f ms per guest" % (median_ms(t_state), statistics.median(t_state) / n))
            print("  getAllDomainStats(STATE|BALLOON)  %s: %.3f ms per guest" % (median_ms(t_both), statistics.median(t_both) / n))
            print("  collection, balloon every tick    %s" % median_ms(t_eager))
            print("  collection, balloon when due      %s" % median_ms(t_lazy))
            print("  ratio (every tick / when due)     %.1fx" % (statistics.median(t_eager) / statistics.median(t_lazy)))
            conn.close()
            eager.close()
            lazy.close()
        finally:
            lab.stop()


if __name__ == "__main__":
    main()
