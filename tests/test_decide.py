"""decide() as a pure function: ksmtuned's algorithm tick by tick (expected values worked
out by hand from the ksmtuned script, to document the arithmetic; tests/test_ksmtuned_real.py
compares the policy with the real script), hysteresis, the adaptive strategy and the budget."""
from __future__ import annotations

import json
from typing import Optional

import pytest

from ksmctl.policy.decide import EngineState, decide, sleep_millisecs
from ksmctl.policy.strategies.run import RunState
from ksmctl.policy.loader import load_policy, parse_policy
from ksmctl.policy.rules import AdaptiveMode
from ksmctl.readings import Coverage, KsmState, MemInfo, Psi, Readings, VmReading
from ksmctl.errors import PolicyError
from ksmctl.service.trace import decision_to_dict, state_from_dict, state_to_dict

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


def ksm(**values) -> KsmState:
    base = {"run": 0, "pages_to_scan": 100, "sleep_millisecs": 20, "pages_shared": 0, "pages_sharing": 0,
            "pages_unshared": 0, "pages_volatile": 0, "pages_scanned": 0, "full_scans": 0, "ksm_zero_pages": 0}
    base.update(values)
    return KsmState(values=base, advisor_mode="none", advisor_modes=("none", "scan-time"), page_size=4096)


def reading(t: float = 0.0, total_kib: int = 8388608, free_kib: int = 0, committed_kib: int = 0,
            available: Optional[int] = None, psi10: float = 0.0, ksmd_cpu: Optional[float] = 0.0,
            mergeable: Optional[int] = None, coverage: Optional[Coverage] = None, **ksm_values) -> Readings:
    mi = MemInfo(total=total_kib * KIB, available=available if available is not None else free_kib * KIB,
                 free=free_kib * KIB)
    vms = (VmReading(uuid="u1", name="g1", rss=committed_kib * KIB),)
    return Readings(monotonic=t, wall=1e9 + t, ksm=ksm(**ksm_values), meminfo=mi,
                    psi=Psi(psi10, 0.0, 0.0, 0.0), ksmd_cpu_seconds=ksmd_cpu, vms=vms, mergeable_rss=mergeable,
                    coverage=coverage)


# ksmtuned on an 8 GiB host (MemTotal 8388608 KiB):
#   thres = 8388608 * 20 / 100 = 1677721 KiB (integer division), above the 2048 KiB constant
#   sleep = 10 * 16 * 1024 * 1024 / 8388608 = 20 ms
# Each row: committed KiB (qemu RSS), free KiB (MemFree+Buffers+Cached), expected run, npages.
KSMTUNED_TABLE = [
    (1000000, 7000000, 0, None),      # 1000000+1677721 < total and free > thres: stop
    (6800000, 1500000, 1, 300),       # committed+thres >= total: start; free < thres: boost 0+300
    (6800000, 1500000, 1, 600),       # boost
    (6800000, 1677721, 1, 550),       # free == thres: not "<": decay -50
    (6000000, 1600000, 1, 850),       # committed+thres < total but free <= thres: run, boost
    (6000000, 1600000, 1, 1150),      # boost
    (6000000, 1600000, 1, 1250),      # boost, clamped to KSM_NPAGES_MAX
    (6000000, 2000000, 0, None),      # both below thresholds: stop (npages kept: 1250)
    (6710887, 2000000, 1, 1200),      # committed+thres == total: "-lt" fails, so start; decay
    (6710886, 1677722, 0, None),      # committed+thres == total-1 and free == thres+1: stop
    (6710887, 1677722, 1, 1150),      # decay
]


def test_ksmtuned_policy_matches_ksmtuned_tick_by_tick():
    policy = load_policy("ksmtuned").policy
    assert policy.interval == 60.0
    state = EngineState()
    for i, (committed, free, run, npages) in enumerate(KSMTUNED_TABLE):
        d, state = decide(policy, reading(t=60.0 * i, committed_kib=committed, free_kib=free), state)
        assert d.targets["run"] == run, (i, d.reasons)
        if run:
            assert (d.targets["pages_to_scan"], d.targets["sleep_millisecs"]) == (npages, 20), (i, d.reasons)
        else:
            assert "pages_to_scan" not in d.targets


def test_ksmtuned_first_decay_clamps_to_min_and_sleep_scales_with_memory():
    policy = load_policy("ksmtuned").policy
    d, _ = decide(policy, reading(committed_kib=8000000, free_kib=4000000), EngineState())
    assert d.targets["pages_to_scan"] == 64  # npages starts at 0: 0 - 50 clamps to KSM_NPAGES_MIN
    assert sleep_millisecs(policy, 16 * GIB) == 10   # 10 ms per 16 GiB
    assert sleep_millisecs(policy, 64 * GIB) == 10   # 2.5 ms, floored to 10
    assert sleep_millisecs(policy, 4 * GIB) == 40
    assert sleep_millisecs(policy, 12345678 * KIB) == 10 * 16 * 1024 * 1024 // 12345678


def test_ksmtuned_threshold_constant_applies_on_tiny_hosts():
    policy = load_policy("ksmtuned").policy
    # MemTotal 8000 KiB: 20% is 1600 KiB, below the 2048 KiB constant, so thres = 2048 KiB.
    d, _ = decide(policy, reading(total_kib=8000, committed_kib=0, free_kib=2000), EngineState())
    assert d.targets["run"] == 1 and d.targets["pages_to_scan"] == 300  # free 2000 < 2048: boost


HYSTERESIS = parse_policy("""
name: h
run:
  mode: conditional
  start_when: [{signal: memory_available, below: 40%}]
  stop_when: [{signal: memory_available, above: 60%}]
""")


@pytest.mark.parametrize("avail_pct,was,expect", [(30, False, 1), (50, False, 0), (50, True, 1), (70, True, 0)])
def test_hysteresis(avail_pct, was, expect):
    total = 10 * GIB
    d, st = decide(HYSTERESIS, reading(total_kib=total // KIB, available=total * avail_pct // 100),
                   EngineState(run=RunState(active=was)))
    assert d.targets["run"] == expect
    assert d.run_rule == {(1, False): "start", (0, False): "stay_stopped", (1, True): "keep_running",
                          (0, True): "stop"}[(expect, was)]
    assert st.run.active == bool(expect)


def test_reason_names_condition_and_values():
    total = 10 * GIB
    d, _ = decide(HYSTERESIS, reading(total_kib=total // KIB, available=3 * GIB), EngineState(run=RunState(active=False)))
    assert d.reasons[0] == "memory_available 3.0 GiB < 4.0 GiB"


def test_unknown_signal_never_fires():
    p = parse_policy("name: p\nrun:\n  mode: conditional\n  start_when: [{signal: guest_free, above: 0}]\n")
    d, _ = decide(p, reading(), EngineState(run=RunState(active=False)))
    assert d.targets["run"] == 0 and d.reasons == ("guest_free unknown",)


ADAPTIVE_TEXT = """
name: a
run: {mode: always}
scan:
  strategy: adaptive
  pages_to_scan: {min: 100, max: 100000}
  sleep_millisecs: {base: 10, floor: 10}
  adaptive: {target_pass_seconds: 4, idle_yield: 1.0, min_passes: 2,
             idle: {pages_to_scan: 100, sleep_millisecs: 1000}, resume_growth: 64MiB}
"""
ADAPTIVE = parse_policy(ADAPTIVE_TEXT)


def test_adaptive_paces_passes_then_idles_then_resumes():
    merge = 400 * MIB           # 102400 pages: one pass per 4 s = 25600 pages/s = 256 per 10 ms
    st = EngineState()
    d, st = decide(ADAPTIVE, reading(t=0, mergeable=merge), st)
    assert (d.targets["pages_to_scan"], d.targets["sleep_millisecs"], d.scan_rule) == (256, 10, "merging")
    assert st.adaptive.need_passes == 2  # ksmd holds no pages yet: its next pass starts from the beginning
    # Pass 1 only checksums: nothing merges, and that must not count as "found nothing".
    d, st = decide(ADAPTIVE, reading(t=5, mergeable=merge, full_scans=1, pages_scanned=102400), st)
    assert d.scan_rule == "merging" and st.adaptive.passes == 1 and st.adaptive.last_pass_yield == 0.0
    # Pass 2 merges.
    d, st = decide(ADAPTIVE, reading(t=10, mergeable=merge, full_scans=2, pages_scanned=204800,
                                     pages_sharing=50000), st)
    assert d.scan_rule == "merging" and st.adaptive.passes == 2
    # The next interval, two passes done: 25 new merges in 51200 pages = 0.49 per 1000 < 1: idle,
    # without waiting for a third full pass.
    d, st = decide(ADAPTIVE, reading(t=12, mergeable=merge, full_scans=2, pages_scanned=256000,
                                     pages_sharing=50025), st)
    assert d.scan_rule == "idle" and (d.targets["pages_to_scan"], d.targets["sleep_millisecs"]) == (100, 1000)
    assert "2 full passes since merging started, and the last 2s found 0.49 new merges per 1000" in d.reason
    # Stays idle while mergeable memory is stable (10 MiB < 64 MiB)...
    d, st = decide(ADAPTIVE, reading(t=20, mergeable=merge + 10 * MIB, full_scans=2, pages_scanned=256100,
                                     pages_sharing=50025), st)
    assert d.scan_rule == "idle"
    # ...and resumes at full pace at once when a guest adds 200 MiB. The kernel adds a new
    # guest just behind ksmd's cursor (mm/ksm.c __ksm_enter): the first boundary ends the pass
    # it is in without seeing it, so three boundaries, not two.
    d, st = decide(ADAPTIVE, reading(t=25, mergeable=merge + 200 * MIB, full_scans=2, pages_scanned=256200,
                                     pages_sharing=50025, pages_shared=100), st)
    assert d.scan_rule == "resume" and d.targets["pages_to_scan"] == 384  # 153600 pages / 4 s / 100 per s
    assert "grew by 200.0 MiB" in d.reason and st.adaptive.need_passes == 3 and st.adaptive.passes == 0


def test_adaptive_restart_with_pages_held_needs_one_more_pass():
    p = parse_policy(ADAPTIVE_TEXT.replace("run: {mode: always}", """run:
  mode: conditional
  start_when: [{signal: memory_available, below: 50%}]
  stop_when: [{signal: memory_available, above: 60%}]"""))
    merge = 400 * MIB
    # 8 GiB host: stopped with 7 GiB available; ksmd holds 1000 pages from earlier merging.
    d, st = decide(p, reading(t=0, available=7 * GIB, mergeable=merge, pages_sharing=1000), EngineState())
    assert d.targets["run"] == 0
    # Pressure: restart. ksmd's cursor is somewhere in a pass: min_passes + 1 = 3.
    d, st = decide(p, reading(t=2, available=3 * GIB, mergeable=merge, pages_sharing=1000), st)
    assert (d.run_rule, d.scan_rule, st.adaptive.need_passes) == ("start", "resume", 3)
    d, st = decide(p, reading(t=4, available=3 * GIB, mergeable=merge, pages_sharing=1000, full_scans=2,
                              pages_scanned=150000), st)
    assert d.scan_rule == "merging" and st.adaptive.passes == 2   # two boundaries, quiet, but one short
    d, st = decide(p, reading(t=6, available=3 * GIB, mergeable=merge, pages_sharing=1000, full_scans=3,
                              pages_scanned=250000), st)
    assert d.scan_rule == "idle"


def test_adaptive_does_not_idle_while_passes_still_find_merges():
    st = EngineState()
    merge = 400 * MIB
    for i in range(1, 6):
        d, st = decide(ADAPTIVE, reading(t=5 * i, mergeable=merge, full_scans=i, pages_scanned=102400 * i,
                                         pages_sharing=1000 * i), st)  # ~9.8 merges per 1000 pages each pass
        assert d.scan_rule == "merging"


def _grown_while_merging():
    """A pass over 400 MiB, then a guest starts (+100 MiB) during the merge pass: its pages
    need two passes of their own, after the boundary that ends the pass in which it joined
    (behind ksmd's cursor). The decision and state at the growth."""
    merge = 400 * MIB
    st = EngineState()
    d, st = decide(ADAPTIVE, reading(t=0, mergeable=merge), st)
    d, st = decide(ADAPTIVE, reading(t=5, mergeable=merge, full_scans=1, pages_scanned=102400), st)
    d, st = decide(ADAPTIVE, reading(t=10, mergeable=merge + 100 * MIB, full_scans=2, pages_scanned=204800,
                                     pages_sharing=50000, pages_unshared=2000), st)
    return d, st


def test_adaptive_counts_passes_again_when_memory_grows_while_merging():
    merge = 400 * MIB
    d, st = _grown_while_merging()
    assert d.scan_rule == "merging" and st.adaptive.passes == 0 and st.adaptive.need_passes == 3
    assert "grew by 100.0 MiB while merging" in d.reason and st.adaptive.behind_growth
    # A quiet interval now is not enough: only 1 of 2 passes since the growth.
    d, st = decide(ADAPTIVE, reading(t=12, mergeable=merge + 100 * MIB, full_scans=3, pages_scanned=256000,
                                     pages_sharing=50000, pages_unshared=2000), st)
    assert d.scan_rule == "merging" and st.adaptive.passes == 1
    d, st = decide(ADAPTIVE, reading(t=17, mergeable=merge + 100 * MIB, full_scans=4, pages_scanned=512000,
                                     pages_sharing=75000, pages_unshared=2000), st)
    assert d.scan_rule == "merging" and st.adaptive.passes == 2   # found 25000 merges: keep going
    d, st = decide(ADAPTIVE, reading(t=19, mergeable=merge + 100 * MIB, full_scans=5, pages_scanned=563200,
                                     pages_sharing=75000, pages_unshared=2000), st)
    assert d.scan_rule == "idle" and st.adaptive.passes == 3


def _next_boundary(coverage: Optional[Coverage], t: float = 12, full_scans: int = 3, **extra):
    return reading(t=t, mergeable=500 * MIB, full_scans=full_scans, pages_scanned=256000 + 51200 * (full_scans - 3),
                   pages_sharing=50000, pages_unshared=2000, coverage=coverage, **extra)


# The grown guest's 25600 pages (100 MiB), every one with an rmap item; the list is 128000
# pages (500 MiB), so 640 may be unseen.
SEEN = Coverage(processes=1, mergeable_pages=25600, rmap_items=25600, unseen_pages=0)


def test_growth_ksmd_has_looked_at_costs_no_pass_more():
    d, st = decide(ADAPTIVE, _next_boundary(SEEN), _grown_while_merging()[1])
    assert st.adaptive.passes == 1 and st.adaptive.need_passes == 2 and not st.adaptive.behind_growth
    assert ("the pass that ended looked at the memory that grew (1 grown processes: 0 of their 25600 mergeable "
            "pages unseen by ksmd (25600 rmap items), at most 640 allowed): it counts, 2 passes, not 3") in d.reason
    # The next pass is the last: quiet, so idle at 2 passes instead of a third.
    d, st = decide(ADAPTIVE, _next_boundary(None, t=17, full_scans=4), st)
    assert d.scan_rule == "idle" and st.adaptive.passes == 2


@pytest.mark.parametrize("coverage, why", [
    (Coverage(1, 25600, 24900, 700), "the pass that ended missed memory that grew (1 grown processes: 700 of"),
    (Coverage(1, 25600, 0, 25600), "the pass that ended missed memory that grew"),
    (None, "the pass that ended may have missed the memory that grew (no reading of which pages ksmd has seen)"),
    (Coverage(0, 0, 0, 0, unreadable=2), "(the smaps of 2 grown processes is unreadable: another user's need "
                                         "CAP_SYS_PTRACE)"),
])
def test_growth_ksmd_may_not_have_looked_at_keeps_the_pass_more(coverage, why):
    d, st = decide(ADAPTIVE, _next_boundary(coverage), _grown_while_merging()[1])
    assert st.adaptive.passes == 1 and st.adaptive.need_passes == 3 and not st.adaptive.behind_growth
    assert why in d.reason and "3 passes stay" in d.reason
    # Judged once, at the first boundary: a later reading changes nothing.
    d, st = decide(ADAPTIVE, _next_boundary(SEEN, t=17, full_scans=4), st)
    assert st.adaptive.need_passes == 3 and "memory that grew" not in d.reason


def test_a_reading_between_boundaries_is_not_judged():
    _, st = _grown_while_merging()
    d, st = decide(ADAPTIVE, _next_boundary(SEEN, full_scans=2), st)
    assert st.adaptive.need_passes == 3 and st.adaptive.behind_growth and "memory that grew" not in d.reason


def test_a_restarts_pass_more_is_not_for_growth():
    """Pages behind the cursor may have changed while KSM was stopped: rmap items do not
    tell that, so the restart's pass more stays."""
    p = parse_policy(ADAPTIVE_TEXT.replace("run: {mode: always}", """run:
  mode: conditional
  start_when: [{signal: memory_available, below: 50%}]
  stop_when: [{signal: memory_available, above: 60%}]"""))
    _, st = decide(p, reading(t=0, available=7 * GIB, mergeable=400 * MIB, pages_sharing=1000), EngineState())
    _, st = decide(p, reading(t=2, available=3 * GIB, mergeable=400 * MIB, pages_sharing=1000), st)
    assert st.adaptive.need_passes == 3 and not st.adaptive.behind_growth
    _, st = decide(p, reading(t=4, available=3 * GIB, mergeable=400 * MIB, pages_sharing=1000, full_scans=1,
                              pages_scanned=100000, coverage=SEEN), st)
    assert st.adaptive.need_passes == 3


def test_growth_from_idle_mid_list_and_seen_parks_one_pass_sooner():
    """With park, the pass that counts arms the park at the next boundary."""
    _, st = _parked()
    _, st = decide(PARKING, _at_park(10), st)
    # Moved off the boundary (someone wrote pages_to_scan): idle mid-list.
    _, st = decide(PARKING, reading(t=12, mergeable=400 * MIB, full_scans=2, pages_scanned=205000,
                                    pages_sharing=50000, pages_to_scan=100, ksmd_cpu=2.0), st)
    d, st = decide(PARKING, reading(t=14, mergeable=600 * MIB, full_scans=2, pages_scanned=205200,
                                    pages_sharing=50000, pages_shared=10, pages_to_scan=100, ksmd_cpu=2.0), st)
    assert d.scan_rule == "resume" and st.adaptive.need_passes == 3 and st.adaptive.behind_growth
    assert state_from_dict(json.loads(json.dumps(state_to_dict(st)))) == st
    seen = Coverage(processes=2, mergeable_pages=51200, rmap_items=51300, unseen_pages=12)
    d, st = decide(PARKING, reading(t=19, mergeable=600 * MIB, full_scans=3, pages_scanned=360800,
                                    pages_sharing=50000, pages_shared=10, pages_to_scan=384, ksmd_cpu=3.0,
                                    coverage=seen), st)
    assert st.adaptive.need_passes == 2 and d.park_at == 4 and "it counts, 2 passes, not 3" in d.reason


def test_cpu_budget_caps_scan_rate():
    p = parse_policy("""
name: b
run: {mode: always}
scan:
  strategy: step
  pages_to_scan: {initial: 1000, min: 64, max: 5000, boost: 0, decay: 0}
  cpu_budget: 20
""")
    st = EngineState()
    d, st = decide(p, reading(t=0, ksmd_cpu=0.0), st)
    assert d.targets["pages_to_scan"] == 1000
    d, st = decide(p, reading(t=10, ksmd_cpu=8.0), st)  # 80% of a core over 10 s
    assert d.scan_rule == "cpu_cap" and d.targets["pages_to_scan"] == 250 and d.ksmd_cpu_percent == 80.0
    d, st = decide(p, reading(t=20, ksmd_cpu=8.5), st)  # 5%: within budget, recover gradually
    assert d.targets["pages_to_scan"] == 312


def test_advisor_strategy_and_fallback_on_old_kernels():
    p = load_policy("kernel-advisor").policy
    r = reading(committed_kib=8000000, free_kib=100)
    d, _ = decide(p, r, EngineState())
    assert d.scan_rule == "advisor" and d.targets["advisor_mode"] == "scan-time"
    assert "pages_to_scan" not in d.targets
    old = Readings(monotonic=0, wall=0, ksm=KsmState(values=dict(r.ksm.values), advisor_mode=None,
                                                     unsupported=frozenset({"advisor_mode"})),
                   meminfo=r.meminfo, vms=r.vms)
    d, _ = decide(p, old, EngineState())
    assert "advisor_mode" not in d.targets and d.targets["run"] == 1
    assert "no advisor_mode" in d.reason


def test_off_policy_and_background_on_stop():
    d, _ = decide(load_policy("off").policy, reading(), EngineState(run=RunState(active=True)))
    assert d.targets == {"run": 0} and d.run_rule == "off"
    p = parse_policy("""
name: bg
run:
  mode: conditional
  start_when: [{signal: memory_available, below: 10%}]
  on_stop: background
  background: {pages_to_scan: 50, sleep_millisecs: 500}
""")
    d, _ = decide(p, reading(available=8 * GIB), EngineState(run=RunState(active=False)))
    assert d.targets == {"advisor_mode": "none", "pages_to_scan": 50, "sleep_millisecs": 500, "run": 1}
    assert d.scan_rule == "background"


def test_decide_is_pure():
    policy = load_policy("default").policy
    r = reading(committed_kib=7000000, free_kib=100000, mergeable=300 * MIB)
    a = decide(policy, r, EngineState())
    b = decide(policy, r, EngineState())
    assert a == b


def test_default_starts_when_memory_available_falls_fast_and_keeps_hysteresis():
    # 8 GiB host: 10% = 838860 KiB (858992640 B) to start; 5% = 419430 KiB (429496320 B) to stop.
    policy = load_policy("default").policy
    st = EngineState()
    d, st = decide(policy, reading(t=0, available=7168 * MIB), st)
    assert (d.run_rule, d.targets["run"]) == ("stay_stopped", 0)
    d, st = decide(policy, reading(t=20, available=6656 * MIB), st)   # fell 512 MiB: not yet
    assert d.run_rule == "stay_stopped"
    assert "memory_available_fall 512.0 MiB not >= 819.2 MiB" in d.reason
    d, st = decide(policy, reading(t=40, available=6246 * MIB), st)   # fell 922 MiB within 60 s
    assert (d.run_rule, d.targets["run"]) == ("start", 1)
    assert d.reason.startswith("memory_available_fall 922.0 MiB >= 819.2 MiB")
    # At 70 s the window [10, 70] still holds 6656 MiB: fell 410 MiB, not below 409.6 MiB:
    # the fall alone keeps KSM running (every other stop condition holds).
    d, st = decide(policy, reading(t=70, available=6246 * MIB), st)
    assert d.run_rule == "keep_running"
    assert "memory_available_fall 410.0 MiB not < 409.6 MiB" in d.reason
    # At 81 s the 6656 MiB reading (20 s) is out of the 60 s window: no fall, stop.
    d, st = decide(policy, reading(t=81, available=6246 * MIB), st)
    assert (d.run_rule, d.targets["run"]) == ("stop", 0)
    assert [t for t, _ in st.available_history] == [40.0, 70.0, 81.0]


def test_adaptive_checks_at_a_tenth_of_the_pace_when_the_last_pass_ended_mid_interval():
    merge = 4000 * MIB   # 1024000 pages: one pass per 4 s = 2560 per 10 ms; 256 at verify_rate 0.1
    st = EngineState()
    d, st = decide(ADAPTIVE, reading(t=0, mergeable=merge), st)
    d, st = decide(ADAPTIVE, reading(t=5, mergeable=merge, full_scans=1, pages_scanned=102400), st)
    # Second boundary inside an interval that still merged 40000 pages: check, slowly.
    d, st = decide(ADAPTIVE, reading(t=10, mergeable=merge, full_scans=2, pages_scanned=204800,
                                     pages_sharing=40000), st)
    assert d.scan_rule == "merging" and st.adaptive.verifying and d.targets["pages_to_scan"] == 256
    assert "checking at 0.1 of the pace" in d.reason
    # The checking interval found 10 merges in 12800 pages (0.78 per 1000 < 1): idle.
    d, st = decide(ADAPTIVE, reading(t=15, mergeable=merge, full_scans=2, pages_scanned=217600,
                                     pages_sharing=40010), st)
    assert d.scan_rule == "idle" and not st.adaptive.verifying


def test_adaptive_goes_back_to_full_pace_when_checking_still_finds_merges():
    merge = 400 * MIB
    st = EngineState()
    d, st = decide(ADAPTIVE, reading(t=0, mergeable=merge), st)
    d, st = decide(ADAPTIVE, reading(t=5, mergeable=merge, full_scans=1, pages_scanned=102400), st)
    d, st = decide(ADAPTIVE, reading(t=10, mergeable=merge, full_scans=2, pages_scanned=204800,
                                     pages_sharing=40000), st)
    assert st.adaptive.verifying
    # 500 merges in 12800 pages (39 per 1000): full pace, and one more boundary first.
    d, st = decide(ADAPTIVE, reading(t=15, mergeable=merge, full_scans=2, pages_scanned=217600,
                                     pages_sharing=40500), st)
    assert d.scan_rule == "merging" and not st.adaptive.verifying and st.adaptive.need_passes == 3
    assert d.targets["pages_to_scan"] == 256 and "one more pass at full pace" in d.reason
    d, st = decide(ADAPTIVE, reading(t=20, mergeable=merge, full_scans=2, pages_scanned=320000,
                                     pages_sharing=40500), st)
    assert d.scan_rule == "merging"   # quiet, but the third boundary has not come yet
    d, st = decide(ADAPTIVE, reading(t=25, mergeable=merge, full_scans=3, pages_scanned=422400,
                                     pages_sharing=40500), st)
    assert d.scan_rule == "idle"


def _two_passes_then_check(policy, merge, cpu=True):
    """Two passes of a 400 MiB merge (40000 pages saved for 2 ksmd CPU-seconds: 78 MiB per CPU-s,
    195 merges per 1000 pages), the second ending in an interval that still merged: checking."""
    c = (lambda v: v) if cpu else (lambda v: None)
    st = EngineState()
    d, st = decide(policy, reading(t=0, mergeable=merge, ksmd_cpu=c(0.0)), st)
    d, st = decide(policy, reading(t=5, mergeable=merge, full_scans=1, pages_scanned=102400, ksmd_cpu=c(1.0)), st)
    d, st = decide(policy, reading(t=10, mergeable=merge, full_scans=2, pages_scanned=204800, pages_sharing=40000,
                                   ksmd_cpu=c(2.0)), st)
    assert st.adaptive.verifying and d.scan_rule == "merging"
    return st


def test_a_churn_trickle_after_two_passes_is_not_worth_a_full_pass():
    merge = 400 * MIB
    st = _two_passes_then_check(ADAPTIVE, merge)
    # Guests rewriting memory: the check finds 60 merges in 12800 pages (4.7 per 1000, above
    # idle_yield) for 0.1 CPU-s: 2.34 MiB per CPU-s, 3% of the phase's 78 (< min_pass_yield 0.05).
    trickle = reading(t=12, mergeable=merge, full_scans=2, pages_scanned=217600, pages_sharing=40060, ksmd_cpu=2.1)
    d, after = decide(ADAPTIVE, trickle, st)
    assert d.scan_rule == "idle" and (d.targets["pages_to_scan"], d.targets["sleep_millisecs"]) == (100, 1000)
    assert not after.adaptive.verifying and after.adaptive.need_passes == 2
    assert "not worth it" in d.reason and "2.34 MiB saved per ksmd CPU-second (3.0%)" in d.reason
    assert "min_pass_yield" in d.reason
    # The setting is what decides: 0 always runs the pass.
    always = parse_policy(ADAPTIVE_TEXT.replace("resume_growth: 64MiB", "resume_growth: 64MiB, min_pass_yield: 0"))
    d, _ = decide(always, trickle, _two_passes_then_check(always, merge))
    assert d.scan_rule == "merging" and "one more pass at full pace" in d.reason


def test_a_trickle_is_judged_per_page_when_ksmd_cpu_is_unknown():
    merge = 400 * MIB
    st = _two_passes_then_check(ADAPTIVE, merge, cpu=False)
    d, _ = decide(ADAPTIVE, reading(t=12, mergeable=merge, full_scans=2, pages_scanned=217600, pages_sharing=40060,
                                    ksmd_cpu=None), st)
    assert d.scan_rule == "idle" and "4.69 new merges per 1000 pages (2.4%)" in d.reason


def test_a_high_yield_while_checking_is_worth_another_pass():
    merge = 400 * MIB
    st = _two_passes_then_check(ADAPTIVE, merge)
    # Pages that changed while scanned have settled: 1000 merges for 0.1 CPU-s (39 MiB per CPU-s, 50%).
    d, st = decide(ADAPTIVE, reading(t=12, mergeable=merge, full_scans=2, pages_scanned=217600, pages_sharing=41000,
                                     ksmd_cpu=2.1), st)
    assert d.scan_rule == "merging" and d.targets["pages_to_scan"] == 256 and st.adaptive.need_passes == 3
    assert "one more pass at full pace" in d.reason and "(50.0%)" in d.reason


FOLLOWING = parse_policy(ADAPTIVE_TEXT.replace("idle_yield: 1.0", "idle_yield: 0")
                         .replace("resume_growth: 64MiB", "resume_growth: 64MiB, min_pass_yield: 0, park: false")
                         + "kernel: {smart_scan: false}\n")


def test_the_settings_that_follow_a_growing_saving_keep_ksmd_at_full_pace():
    """README "Following a saving that keeps growing": idle_yield 0, min_pass_yield 0, park
    false and smart_scan off keep ksmd passing at the pace, however little a pass finds
    (with the check at a tenth of it after each pass: 100, the policy's min, here)."""
    merge = 400 * MIB
    st = _two_passes_then_check(FOLLOWING, merge)
    sharing, scanned, cpu, paces = 40000, 204800, 2.0, []
    for i in range(1, 9):
        sharing, scanned, cpu = sharing + 3, scanned + 51200, cpu + 0.5   # 0.06 per 1000: a thin trickle
        d, st = decide(FOLLOWING, reading(t=10 + 2 * i, mergeable=merge, full_scans=2 + i // 2, pages_scanned=scanned,
                                          pages_sharing=sharing, ksmd_cpu=cpu), st)
        assert d.scan_rule == "merging" and d.targets["smart_scan"] == 0, (i, d.reason)
        paces.append(d.targets["pages_to_scan"])
    assert set(paces) == {256, 100} and paces.count(256) >= 4, paces
    # The shipped idle_yield idles on the same trickle.
    d, _ = decide(ADAPTIVE, reading(t=12, mergeable=merge, full_scans=2, pages_scanned=256000, pages_sharing=40003,
                                    ksmd_cpu=2.5), _two_passes_then_check(ADAPTIVE, merge))
    assert d.scan_rule == "idle"


SWEEPING = parse_policy(ADAPTIVE_TEXT.replace("resume_growth: 64MiB", "resume_growth: 64MiB, sweep_cpu: 0.01"))


def _idle_after_a_trickle(policy, cpu=True):
    """Two passes (2 ksmd CPU-s), a check at 12 s that finds a trickle (0.1 CPU-s): idle."""
    st = _two_passes_then_check(policy, 400 * MIB, cpu)
    d, st = decide(policy, reading(t=12, mergeable=400 * MIB, full_scans=2, pages_scanned=217600,
                                   pages_sharing=40060, ksmd_cpu=2.1 if cpu else None), st)
    assert d.scan_rule == "idle"
    return st


def test_an_idle_sweep_comes_when_sweeps_so_spaced_cost_sweep_cpu_of_a_core():
    st = _idle_after_a_trickle(SWEEPING)
    assert st.adaptive.pass_cpu == pytest.approx(1.05)   # 2.1 CPU-s over the phase's 2 passes
    # 1.05 CPU-s per pass at 0.01 of a core: a sweep every 105 s of idling.
    d, st = decide(SWEEPING, reading(t=116, mergeable=400 * MIB, full_scans=2, pages_scanned=228000,
                                     pages_sharing=40060, ksmd_cpu=2.2), st)
    assert d.scan_rule == "idle" and d.targets["pages_to_scan"] == 100
    d, st = decide(SWEEPING, reading(t=118, mergeable=400 * MIB, full_scans=2, pages_scanned=228200,
                                     pages_sharing=40060, ksmd_cpu=2.2), st)
    assert d.scan_rule == "sweep" and d.targets["pages_to_scan"] == 256   # the merging pace
    assert ("sweep: idle for 106s; one pass cost 1.05 ksmd CPU-s, so a sweep every 105s costs 0.01 of a core "
            "(sweep_cpu)") in d.reason
    # The rest of the pass ksmd is in, then one whole pass: two boundaries before it may idle.
    assert st.adaptive.need_passes == 2 and st.adaptive.mode is AdaptiveMode.merging
    d, st = decide(SWEEPING, reading(t=120, mergeable=400 * MIB, full_scans=3, pages_scanned=250000,
                                     pages_sharing=40060, ksmd_cpu=2.3), st)
    assert d.scan_rule == "merging"
    d, st = decide(SWEEPING, reading(t=124, mergeable=400 * MIB, full_scans=4, pages_scanned=352400,
                                     pages_sharing=40060, ksmd_cpu=2.6), st)
    assert d.scan_rule == "idle"
    # The next sweep is spaced by what this one cost: 0.4 CPU-s over 2 boundaries, 20 s.
    assert st.adaptive.pass_cpu == pytest.approx(0.2) and st.adaptive.idle_at.monotonic == 124
    d, _ = decide(SWEEPING, reading(t=143, mergeable=400 * MIB, full_scans=4, pages_scanned=354300,
                                    pages_sharing=40060, ksmd_cpu=2.6), st)
    assert d.scan_rule == "idle"
    d, _ = decide(SWEEPING, reading(t=145, mergeable=400 * MIB, full_scans=4, pages_scanned=354500,
                                    pages_sharing=40060, ksmd_cpu=2.6), st)
    assert d.scan_rule == "sweep"


def test_no_sweep_when_sweep_cpu_is_0_or_ksmd_cpu_is_unknown():
    for policy, cpu in ((ADAPTIVE, True), (SWEEPING, False)):
        st = _idle_after_a_trickle(policy, cpu)
        d, _ = decide(policy, reading(t=1e6, mergeable=400 * MIB, full_scans=2, pages_scanned=228000,
                                      pages_sharing=40060, ksmd_cpu=2.2 if cpu else None), st)
        assert d.scan_rule == "idle" and "sweep" not in d.reason


def test_a_sweeps_state_survives_the_trace():
    st = _idle_after_a_trickle(SWEEPING)
    back = state_from_dict(json.loads(json.dumps(state_to_dict(st))))
    assert back.adaptive.idle_at == st.adaptive.idle_at and back.adaptive.pass_cpu == st.adaptive.pass_cpu
    with pytest.raises(ValueError, match="state_before: expected a finite number"):
        state_from_dict({**state_to_dict(st), "pass_cpu": "1"})


PARKING = parse_policy(ADAPTIVE_TEXT.replace("resume_growth: 64MiB", "resume_growth: 64MiB, sweep_cpu: 0.01, park: true"))


def _parked(policy=PARKING):
    """Two passes over 400 MiB (one per 4 s: 256 pages per 10 ms), the second armed to park
    and ended parked (the daemon wrote pages_to_scan 0 at full_scans 2)."""
    merge = 400 * MIB
    d, st = decide(policy, reading(t=0, mergeable=merge, pages_to_scan=100), EngineState())
    assert d.park_at is None and st.adaptive.need_passes == 2   # two passes to go: not the last
    d, st = decide(policy, reading(t=5, mergeable=merge, full_scans=1, pages_scanned=102400, pages_to_scan=256,
                                   ksmd_cpu=1.0), st)
    # The last pass: armed, with a 50 ms sleep between batches (the daemon's window to
    # write at the boundary) and the pages per batch scaled to keep the pace.
    assert d.park_at == 2 and (d.targets["pages_to_scan"], d.targets["sleep_millisecs"]) == (1280, 50)
    assert "park at full_scans 2" in d.reason
    return d, st


def _at_park(t: float):
    """A tick of the parked ksmd _parked() leaves: full_scans 2, pages_to_scan 0, no new merge."""
    return reading(t=t, mergeable=400 * MIB, full_scans=2, pages_scanned=204800, pages_sharing=50000,
                   pages_to_scan=0, ksmd_cpu=2.0)


def test_park_stops_ksmd_where_the_last_pass_ends_with_no_check():
    _, st = _parked()
    d, st = decide(PARKING, _at_park(10), st)
    # The interval merged 488 per 1000 pages: without park that is a check at a tenth of the pace.
    assert d.scan_rule == "park" and d.park_at is None
    assert (d.targets["pages_to_scan"], d.targets["sleep_millisecs"], d.targets["run"]) == (0, 1000, 1)
    assert "ksmd stopped where the last one ended (pages_to_scan 0): parked at the boundary" in d.reason
    assert st.adaptive.parked and st.adaptive.mode is AdaptiveMode.idle
    d, st = decide(PARKING, _at_park(20), st)
    assert d.scan_rule == "park" and d.targets["pages_to_scan"] == 0
    # A guest starts: it joins the end of ksmd's list, so two passes, not three.
    d, st = decide(PARKING, reading(t=25, mergeable=600 * MIB, full_scans=2, pages_scanned=204800,
                                    pages_sharing=50000, pages_shared=100, pages_to_scan=0, ksmd_cpu=2.0), st)
    assert d.scan_rule == "resume" and st.adaptive.need_passes == 2 and d.park_at is None
    assert d.targets["pages_to_scan"] == 384 and not st.adaptive.parked


def test_a_park_that_missed_the_boundary_goes_on_as_without_park():
    _, st = _parked()
    # The daemon could not write in time: pages_to_scan is as the armed tick set it.
    d, st = decide(PARKING, reading(t=10, mergeable=400 * MIB, full_scans=2, pages_scanned=204800,
                                    pages_sharing=50000, pages_to_scan=1280, ksmd_cpu=2.0), st)
    assert d.scan_rule == "merging" and st.adaptive.verifying and d.park_at is None
    assert "ksmd was not parked where the last pass ended (full_scans 2, pages_to_scan as it was)" in d.reason
    # Idle from mid-list: a guest that starts later costs one pass more, as without park.
    d, st = decide(PARKING, reading(t=12, mergeable=400 * MIB, full_scans=2, pages_scanned=215000,
                                    pages_sharing=50001, pages_to_scan=26, ksmd_cpu=2.1), st)
    assert d.scan_rule == "idle" and not st.adaptive.parked
    d, st = decide(PARKING, reading(t=14, mergeable=600 * MIB, full_scans=2, pages_scanned=215100,
                                    pages_sharing=50001, pages_shared=10, pages_to_scan=100, ksmd_cpu=2.1), st)
    assert d.scan_rule == "resume" and st.adaptive.need_passes == 3


def test_a_parked_ksmd_moved_by_someone_else_is_no_longer_at_a_boundary():
    _, st = _parked()
    _, st = decide(PARKING, _at_park(10), st)
    d, st = decide(PARKING, reading(t=12, mergeable=400 * MIB, full_scans=2, pages_scanned=205000,
                                    pages_sharing=50000, pages_to_scan=100, ksmd_cpu=2.0), st)
    assert d.scan_rule == "idle" and "ksmd left the boundary it was parked at" in d.reason
    d, st = decide(PARKING, reading(t=14, mergeable=600 * MIB, full_scans=2, pages_scanned=205200,
                                    pages_sharing=50000, pages_shared=10, pages_to_scan=100, ksmd_cpu=2.0), st)
    assert st.adaptive.need_passes == 3


def test_a_sweep_from_a_parked_ksmd_is_one_pass_armed_to_park_again():
    _, st = _parked()
    _, st = decide(PARKING, _at_park(10), st)
    # 2 CPU-s over 2 passes at 0.01 of a core: a sweep 100 s after parking.
    d, st = decide(PARKING, _at_park(111), st)
    assert d.scan_rule == "sweep" and st.adaptive.need_passes == 1 and d.park_at == 3
    assert (d.targets["pages_to_scan"], d.targets["sleep_millisecs"]) == (1280, 50)
    d, st = decide(PARKING, reading(t=116, mergeable=400 * MIB, full_scans=3, pages_scanned=307200,
                                    pages_sharing=50100, pages_to_scan=0, ksmd_cpu=3.0), st)
    assert d.scan_rule == "park" and st.adaptive.parked


def test_a_policy_without_park_does_not_keep_ksmd_parked():
    _, st = _parked()
    _, st = decide(PARKING, _at_park(10), st)
    d, _ = decide(SWEEPING, _at_park(20), st)
    assert d.scan_rule == "idle" and d.targets["pages_to_scan"] == 100


def test_a_park_survives_the_trace_and_the_cpu_budget():
    d, st = _parked()
    back = state_from_dict(json.loads(json.dumps(state_to_dict(st))))
    assert back.adaptive.park_at == 2 and back == st
    assert decision_to_dict(d)["park_at"] == 2
    with pytest.raises(ValueError, match="state_before: expected true or false"):
        state_from_dict({**state_to_dict(st), "parked": 1})
    capped = parse_policy(ADAPTIVE_TEXT.replace("resume_growth: 64MiB", "resume_growth: 64MiB, park: true")
                          .replace("scan:\n", "scan:\n  cpu_budget: 10\n"))
    d, st = decide(capped, reading(t=0, mergeable=400 * MIB, ksmd_cpu=0.0), EngineState())
    d, st = decide(capped, reading(t=5, mergeable=400 * MIB, full_scans=1, pages_scanned=102400, ksmd_cpu=2.5),
                   st)
    assert d.scan_rule == "cpu_cap" and d.park_at == 2 and d.targets["pages_to_scan"] < 1280


def test_park_is_true_or_false():
    for bad in ("1", "yes", "'true'", "[]"):
        with pytest.raises(PolicyError, match="park"):
            parse_policy(ADAPTIVE_TEXT.replace("resume_growth: 64MiB", "resume_growth: 64MiB, park: %s" % bad))


def test_the_default_policy_runs_a_pass_for_a_fifth_of_the_phase_yield_and_not_for_less():
    """policies/default.yaml's min_pass_yield (0.2): on the bench's fill workload checks at 13%
    and 16% ran passes that gained 6 to 7% of the phase's yield (bench/README.md)."""
    share = load_policy("default").policy.scan.adaptive.min_pass_yield
    assert share == 0.2
    policy = parse_policy(ADAPTIVE_TEXT.replace("resume_growth: 64MiB", "resume_growth: 64MiB, min_pass_yield: %g"
                                                % share))
    merge = 400 * MIB
    # The phase: 78.1 MiB per CPU-s. 320 merges for 0.1 CPU-s: 12.5 MiB per CPU-s, 16%.
    d, _ = decide(policy, reading(t=12, mergeable=merge, full_scans=2, pages_scanned=217600, pages_sharing=40320,
                                  ksmd_cpu=2.1), _two_passes_then_check(policy, merge))
    assert d.scan_rule == "idle" and "(16.0%)" in d.reason and "a pass needs 0.2 of it" in d.reason
    # 1280 merges: 50 MiB per CPU-s, 64%: the pass runs.
    d, st = decide(policy, reading(t=12, mergeable=merge, full_scans=2, pages_scanned=217600, pages_sharing=41280,
                                   ksmd_cpu=2.1), _two_passes_then_check(policy, merge))
    assert d.scan_rule == "merging" and st.adaptive.need_passes == 3 and "(64.0%)" in d.reason


def test_a_guest_starting_after_a_trickle_brings_full_pace_back():
    merge = 400 * MIB
    st = _two_passes_then_check(ADAPTIVE, merge)
    d, st = decide(ADAPTIVE, reading(t=12, mergeable=merge, full_scans=2, pages_scanned=217600, pages_sharing=40060,
                                     ksmd_cpu=2.1), st)
    assert d.scan_rule == "idle"
    d, st = decide(ADAPTIVE, reading(t=14, mergeable=merge, full_scans=2, pages_scanned=217800, pages_sharing=40061,
                                     ksmd_cpu=2.11), st)
    assert d.scan_rule == "idle"
    # A 200 MiB guest starts: 153600 pages, one pass per 4 s -> 384 per 10 ms, passes from 0.
    d, st = decide(ADAPTIVE, reading(t=16, mergeable=merge + 200 * MIB, full_scans=2, pages_scanned=218000,
                                     pages_sharing=40062, ksmd_cpu=2.12), st)
    assert d.scan_rule == "resume" and d.targets["pages_to_scan"] == 384
    assert st.adaptive.passes == 0 and st.adaptive.need_passes == 3 and "grew by 200.0 MiB" in d.reason
    # The new phase is judged on its own average, from this tick's counters.
    assert st.adaptive.phase_start is not None and st.adaptive.phase_start.saved_pages == 40062


def _pre_6_7(t: float, **values) -> Readings:
    """Readings as a kernel before Linux 6.7 gives them (e.g. Debian 12's 6.1):
    no pages_scanned file at all, so no per-interval page count."""
    r = reading(t=t, **values)
    del r.ksm.values["pages_scanned"]
    return r


def test_a_kernel_without_pages_scanned_judges_whole_passes_and_idles():
    """Before the counter existed every interval looked empty (0 pages scanned), and the
    adaptive strategy merged at full pace forever. Without it, a pass is judged whole, at the
    tick that sees its boundary, with the list as its page count."""
    merge = 400 * MIB   # 102400 pages; one pass per 5 s, ticks every 2.5 s
    sharing = {0: 0, 1: 0, 2: 50000, 3: 50025}
    st, rules = EngineState(), []
    for i in range(8):
        fs = i // 2
        d, st = decide(ADAPTIVE, _pre_6_7(2.5 * i, mergeable=merge, full_scans=fs, ksmd_cpu=0.2 * i,
                                          pages_sharing=sharing.get(fs, 50025)), st)
        rules.append(d.scan_rule)
        if i == 4:   # two passes: the second merged 50000 (a pass's worth): one more, judged on itself
            assert d.scan_rule == "merging" and st.adaptive.need_passes == 3
            assert "still 488.28 new merges per 1000 pages over the last pass (5s)" in d.reason
            assert "the last pass gained" in d.reason
        if i == 6:   # the third found 25 in 102400 pages: 0.24 per 1000 < idle_yield 1
            assert d.scan_rule == "idle" and "3 full passes since merging started" in d.reason
            assert "found 0.24 new merges per 1000 pages" in d.reason
    assert rules == ["merging"] * 6 + ["idle"] * 2


def test_a_kernel_without_pages_scanned_declines_a_pass_for_a_trickle():
    """Guests rewriting memory: the third pass still finds 4 per 1000 pages (above idle_yield),
    but gains 1.6% of the merging phase's yield per CPU-second (3.91 MiB against 244): idle,
    not a fourth pass."""
    merge = 400 * MIB
    sharing = {0: 0, 1: 0, 2: 50000, 3: 50400}
    st = EngineState()
    for i in range(7):
        fs = i // 2
        d, st = decide(ADAPTIVE, _pre_6_7(2.5 * i, mergeable=merge, full_scans=fs, ksmd_cpu=0.2 * i,
                                          pages_sharing=sharing[fs]), st)
    assert d.scan_rule == "idle" and "over the last pass" in d.reason and "not worth it" in d.reason
    assert "3.91 MiB saved per ksmd CPU-second (1.6%), the merging phase 244" in d.reason
    assert st.adaptive.need_passes == 3


# -- every accepted setting is enforced or refused -----------------------------------------
# Any policy the loader accepts, on any readings, decides only targets the writer accepts:
# a policy that validates is a policy whose every write the kernel takes.

import itertools  # noqa: E402
import json  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as hs  # noqa: E402

from ksmctl.errors import PolicyError  # noqa: E402
from ksmctl.kernel.writer import validate_value  # noqa: E402
from ksmctl.policy.model import Signal  # noqa: E402

U32 = 2 ** 32 - 1
_EDGES = [0, 1, 2, 100, 101, 60000, 60001, U32, U32 + 1, 2 ** 63 - 1, 2 ** 63, -1]
# Mostly plausible values (so most policies load), with the kernel's edges and junk mixed in.
_plausible = hs.one_of(hs.integers(1, 100), hs.integers(1, 60000), hs.integers(1, 200000))
_junk = hs.one_of(hs.integers(-10, 2 ** 64), hs.floats(0, 1e6), hs.floats(allow_nan=True, allow_infinity=True))
numbers = hs.one_of(*[_plausible] * 8, *[hs.sampled_from(_EDGES)] * 3, _junk)
small = hs.one_of(hs.integers(1, 100), hs.integers(1, 100), hs.floats(0.1, 100), hs.sampled_from(_EDGES))
thresholds = hs.one_of(numbers, hs.sampled_from(["20%", "2GiB", "0%", "100%", "-1"]),
                       hs.fixed_dictionaries({"percent": small}, optional={"at_least": numbers, "at_most": numbers}))
conditions = hs.builds(lambda s, op, t: {"signal": s.value, op: t}, hs.sampled_from(list(Signal)),
                       hs.sampled_from(["below", "at_most", "above", "at_least"]), thresholds)
points = hs.fixed_dictionaries({"pages_to_scan": numbers, "sleep_millisecs": numbers})
policies = hs.fixed_dictionaries({"name": hs.just("prop"), "run": hs.fixed_dictionaries({
        "mode": hs.sampled_from(["conditional", "conditional", "always", "off"]),
        "start_when": hs.lists(conditions, min_size=1, max_size=3)}, optional={"stop_when": hs.lists(conditions, max_size=3),
        "on_stop": hs.sampled_from(["stop", "background"]), "background": points}),
    "scan": hs.fixed_dictionaries({"strategy": hs.sampled_from(["step", "adaptive", "advisor"])}, optional={
        "pages_to_scan": hs.fixed_dictionaries({}, optional={k: numbers for k in ("initial", "min", "max",
                                                                                  "boost", "decay")}),
        "boost_when": hs.lists(conditions, max_size=2),
        "sleep_millisecs": hs.fixed_dictionaries({}, optional={"base": numbers, "reference_memory": numbers,
                                                               "floor": numbers, "ceiling": numbers}),
        "cpu_budget": small,
        "adaptive": hs.fixed_dictionaries({}, optional={
            "target_pass_seconds": hs.one_of(numbers, hs.floats(1e-300, 1e-3)), "idle_yield": small,
            "min_passes": small, "verify_rate": hs.floats(0, 1), "idle": points, "resume_growth": numbers,
            "min_pass_yield": hs.one_of(hs.floats(0, 1), numbers)}),
        "advisor": hs.fixed_dictionaries({}, optional={k: numbers for k in (
            "target_scan_time", "max_cpu", "min_pages_to_scan", "max_pages_to_scan")}),
    }),
})

# And, deeper: a valid policy with one to three of its numbers replaced by an edge or junk.
TEMPLATE = {"name": "prop", "run": {
    "mode": "conditional", "start_when": [{"signal": "memory_available", "below": "50%"}],
    "stop_when": [{"signal": "memory_available", "above": "60%"}], "on_stop": "background",
    "background": {"pages_to_scan": 100, "sleep_millisecs": 1000}}, "scan": {
    "pages_to_scan": {"initial": 100, "min": 64, "max": 1250, "boost": 300, "decay": 50},
    "boost_when": [{"signal": "memory_free", "below": "20%"}],
    "sleep_millisecs": {"base": 20, "floor": 10, "ceiling": 60000}, "cpu_budget": 50,
    "adaptive": {"target_pass_seconds": 1, "idle_yield": 1.0, "min_passes": 2, "verify_rate": 0.1,
                 "min_pass_yield": 0.05,
                 "idle": {"pages_to_scan": 100, "sleep_millisecs": 1000}, "resume_growth": 67108864},
    "advisor": {"target_scan_time": 200, "max_cpu": 70, "min_pages_to_scan": 500, "max_pages_to_scan": 30000}}}


def _leaves(d, path=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, path + (k,))
        elif isinstance(v, (int, float)):
            yield path + (k,)


# The numbers each strategy reads (step's also apply to the advisor's fallback).
LEAVES = {s: [p for p in _leaves(TEMPLATE) if p[:2] not in (("scan", "adaptive"), ("scan", "advisor"))
              or p[1] == s] for s in ("step", "adaptive", "advisor")}


@hs.composite
def mutated(draw):
    doc = json.loads(json.dumps(TEMPLATE))
    strategy = doc["scan"]["strategy"] = draw(hs.sampled_from(["step", "adaptive", "advisor"]))
    doc["run"]["mode"] = draw(hs.sampled_from(["conditional", "always"]))
    for path in draw(hs.lists(hs.sampled_from(LEAVES[strategy]), min_size=1, max_size=draw(hs.sampled_from([1, 1, 2])))):
        node = doc
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = draw(hs.one_of(hs.sampled_from(_EDGES), hs.sampled_from(_EDGES), _junk, _plausible))
    return doc


big = hs.integers(0, 2 ** 45)
counters = hs.fixed_dictionaries({"run": hs.sampled_from([0, 1, 2]), "pages_to_scan": big, "sleep_millisecs": big,
                                  **{k: big for k in ("pages_shared", "pages_sharing", "pages_unshared",
                                                      "pages_volatile", "full_scans", "ksm_zero_pages")}},
                                 optional={"pages_scanned": big})   # absent before Linux 6.7
meminfos = hs.builds(MemInfo, total=hs.integers(1, 2 ** 45), available=big, free=big, buffers=big, cached=big)
psis = hs.builds(Psi, *[hs.floats(0, 100)] * 4)
vms = hs.lists(hs.builds(VmReading, uuid=hs.text(max_size=3), name=hs.just("g"), rss=hs.one_of(hs.none(), big),
                         balloon_current=hs.one_of(hs.none(), big), balloon_maximum=hs.one_of(hs.none(), big)),
               max_size=3).map(tuple)


@hs.composite
def tick_series(draw):
    advisor = draw(hs.sampled_from([True, True, False]))
    t, out = 0.0, []
    for _ in range(draw(hs.integers(1, 6))):
        t += draw(hs.floats(0, 1000))
        ksm_state = KsmState(values=draw(counters), advisor_mode=draw(hs.sampled_from(["none", "scan-time"]))
                             if advisor else None, advisor_modes=("none", "scan-time") if advisor else (),
                             unsupported=frozenset() if advisor else frozenset({"advisor_mode"}), page_size=4096)
        out.append(Readings(monotonic=t, wall=1e9 + t, ksm=ksm_state, meminfo=draw(hs.one_of(hs.none(), meminfos)),
                            psi=draw(hs.one_of(hs.none(), psis)),
                            ksmd_cpu_seconds=draw(hs.one_of(hs.none(), hs.floats(0, 1e6))),
                            vms=draw(hs.one_of(hs.none(), vms)), mergeable_rss=draw(hs.one_of(hs.none(), big))))
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(hs.one_of(policies, mutated(), mutated()), tick_series())
def test_every_target_of_an_accepted_policy_is_one_the_kernel_accepts(doc, ticks):
    try:
        policy = parse_policy(json.dumps(doc), "prop.yaml")
    except PolicyError:
        return  # refused at load time, with a message: the other half of the property
    st = EngineState()
    for r in ticks:
        d, st = decide(policy, r, st)
        for knob, value in d.targets.items():
            assert validate_value(knob, value, r.ksm) == value, (knob, value)


def _edge_readings():
    """Stopped and running, with and without the advisor, small and huge mergeable memory."""
    out = []
    for available in (7 * GIB, 1 * GIB):
        for mergeable in (None, 400 * MIB, 2 ** 45):
            r = reading(t=0, available=available, mergeable=mergeable)
            out.append([r, reading(t=10, available=available, mergeable=mergeable, full_scans=3, pages_scanned=10 ** 6,
                                   ksmd_cpu=9.0)])
            old = KsmState(values=dict(r.ksm.values), unsupported=frozenset({"advisor_mode"}))
            out.append([Readings(monotonic=0, wall=0, ksm=old, meminfo=r.meminfo, vms=r.vms, mergeable_rss=mergeable)])
    return out


EDGE_READINGS = _edge_readings()


@pytest.mark.parametrize("path", sorted({p for ps in LEAVES.values() for p in ps}), ids=".".join)
def test_every_number_at_the_kernels_edges_is_refused_or_written_within_range(path):
    """Exhaustive over one field at a time, where the random search above may miss one; once
    as shipped and once with the rate and sleep pushed to their clamps (a tiny pass time, a
    huge reference_memory and boost), so the clamps' own bounds are reached too."""
    for strategy, stress in itertools.product(("step", "adaptive", "advisor"), (False, True)):
        for value in _EDGES + [0.5, 1e-300, 1e300, float("nan"), float("inf")]:
            doc = json.loads(json.dumps(TEMPLATE))
            doc["scan"]["strategy"] = strategy
            if stress:
                doc["scan"]["adaptive"]["target_pass_seconds"] = 1e-300
                doc["scan"]["sleep_millisecs"]["reference_memory"] = 2 ** 62
                doc["scan"]["pages_to_scan"]["boost"] = U32
            node = doc
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = value
            try:
                policy = parse_policy(json.dumps(doc), "edge.yaml")
            except PolicyError:
                continue
            for ticks in EDGE_READINGS:
                st = EngineState()
                for r in ticks:
                    d, st = decide(policy, r, st)
                    for knob, v in d.targets.items():
                        assert validate_value(knob, v, r.ksm) == v, (strategy, value, knob, v)
