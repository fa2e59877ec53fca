"""The controller loop: read (collectors), decide (policy), write (ksm_writer), record
(state file, trace, metrics observers). One log line per change, with its reason.

Signals: SIGHUP reloads config and policy (an invalid one is logged and the last good
one stays); SIGTERM/SIGINT stop, restoring the knobs found at start when configured.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from ksmctl import __version__
from ksmctl.collectors.host import CollectionFailed, HostCollector
from ksmctl.config import Config
from ksmctl.errors import ErrorSource, KsmctlError, PermissionDenied
from ksmctl.kernel.ownership import KnobOwnership, OnExternalChange
from ksmctl.kernel.writer import Change, KsmWriter
from ksmctl.policy.decide import Decision, EngineState, decide
from ksmctl.policy.loader import LoadedPolicy, load_policy
from ksmctl.readings import Readings
from ksmctl.service.state import StateFile
from ksmctl.service.trace import TraceWriter, decision_to_dict
from ksmctl.units import format_bytes

log = logging.getLogger("ksmctl.daemon")


@dataclass
class TickRecord:
    """What one tick did, handed to every observer (state file, metrics, notifier)."""

    policy: LoadedPolicy
    readings: Optional[Readings] = None
    decision: Optional[Decision] = None
    changes: List[Change] = field(default_factory=list)
    external: List[str] = field(default_factory=list)  # knobs someone else changed (once per change)
    errors: List[Tuple[ErrorSource, str]] = field(default_factory=list)  # (source, message)
    duration: float = 0.0
    ok: bool = False
    wall: float = 0.0


class NullNotifier:
    """Used when not under systemd (or when sdnotify is unavailable): does nothing."""

    def ready(self) -> None: ...
    def status(self, text: str) -> None: ...
    def watchdog(self) -> None: ...
    def reloading(self) -> None: ...
    def stopping(self) -> None: ...
    def watchdog_interval(self) -> Optional[float]: return None


def status_line(rec: TickRecord) -> str:
    """The one-line summary systemd shows (STATUS=) and `ksmctl status` repeats."""
    name = rec.policy.policy.name
    if rec.readings is None:
        return "policy %s, last tick failed: %s" % (name, rec.errors[-1][1] if rec.errors else "unknown")
    k = rec.readings.ksm
    saving = format_bytes(k.saved_bytes)
    if not k.running and not (rec.decision and rec.decision.targets.get("run") == 1):
        return "saving %s, policy %s, KSM stopped" % (saving, name)
    t = rec.decision.targets if rec.decision else {}
    if t.get("advisor_mode") == "scan-time":
        return "saving %s, policy %s, scan rate by kernel advisor" % (saving, name)
    return "saving %s, policy %s, scanning %s pages/%s ms" % (
        saving, name, t.get("pages_to_scan", k.get("pages_to_scan")), t.get("sleep_millisecs", k.get("sleep_millisecs")))


class Daemon:
    def __init__(self, config: Config, policy: LoadedPolicy, collector: HostCollector, writer: KsmWriter,
                 notifier: Any = None, observers: Optional[List[Callable[[TickRecord], None]]] = None,
                 config_loader: Optional[Callable[[], Config]] = None,
                 policy_loader: Callable[[str], LoadedPolicy] = load_policy,
                 policy_override: Optional[str] = None, state_file: Optional[StateFile] = None) -> None:
        self.config = config
        self.state_file = state_file or StateFile(config.state_file)
        self.loaded = policy
        self.collector = collector
        self.writer = writer
        self.notifier = notifier or NullNotifier()
        self.observers: List[Callable[[TickRecord], None]] = list(observers or [])
        self.config_loader = config_loader
        self.policy_loader = policy_loader
        self.policy_override = policy_override
        self.engine = EngineState()
        self.started = time.time()
        self.ticks = 0
        self.last: Optional[TickRecord] = None
        self._wake = threading.Event()
        self._stop = False
        self._reload = False
        self._tick_now = False
        self._ready_sent = False
        self.ownership = KnobOwnership()  # what we wrote: restore, drift, back-off
        self.trace: Optional[TraceWriter] = None
        self.on_shutdown: List[Callable[[], None]] = []  # e.g. stop the exporter's server
        self._setup_trace()

    # -- one tick -------------------------------------------------------------------------
    def tick(self) -> TickRecord:
        t0 = time.perf_counter()
        rec = TickRecord(policy=self.loaded, wall=time.time())
        try:
            readings = self.collector.collect()
        except CollectionFailed as e:
            rec.errors.append((e.source, e.message))
            log.error("skipping this tick: %s", e.message)
            return self._finish(rec, t0)
        rec.readings = readings
        rec.errors.extend(readings.errors)
        before = self.engine
        decision, self.engine = decide(self.loaded.policy, readings, before)
        rec.decision = decision
        on_change = OnExternalChange(self.loaded.policy.ownership.on_external_change)
        plan = self.ownership.plan(decision.targets, readings.ksm, on_change)
        for drift in plan.new_drifts:
            rec.external.append(drift.knob)
            log.warning("%s; policy says %s", drift.message(),
                        "back off" if on_change is OnExternalChange.BACK_OFF else "re-assert")
        try:
            rec.changes = self.writer.apply(plan.targets, readings.ksm, wrote=self.ownership.wrote)
            rec.ok = True
        except PermissionDenied:
            raise
        except KsmctlError as e:
            rec.errors.append((ErrorSource.SYSFS, e.message))
            log.error("%s", e.message)
        for c in rec.changes:
            log.info("%s %s -> %s (%s: %s)%s", c.knob, c.old, c.new, decision.run_rule + "/" + decision.scan_rule,
                     decision.reason, " [dry run]" if self.writer.dry_run else "")
        if self.trace is not None:
            try:
                self.trace.record(self.loaded.policy.name, self.loaded.sha256, readings, before, decision)
            except OSError as e:
                rec.errors.append((ErrorSource.TRACE, "cannot write trace %s: %s" % (self.trace.path, e.strerror)))
        return self._finish(rec, t0)

    def _finish(self, rec: TickRecord, t0: float) -> TickRecord:
        rec.duration = time.perf_counter() - t0
        self.ticks += 1
        self.last = rec
        if self.ticks == 1:
            # What the first tick has loaded (modules, pydantic models, libvirt bindings,
            # per-VM caches) lives as long as the daemon. Frozen, it is no longer walked by
            # every full garbage collection: measured ~20 ms per tick at 500 VMs.
            gc.collect()
            gc.freeze()
        for obs in self.observers:
            try:
                obs(rec)
            except Exception as e:  # an observer must never stop the controller
                log.error("observer %s failed: %s", getattr(obs, "__name__", obs), e)
        self._write_state(rec)
        if rec.ok and not self._ready_sent:
            self.notifier.ready()
            self._ready_sent = True
        self.notifier.status(status_line(rec))
        self.notifier.watchdog()
        return rec

    def state_dict(self, rec: TickRecord, vms: bool = True) -> Dict[str, Any]:
        """The state file's document; vms=False leaves readings.vms None (the state file
        writes the VMs itself, row by row, see StateFile.write)."""
        p = self.loaded
        readings = rec.readings
        if readings is not None and not vms:
            readings = dataclasses.replace(readings, vms=None)
        return {
            "version": __version__, "pid": os.getpid(), "started": self.started, "updated": rec.wall,
            "ticks": self.ticks, "dry_run": self.writer.dry_run,
            "policy": {"name": p.policy.name, "path": p.path, "sha256": p.sha256,
                       "interval": self.interval},
            "decision": decision_to_dict(rec.decision) if rec.decision else None,
            "changes": [{"knob": c.knob, "old": c.old, "new": c.new} for c in rec.changes],
            "external_changes": rec.external,
            "errors": [list(e) for e in rec.errors],
            "readings": readings.to_dict(vm_table=True) if readings else None,
            "status": status_line(rec),
            "exporter": {"listen": self.config.exporter.listen if self.config.exporter.enabled else None},
        }

    def _write_state(self, rec: TickRecord) -> None:
        try:
            self.state_file.write(self.state_dict(rec, vms=False), rec.readings.vms if rec.readings else None)
        except OSError as e:
            log.error("cannot write state file %s: %s", self.state_file.path, e.strerror or e)

    def _setup_trace(self) -> None:
        tc = self.config.trace
        self.trace = TraceWriter(tc.path, tc.max_bytes, tc.backups) if tc.path else None

    @property
    def interval(self) -> float:
        return self.config.interval if self.config.interval is not None else self.loaded.policy.interval

    # -- reload -----------------------------------------------------------------------------
    def reload(self) -> bool:
        """Re-read config and policy. All or nothing: on any error the running ones stay."""
        self.notifier.reloading()
        try:
            config = self.config_loader() if self.config_loader else self.config
            loaded = self.policy_loader(self.policy_override or config.policy)
        except KsmctlError as e:
            log.error("reload rejected, keeping policy %s (%s): %s", self.loaded.policy.name,
                      self.loaded.short_hash, e.message)
            self.notifier.ready()
            return False
        if config.exporter != self.config.exporter:
            log.warning("exporter settings changed: they take effect at the next restart")
        if config.state_file != self.config.state_file:
            log.warning("state_file changed: it takes effect at the next restart")
        changed = loaded.sha256 != self.loaded.sha256
        self.config, self.loaded = config, loaded
        self._setup_trace()
        if changed:
            self.engine = EngineState(active=self.engine.active, npages=self.engine.npages)
        log.info("reloaded: policy %s from %s (sha256 %s)%s", loaded.policy.name, loaded.path,
                 loaded.short_hash, "" if changed else ", unchanged")
        self.notifier.ready()
        return True

    # -- the loop ---------------------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        self._stop = True
        self._wake.set()

    def request_reload(self, *_: Any) -> None:
        self._reload = True
        self._wake.set()

    def request_tick(self) -> None:
        """A VM started or stopped (libvirt event): tick now rather than at the interval."""
        self._tick_now = True
        self._wake.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)

    def run(self, max_ticks: Optional[int] = None) -> None:
        log.info("ksmctl %s: policy %s from %s (sha256 %s), every %gs%s", __version__, self.loaded.policy.name,
                 self.loaded.path, self.loaded.short_hash, self.interval, ", dry run" if self.writer.dry_run else "")
        try:
            while not self._stop:
                start = time.monotonic()
                self.tick()
                if max_ticks is not None and self.ticks >= max_ticks:
                    break
                while not self._stop:
                    if self._reload:
                        self._reload = False
                        self.reload()
                    if self._tick_now:
                        self._tick_now = False
                        break
                    remaining = self.interval - (time.monotonic() - start)
                    if remaining <= 0:
                        break
                    # Long intervals still ping systemd's watchdog (every half WatchdogSec).
                    wd = self.notifier.watchdog_interval()
                    if self._wake.wait(min(remaining, wd) if wd else remaining):
                        self._wake.clear()
                    elif wd:
                        self.notifier.watchdog()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self.notifier.stopping()
        if self.config.restore_on_exit and self.ownership.has_original and not self.writer.dry_run:
            try:
                state = self.collector.sysfs.read()
                for c in self.writer.apply(self.ownership.restore_targets(), state):
                    log.info("restored %s %s -> %s", c.knob, c.old, c.new)
            except KsmctlError as e:
                log.error("could not restore KSM settings: %s", e.message)
            finally:
                self.ownership.restored()
        for fn in self.on_shutdown:
            try:
                fn()
            except Exception as e:
                log.error("shutdown step failed: %s", e)
        self.state_file.remove()
        self.state_file.release()
