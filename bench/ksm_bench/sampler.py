"""Samples KSM, memory, PSI and ksmd's CPU time once a second, in a thread."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

KSM = Path("/sys/kernel/mm/ksm")
PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")
COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "ksm_zero_pages",
            "general_profit", "full_scans", "pages_scanned", "pages_skipped", "stable_node_chains",
            "stable_node_dups")
TUNABLES = ("run", "pages_to_scan", "sleep_millisecs", "use_zero_pages", "max_page_sharing", "smart_scan")


def ksmd_pid() -> Optional[int]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if Path("/proc/%s/comm" % name).read_text().strip() == "ksmd":
                    return int(name)
            except OSError:
                continue
    return None


def cpu_seconds(pid: int) -> float:
    text = Path("/proc/%d/stat" % pid).read_text()
    f = text[text.rindex(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / TICK


def _int(name: str) -> Optional[int]:
    try:
        return int((KSM / name).read_text())
    except (OSError, ValueError):
        return None


def read_psi() -> Dict[str, float]:
    out: Dict[str, float] = {}
    try:
        for line in Path("/proc/pressure/memory").read_text().splitlines():
            w = line.split()
            for kv in w[1:]:
                k, _, v = kv.partition("=")
                if k in ("avg10", "avg60"):
                    out["psi_%s_%s" % (w[0], k)] = float(v)
    except OSError:
        pass
    return out


def sample(ksmd: Optional[int]) -> Dict[str, object]:
    s: Dict[str, object] = {"mono": time.monotonic()}
    for n in COUNTERS + TUNABLES:
        s[n] = _int(n)
    try:
        text = (KSM / "advisor_mode").read_text()
        s["advisor_mode"] = text.split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        s["advisor_mode"] = None
    mi: Dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, rest = line.partition(":")
            if k in ("MemTotal", "MemFree", "MemAvailable", "Buffers", "Cached"):
                mi[k] = int(rest.split()[0]) * 1024
    s["mem_available"] = mi["MemAvailable"]
    s["mem_free"] = mi["MemFree"] + mi["Buffers"] + mi["Cached"]  # ksmtuned's "free"
    s.update(read_psi())
    s["ksmd_cpu"] = cpu_seconds(ksmd) if ksmd else None
    s["saved_pages"] = (s["pages_sharing"] or 0) + (s["ksm_zero_pages"] or 0)
    return s


class Sampler:
    """Appends one sample a second to `samples`, tagged with t (seconds since start) and
    the phase that `phase()` names at that moment."""

    def __init__(self, phase: Callable[[], str], extra: Optional[Callable[[], Dict[str, object]]] = None,
                 period: float = 1.0) -> None:
        self.phase, self.extra, self.period = phase, extra, period
        self.samples: List[Dict[str, object]] = []
        self.ksmd = ksmd_pid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.monotonic()

    def start(self) -> "Sampler":
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def take(self) -> Dict[str, object]:
        s = sample(self.ksmd)
        s["t"] = round(float(s["mono"]) - self.t0, 3)  # type: ignore[arg-type]
        s["phase"] = self.phase()
        if self.extra:
            s.update(self.extra())
        self.samples.append(s)
        return s

    def _run(self) -> None:
        nxt = time.monotonic()
        while not self._stop.is_set():
            self.take()
            nxt += self.period
            self._stop.wait(max(0.0, nxt - time.monotonic()))

    def stop(self) -> List[Dict[str, object]]:
        self._stop.set()
        self._thread.join()
        self.take()
        return self.samples
