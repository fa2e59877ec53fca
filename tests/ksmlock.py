"""Serialize every test (and benchmark) that touches the host's global KSM state.

KSM is one kernel-wide resource: two tests that both write /sys/kernel/mm/ksm, or that
measure pages_sharing while another test merges, corrupt each other. Anything that
touches the real KSM takes this lock (an flock, so it dies with the process) and
restores the knobs it found on the way out.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Dict, Iterator

LOCK_PATH = os.environ.get("KSMCTL_TEST_LOCK", "/run/ksmctl-tests.lock")
KSM = Path("/sys/kernel/mm/ksm")
# Knobs restored after a test; order matters (run last, after the scan knobs).
RESTORE_KNOBS = (
    "advisor_mode", "pages_to_scan", "sleep_millisecs", "use_zero_pages",
    "max_page_sharing", "smart_scan", "advisor_target_scan_time", "advisor_max_cpu",
    "advisor_min_pages_to_scan", "advisor_max_pages_to_scan",
)


def _read(name: str) -> str:
    text = (KSM / name).read_text().strip()
    if name == "advisor_mode":  # "[none] scan-time" -> "none"
        return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else text
    return text


def snapshot() -> Dict[str, str]:
    return {n: _read(n) for n in RESTORE_KNOBS + ("merge_across_nodes", "run") if (KSM / n).exists()}


def _write(name: str, value: str) -> None:
    try:
        (KSM / name).write_text(value)
    except OSError:
        pass  # e.g. pages_to_scan while the advisor is active; advisor_mode first fixes that


def unmerge_and_wait(deadline_s: float = 120.0) -> None:
    """run=2 and wait for pages_sharing to drain. Tests only merge their own small
    allocations (well below MemAvailable), so unmerging is always absorbable here."""
    _write("run", "2")
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if int(_read("pages_sharing")) == 0 and int(_read("pages_shared")) == 0:
            return
        time.sleep(0.05)
    raise RuntimeError("pages_sharing did not drain within %ss after run=2" % deadline_s)


def restore(saved: Dict[str, str]) -> None:
    for name in RESTORE_KNOBS:
        if name in saved and _read(name) != saved[name]:
            _write(name, saved[name])
    if "merge_across_nodes" in saved and _read("merge_across_nodes") != saved["merge_across_nodes"]:
        # The kernel takes it only with nothing merged (EBUSY otherwise).
        unmerge_and_wait()
        _write("merge_across_nodes", saved["merge_across_nodes"])
    if "run" in saved and _read("run") != saved["run"]:
        if saved["run"] == "0" and _read("run") == "1":
            # Leave nothing merged behind us when the host had KSM off.
            unmerge_and_wait()
        _write("run", saved["run"])


@contextlib.contextmanager
def ksm_exclusive(timeout_s: float = 1800.0) -> Iterator[Dict[str, str]]:
    """Hold the global KSM lock; yield the knobs as found; restore them afterwards."""
    Path(LOCK_PATH).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
    end = time.monotonic() + timeout_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > end:
                    raise TimeoutError("KSM test lock %s held for over %ss" % (LOCK_PATH, timeout_s))
                time.sleep(0.2)
        saved = snapshot()
        try:
            yield saved
        finally:
            restore(saved)
    finally:
        os.close(fd)
