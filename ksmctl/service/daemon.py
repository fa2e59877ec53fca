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
import select
import signal
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

from ksmctl import __version__
from ksmctl.collectors.host import CollectionFailed, HostCollector
from ksmctl.config import Config, keep_restart_keys, restart_keys_changed
from ksmctl.doctor.findings import Reason
from ksmctl.doctor.vm import LiveReasons
from ksmctl.errors import ConfigError, ErrorSource, KsmctlError, PermissionDenied
from ksmctl.kernel import knobs
from ksmctl.kernel.knobs import Targets
from ksmctl.kernel.ownership import KnobOwnership, OnExternalChange
from ksmctl.kernel.park import POLL_SECONDS, BoundaryPark, ParkOutcome
from ksmctl.kernel.transition import UnmergedOnlyChanges
from ksmctl.kernel.writer import Change, KsmWriter
from ksmctl.policy.decide import Decision, EngineState, decide
from ksmctl.policy.loader import LoadedPolicy, load_policy
from ksmctl.readings import KsmState, Readings
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
    would_change: List[Change] = field(default_factory=list)  # dry run: what it would have written
    failed_writes: List[str] = field(default_factory=list)    # knobs the kernel refused this tick
    dry_run: bool = False
    unmergeable: Dict[str, Tuple[Reason, ...]] = field(default_factory=dict)  # uuid -> why it cannot merge
    errors: List[Tuple[ErrorSource, str]] = field(default_factory=list)  # (source, message)
    duration: float = 0.0
    ok: bool = False
    wall: float = 0.0
    merge: Any = None  # ksmctl.guests.control.MergeReport when per-VM merge control runs
    parks: List[ParkOutcome] = field(default_factory=list)  # parks that ended since the last tick


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
        # Woken by a byte on a pipe, not a threading.Event: signal handlers run between any
        # two bytecodes of the main thread, and an Event's lock taken there again (a SIGHUP
        # storm) deadlocks or recurses. A write to a non-blocking pipe is safe anywhere.
        # Made by run(), closed by shutdown(); until then a poke only sets its flag.
        self._wake_r: Optional[int] = None
        self._wake_w: Optional[int] = None
        self._stop = False
        self._reload = False
        self._tick_now = False
        self._ready_sent = False
        self._pending_errors: List[Tuple[ErrorSource, str]] = []  # from reloads, for the next tick
        # The last reload's outcome, in the state file: `ksmctl reload` (the unit's
        # ExecReload) waits for `count` to move, so `systemctl reload` returns once the
        # daemon has switched or refused.
        self.reloads: Dict[str, Any] = {"count": 0, "ok": True, "message": "", "at": None}
        self.ownership = KnobOwnership()  # what we wrote: restore, drift, back-off
        self._written: List[Change] = []  # this tick's writes, as they happen
        self.transition = UnmergedOnlyChanges(writer, wrote=self._wrote)  # max_page_sharing, merge_across_nodes
        self._unsupported_reported: set = set()
        self.unmergeable = LiveReasons(collector.procfs.cmdline)  # why guests cannot merge
        self.trace: Optional[TraceWriter] = self._make_trace(self.config)
        self.on_shutdown: List[Callable[[], None]] = []  # e.g. stop the exporter's server
        self.guests: Any = None  # ksmctl.guests.control.GuestController (per-VM merge control), if wired
        self.park: Optional[BoundaryPark] = None   # armed by a decision, polled between ticks
        self._park_writes: List[Change] = []       # its write, counted with the next tick's changes
        self._park_outcomes: List[ParkOutcome] = []  # how parks ended, reported with the next tick

    # -- one tick -------------------------------------------------------------------------
    def tick(self) -> TickRecord:
        t0 = time.perf_counter()
        rec = TickRecord(policy=self.loaded, wall=time.time(), dry_run=self.writer.dry_run)
        rec.errors.extend(self._pending_errors)
        self._pending_errors.clear()
        rec.parks, self._park_outcomes = self._park_outcomes, []
        try:
            readings = self.collector.collect(coverage_wanted=self.engine.adaptive.behind_growth)
        except CollectionFailed as e:
            rec.errors.append((e.source, e.message))
            log.error("skipping this tick: %s", e.message)
            return self._finish(rec, t0)
        rec.readings = readings
        rec.errors.extend(readings.errors)
        if readings.vms:
            rec.unmergeable = self.unmergeable.current(readings.vms)
        before = self.engine
        decision, self.engine = decide(self.loaded.policy, readings, before)
        if self.guests is not None:
            rec.merge = self.guests.tick(readings.vms, readings.meminfo, self.loaded.policy.vms, readings.ksm)
            rec.errors.extend(rec.merge.errors)
            if rec.merge.stop_ksm:
                decision = replace(decision, targets=Targets({**decision.targets, "run": 0}),
                                   reasons=decision.reasons + (rec.merge.stop_ksm,))
        rec.decision = decision
        on_change = OnExternalChange(self.loaded.policy.ownership.on_external_change)
        plan = self.ownership.plan(decision.targets, readings.ksm, on_change)
        for drift in plan.new_drifts:
            rec.external.append(drift.knob)
            log.warning("%s; policy says %s", drift.message(),
                        "back off" if on_change is OnExternalChange.BACK_OFF else "re-assert")
        self._written, self._park_writes = list(self._park_writes), []
        self._report_unsupported(decision.targets, readings)
        step = self.transition.step(plan.targets, readings.ksm, readings.meminfo)
        targets = dict(step.targets)
        if step.hold_run:
            targets.pop("run", None)   # run=2 holds until nothing is merged
        try:
            planned = self.writer.apply(targets, readings.ksm, wrote=self._wrote)
            rec.ok = True
        except PermissionDenied:
            raise
        except KsmctlError as e:
            planned = []
            rec.errors.append((ErrorSource.SYSFS, e.message))
            rec.failed_writes.append(e.knob or "other")
            log.error("%s", e.message)
        # A dry run reports what it would write, never as changes it made (no counts, no
        # annotations, no drift for values it only imagined).
        rec.changes = list(self._written)
        rec.would_change = planned if self.writer.dry_run else []
        why = "%s/%s: %s" % (decision.run_rule, decision.scan_rule, decision.reason)
        for c in rec.changes:
            log.info("%s %s -> %s (%s)", c.knob, c.old, c.new, why)
        for c in rec.would_change:
            log.info("dry run: would set %s %s -> %s (%s)", c.knob, c.old, c.new, why)
        self._arm_park(decision, targets, readings.ksm, rec.ok)
        if self.trace is not None:
            try:
                self.trace.record(self.loaded.policy.name, self.loaded.sha256, readings, before, decision)
            except OSError as e:
                rec.errors.append((ErrorSource.TRACE, "cannot write trace %s: %s" % (self.trace.path, e.strerror)))
        return self._finish(rec, t0)

    def _wrote(self, c: Change) -> None:
        self.ownership.wrote(c)
        self._written.append(c)

    def _arm_park(self, decision: Decision, targets: Dict[str, Any], ksm: KsmState, ok: bool) -> None:
        """Watch for the boundary the decision parks ksmd at, when ksmd runs as it said."""
        earlier, self.park = self.park, None
        at = decision.park_at
        if at is None or not ok or targets.get("run") != 1 or not targets.get("pages_to_scan"):
            return
        if self.writer.dry_run:
            log.info("dry run: would stop ksmd at the end of this pass (pages_to_scan 0 at full_scans %d)", at)
            return
        after = replace(ksm, values={**ksm.values, **{k: v for k, v in targets.items() if isinstance(v, int)}})
        self.park = BoundaryPark(self.collector.sysfs, self.writer, after, at, int(targets["sleep_millisecs"]),
                                 self._park_wrote).carry(earlier)

    def _park_wrote(self, c: Change) -> None:
        self.ownership.wrote(c)
        self._park_writes.append(c)

    def _poll_park(self) -> None:
        park = self.park
        if park is None:
            return
        outcome = park.poll()
        if outcome is None:
            return
        self.park = None
        self._park_outcomes.append(outcome)
        if outcome is ParkOutcome.parked:
            log.info("ksmd stopped at the pass boundary (full_scans %d): pages_to_scan 0", park.target)
        elif outcome is ParkOutcome.late:
            log.warning("ksmd's pass ended (full_scans %d) before pages_to_scan 0 could be written in time; "
                        "not parked", park.target)
        else:
            log.error("could not park ksmd at full_scans %d: %s", park.target, park.error)

    def _report_unsupported(self, targets: Any, readings: Readings) -> None:
        """A policy key this kernel has no file for: said once, the rest of the policy applies."""
        for name in sorted(set(targets) & set(readings.ksm.unsupported) - self._unsupported_reported):
            self._unsupported_reported.add(name)
            log.warning("the policy sets %s, which this kernel does not support (no %s): it is skipped, the rest "
                        "of the policy applies", name, self.collector.sysfs.path(name))

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
        out = {
            "version": __version__, "pid": os.getpid(), "started": self.started, "updated": rec.wall,
            "ticks": self.ticks, "dry_run": self.writer.dry_run,
            "policy": {"name": p.policy.name, "path": p.path, "sha256": p.sha256,
                       "interval": self.interval},
            "decision": decision_to_dict(rec.decision) if rec.decision else None,
            "changes": [{"knob": c.knob, "old": c.old, "new": c.new} for c in rec.changes],
            "would_change": [{"knob": c.knob, "old": c.old, "new": c.new} for c in rec.would_change],
            "kernel_settings": self.transition.status(),
            "unsupported_targets": sorted(self._unsupported_reported),
            "external_changes": rec.external,
            "errors": [list(e) for e in rec.errors],
            "readings": readings.to_dict(vm_table=True) if readings else None,
            "status": status_line(rec),
            "exporter": {"listen": self.config.exporter.listen if self.config.exporter.enabled else None},
            "reload": dict(self.reloads),
        }
        if rec.merge is not None:
            out["merge"] = rec.merge.to_dict()
        return out

    def _write_state(self, rec: TickRecord) -> None:
        try:
            self.state_file.write(self.state_dict(rec, vms=False), rec.readings.vms if rec.readings else None)
        except OSError as e:
            log.error("cannot write state file %s: %s", self.state_file.path, e.strerror or e)

    @staticmethod
    def _make_trace(config: Config) -> Optional[TraceWriter]:
        tc = config.trace
        return TraceWriter(tc.path, tc.max_bytes, tc.backups) if tc.path else None

    @property
    def interval(self) -> float:
        return self.config.interval if self.config.interval is not None else self.loaded.policy.interval

    # -- reload -----------------------------------------------------------------------------
    def reload(self) -> bool:
        """Re-read config and policy. All or nothing: on any error the running ones stay."""
        self.notifier.reloading()
        try:
            config = self.config_loader() if self.config_loader else self.config
        except Exception as e:  # any failure at all keeps what runs: the loop must not die
            return self._reload_failed(ErrorSource.CONFIG, e)
        try:
            loaded = self.policy_loader(self.policy_override or config.policy)
        except Exception as e:
            return self._reload_failed(ErrorSource.POLICY, e)
        later = restart_keys_changed(self.config, config)
        if later:
            log.warning("reload: %s changed; %s at the next restart, the running value%s stay%s meanwhile",
                        ", ".join(later), "it takes effect" if len(later) == 1 else "they take effect",
                        "" if len(later) == 1 else "s", "s" if len(later) == 1 else "")
        config = keep_restart_keys(self.config, config)
        try:
            trace = self._make_trace(config)
        except ConfigError as e:  # e.g. trace.path under a file: refused before anything changes
            return self._reload_failed(ErrorSource.CONFIG, e)
        if config.log_level != self.config.log_level:
            logging.getLogger().setLevel(getattr(logging, config.log_level.upper()))
        changed = loaded.sha256 != self.loaded.sha256
        self.config, self.loaded = config, loaded
        self.trace = trace
        if changed:
            self.engine = self.engine.after_policy_change()
            self.park = None   # armed by the old policy's decision: the new one decides afresh
        log.info("reloaded: policy %s from %s (sha256 %s)%s", loaded.policy.name, loaded.path,
                 loaded.short_hash, "" if changed else ", unchanged")
        self._reloaded(True, "")
        return True

    def _reload_failed(self, source: ErrorSource, e: Exception) -> bool:
        message = e.message if isinstance(e, KsmctlError) else "%s: %s" % (type(e).__name__, e)
        log.error("reload rejected, keeping policy %s (%s): %s", self.loaded.policy.name,
                  self.loaded.short_hash, message)
        self._pending_errors.append((source, "reload rejected: " + message))
        self._reloaded(False, message)
        return False

    def _reloaded(self, ok: bool, message: str) -> None:
        """Publish the outcome (state file, then READY=1) before anyone is told it is done.
        Before the first tick there is no state to write: the first tick's carries it."""
        self.reloads = {"count": self.reloads["count"] + 1, "ok": ok, "message": message, "at": time.time()}
        if self.last is not None:
            self._write_state(self.last)
        self.notifier.ready()

    # -- the loop ---------------------------------------------------------------------------
    def _poke(self) -> None:
        fd = self._wake_w
        if fd is None:
            return   # not running yet: run() looks at the flags before it first sleeps
        try:
            os.write(fd, b"\0")
        except OSError:
            pass   # the pipe is full (or closed at stop): the loop wakes anyway

    def _sleep(self, seconds: float) -> bool:
        """Wait up to `seconds` for a poke; True when poked (the pipe is then drained)."""
        assert self._wake_r is not None, "run() made the pipe"
        ready, _, _ = select.select([self._wake_r], [], [], max(0.0, seconds))
        if not ready:
            return False
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:
            pass
        return True

    def request_stop(self, *_: Any) -> None:
        self._stop = True
        self._poke()

    def request_reload(self, *_: Any) -> None:
        self._reload = True
        self._poke()

    def request_tick(self) -> None:
        """A VM started or stopped (libvirt event): tick now rather than at the interval."""
        self._tick_now = True
        self._poke()

    def install_signal_handlers(self) -> None:
        """Take over from ksmctl.entry's early queue: a SIGHUP that came while starting
        reloads after the first tick, a SIGTERM/SIGINT stops."""
        from ksmctl import entry
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)
        early, entry.pending[:] = list(entry.pending), []
        for signum in early:
            if signum == signal.SIGHUP:
                self.request_reload()
            else:
                self.request_stop()
        if early:
            log.info("signals received while starting, handled now: %s",
                     ", ".join(signal.Signals(s).name for s in early))

    def run(self, max_ticks: Optional[int] = None) -> None:
        log.info("ksmctl %s: policy %s from %s (sha256 %s), every %gs%s", __version__, self.loaded.policy.name,
                 self.loaded.path, self.loaded.short_hash, self.interval, ", dry run" if self.writer.dry_run else "")
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            while not self._stop:
                start = time.monotonic()
                self.tick()
                pinged = time.monotonic()   # _finish pinged the watchdog
                if max_ticks is not None and self.ticks >= max_ticks:
                    break
                while not self._stop:
                    if self._reload:
                        self._reload = False
                        self.reload()
                    if self._tick_now:
                        self._tick_now = False
                        break
                    now = time.monotonic()
                    remaining = self.interval - (now - start)
                    if remaining <= 0:
                        break
                    # Long intervals still ping systemd's watchdog (every half WatchdogSec).
                    wd = self.notifier.watchdog_interval()
                    wait = min(remaining, max(0.0, pinged + wd - now)) if wd else remaining
                    if self.park is not None:
                        wait = min(wait, POLL_SECONDS)
                    self._sleep(wait)
                    self._poll_park()
                    if wd and time.monotonic() - pinged >= wd:
                        self.notifier.watchdog()
                        pinged = time.monotonic()
        finally:
            self.shutdown()
            for fd in (self._wake_r, self._wake_w):
                if fd is not None:
                    os.close(fd)
            self._wake_r = self._wake_w = None

    def shutdown(self) -> None:
        self.notifier.stopping()
        self.park = None   # nothing writes pages_to_scan 0 after the restore below
        if self.config.restore_on_exit and self.ownership.has_original and not self.writer.dry_run:
            try:
                state = self.collector.sysfs.read()
                targets = self.ownership.restore_targets()
                if state.get("pages_shared"):
                    # ksmctl never unmerges on its own at stop: these wait for an unmerge.
                    for name in [n for n in targets if knobs.knob(n).needs_unmerged and state.current(n) != targets[n]]:
                        log.warning("not restoring %s=%s: the kernel takes it only while nothing is merged, and "
                                    "ksmctl does not unmerge at stop (`ksmctl unmerge`, then `ksmctl set %s=%s`)",
                                    name, targets[name], name, targets[name])
                        del targets[name]
                for c in self.writer.apply(targets, state):
                    log.info("restored %s %s -> %s", c.knob, c.old, c.new)
            except KsmctlError as e:
                log.error("could not restore KSM settings: %s", e.message)
            finally:
                self.ownership.restored()
        if self.guests is not None and self.config.restore_on_exit and self.last is not None \
                and self.last.readings is not None and self.last.readings.vms is not None:
            self.guests.restore(self.last.readings.meminfo, self.last.readings.vms, self.last.readings.ksm.page_size)
        for fn in self.on_shutdown:
            try:
                fn()
            except Exception as e:
                log.error("shutdown step failed: %s", e)
        self.state_file.remove()
        self.state_file.release()
