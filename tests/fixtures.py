"""Fixture /sys and /proc trees, written as files so the real readers parse them."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

NEW_KERNEL_KSM: Dict[str, str] = {
    "run": "1", "pages_to_scan": "100", "sleep_millisecs": "20", "pages_shared": "1000",
    "pages_sharing": "25000", "pages_unshared": "300", "pages_volatile": "7", "pages_scanned": "123456",
    "pages_skipped": "42", "full_scans": "9", "general_profit": "101000000", "ksm_zero_pages": "500",
    "use_zero_pages": "0", "merge_across_nodes": "1", "max_page_sharing": "256",
    "stable_node_chains": "0", "stable_node_dups": "0", "stable_node_chains_prune_millisecs": "2000",
    "smart_scan": "1", "advisor_mode": "[none] scan-time", "advisor_target_scan_time": "200",
    "advisor_max_cpu": "70", "advisor_min_pages_to_scan": "500", "advisor_max_pages_to_scan": "30000",
}
# A 5.15-era kernel: no general_profit, ksm_zero_pages, smart_scan or advisor files.
OLD_KERNEL_DROPS = ("general_profit", "ksm_zero_pages", "smart_scan", "advisor_mode",
                    "advisor_target_scan_time", "advisor_max_cpu", "advisor_min_pages_to_scan",
                    "advisor_max_pages_to_scan", "pages_skipped")

MEMINFO = """MemTotal:       24683656 kB
MemFree:        20000000 kB
MemAvailable:   21000000 kB
Buffers:          100000 kB
Cached:           900000 kB
SwapCached:            0 kB
AnonPages:       2000000 kB
SwapTotal:             0 kB
SwapFree:              0 kB
"""
PSI = """some avg10=1.50 avg60=0.75 avg300=0.10 total=123456
full avg10=0.25 avg60=0.05 avg300=0.00 total=2345
"""
KSM_STAT_NEW = """ksm_rmap_items 2048
ksm_zero_pages 3
ksm_merging_pages 1500
ksm_process_profit 5963776
ksm_merge_any: no
ksm_mergeable: yes
"""


def make_sys(root: Path, overrides: Optional[Dict[str, str]] = None, drop=()) -> Path:
    d = root / "kernel/mm/ksm"
    d.mkdir(parents=True, exist_ok=True)
    values = dict(NEW_KERNEL_KSM)
    values.update(overrides or {})
    for name, value in values.items():
        if name not in drop:
            (d / name).write_text(value + "\n")
    return root


def make_proc(root: Path, meminfo: str = MEMINFO, psi: Optional[str] = PSI, ksmd_ticks=(150, 50),
              processes: Optional[Dict[int, Dict[str, str]]] = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "meminfo").write_text(meminfo)
    if psi is not None:
        (root / "pressure").mkdir(exist_ok=True)
        (root / "pressure/memory").write_text(psi)
    k = root / "36"
    k.mkdir(exist_ok=True)
    (k / "comm").write_text("ksmd\n")
    (k / "cmdline").write_text("")
    stat = "36 (ksmd) S 2 0 0 0 -1 2129984 0 0 0 0 %d %d 0 0 25 5 1 0 30 0 0 18446744073709551615" % ksmd_ticks
    (k / "stat").write_text(stat + " 0 0 0 0 0 0 0 2147483647 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n")
    for pid, files in (processes or {}).items():
        p = root / str(pid)
        p.mkdir(exist_ok=True)
        for name, content in files.items():
            (p / name).write_text(content)
    return root


def cli_host(tmp: Path) -> Dict[str, object]:
    """Fixture /sys and /proc trees and a config that points every path into tmp (no
    libvirt, no exporter): what a CLI test passes as --config, --sys-root, --proc-root."""
    sys_root = make_sys(tmp / "sys")
    proc_root = make_proc(tmp / "proc")
    cfg = tmp / "config.yaml"
    cfg.write_text("state_file: %s\nlibvirt: false\nexporter: {enabled: false}\nsys_root: %s\nproc_root: %s\n"
                   "run_root: %s\nstate_dir: %s\n" % (tmp / "state.json", sys_root, proc_root, tmp / "run",
                                                     tmp / "lib"))
    return {"sys": str(sys_root), "proc": str(proc_root), "config": str(cfg), "tmp": tmp}
