"""When the estimator reads: the daemon's periodic estimate and the read-rate limit.

The daemon's optional estimate (config `estimate:`) runs in a background thread,
rate-limited, so a scan of many GiB never delays a tick; each finished scan replaces the
collector's EstimateSummary, which the policy sees as the `merge_potential` signal and
the exporter as the estimate metrics. No numpy at import: the scan engine is imported
only when an estimate runs, so a daemon with estimates off never loads it.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Callable, Optional

from ksmctl.config import EstimateConfig
from ksmctl.errors import KsmctlError, UsageError
from ksmctl.readings import EstimateSummary

log = logging.getLogger("ksmctl.estimate")


class TokenBucket:
    """Limits the bytes read per second; a burst of 1/10 s keeps sleeps coarse."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.rate = self.check_rate(rate)
        self.burst_s = 0.1
        self._clock = clock
        self._sleep = sleep
        self._due = clock() - self.burst_s   # start with a full burst

    @staticmethod
    def check_rate(rate: float) -> float:
        # NaN passes `rate <= 0` and would disable the limit; a rate under a byte per second
        # makes n / rate infinite (time.sleep(inf) raises OverflowError).
        if not (math.isfinite(rate) and rate >= 1):
            raise UsageError("rate limit must be a finite number of at least 1 byte/s, got %r" % rate)
        return float(rate)

    def consume(self, n: int) -> None:
        now = self._clock()
        self._due = max(self._due, now - self.burst_s) + n / self.rate
        if self._due > now:
            self._sleep(self._due - now)


class EstimateFailed(KsmctlError):
    """The scan ran but read nothing it could count."""


class PeriodicEstimate:
    def __init__(self, config: EstimateConfig, proc_root: str, sys_root: str,
                 publish: Callable[[EstimateSummary], None],
                 on_error: Optional[Callable[[str], None]] = None) -> None:
        self.config = config
        self.proc_root = proc_root
        self.sys_root = sys_root
        self.publish = publish
        self.on_error = on_error
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def run_once(self) -> Optional[EstimateSummary]:
        from ksmctl.estimate.discover import discover_mergeable
        from ksmctl.estimate.scan import Estimator   # numpy: only when estimates are on
        t0 = time.monotonic()
        try:
            targets = discover_mergeable(self.proc_root, exclude=[os.getpid()])
            est = Estimator(proc_root=self.proc_root, sys_root=self.sys_root,
                            rate_limit_bytes_per_s=self.config.rate_mib_s * 1024 * 1024)
            result = est.run(targets)
            if targets and not result.targets:
                # Nothing readable is not "nothing to gain": publishing zeros would tell a
                # merge_potential policy to stop KSM.
                raise EstimateFailed("no process could be scanned: %s" % "; ".join(
                    "%s (pid %d): %s" % (s.name, s.pid, s.reason) for s in result.skipped[:3]))
        except KsmctlError as e:
            self._failed(e.message)
            return None
        except OSError as e:
            self._failed("%s" % e)
            return None
        ps = result.page_size
        summary = EstimateSummary(achievable=result.achievable * ps, achieved=result.achieved * ps,
                                  scanned=result.scanned_pages * ps, finished_wall=time.time(),
                                  duration_seconds=time.monotonic() - t0)
        log.info("estimate: %d processes, achievable %d MiB, achieved %d MiB (%.1f s)", len(targets),
                 summary.achievable >> 20, summary.achieved >> 20, summary.duration_seconds)
        self.publish(summary)
        return summary

    def _failed(self, message: str) -> None:
        log.error("periodic estimate failed: %s", message)
        if self.on_error:
            self.on_error(message)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            self._stop.wait(self.config.interval)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ksmctl-estimate", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
