"""Prometheus metrics: the latest tick rendered as metric families, plus counters of
what the controller did.

Namespaces: `ksm_` for what the kernel reports (sysfs, ksmd's CPU time), `ksmctl_` for
everything else (host memory and PSI as the policy saw them, per-VM figures, the
controller). Base units throughout (bytes, seconds, ratios 0..1). docs/metrics.md lists
every family.

Everything is rendered from the last TickRecord, so a scrape never touches sysfs or /proc
and costs the same whatever the host does. A part the tick could not read is absent (the
tick counted its error); a part that fails to render is dropped and counted as an
`exporter` error, never failing the scrape. No prometheus_client metric objects: counters
live here under a lock and are emitted as families, so there are no `_created` series
(node_exporter's textfile collector and the golden file stay stable).
"""
from __future__ import annotations

import bisect

import logging
import math
import platform
import threading
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily, Metric)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from ksmctl import __version__
from ksmctl.errors import ErrorSource
from ksmctl.export.vm_families import VmLines, escape_label
from ksmctl.guests.metrics import merge_families
from ksmctl.policy.decide import RUN_RULES, SCAN_RULES
from ksmctl.kernel import knobs
from ksmctl.kernel.knobs import Kind, MetricType
from ksmctl.kernel.park import ParkOutcome
from ksmctl.readings import KsmState, Readings, VmReading, VmSource

log = logging.getLogger("ksmctl.metrics")

# Error sources: bounded by the enum. Anything else a trace holds is counted as "other".
ERROR_SOURCES = tuple(ErrorSource)
RUN_MODES = ("conditional", "always", "off")   # the policy format's run.mode values
TICK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _knob_labels() -> Tuple[str, ...]:
    """ksmctl_changes/ksmctl_external_changes label values: the writable knobs, bounded by
    the table (kernel/knobs.py)."""
    return tuple(k.name for k in knobs.export_order() if k.writable)


def _source(name: object) -> ErrorSource:
    return ErrorSource.parse(name)


def _num(v: float) -> float:
    return float(v)


class MetricsCollector(Collector):
    """Renders the latest TickRecord; `observe(rec)` is the daemon observer.

    registry: where to register (never the global one). per_vm: per-VM series (labels
    domain and uuid) or only totals. build: labels of ksmctl_build_info (tests pin them)."""

    def __init__(self, registry: Optional[CollectorRegistry] = None, per_vm: bool = True,
                 build: Optional[Dict[str, str]] = None) -> None:
        self.per_vm = per_vm
        self.build = build or {"version": __version__, "python": platform.python_version()}
        self._lock = threading.Lock()
        self._rec = None  # the latest TickRecord
        self._decisions: Dict[Tuple[str, str], float] = {("run", r): 0.0 for r in RUN_RULES}
        self._decisions.update({("scan", r): 0.0 for r in SCAN_RULES})
        self._errors: Dict[ErrorSource, float] = {s: 0.0 for s in ERROR_SOURCES}
        self._changes: Dict[str, float] = {k: 0.0 for k in _knob_labels()}
        self._external: Dict[str, float] = {k: 0.0 for k in _knob_labels()}
        self._write_failures: Dict[str, float] = {k: 0.0 for k in _knob_labels() + ("other",)}
        self._ticks: Dict[str, float] = {"ok": 0.0, "failed": 0.0}
        self._parks: Dict[ParkOutcome, float] = {o: 0.0 for o in ParkOutcome}
        self._buckets = [0] * (len(TICK_BUCKETS) + 1)
        self._dur_sum = 0.0
        self._last_ok: Optional[float] = None
        self._last_tick: Optional[float] = None
        self.generation = 0  # bumped whenever anything a scrape shows changed
        self._vm_lines = VmLines()
        if registry is not None:
            registry.register(self)

    # -- updates ----------------------------------------------------------------------------
    def observe(self, rec) -> None:
        """Daemon observer: remember the tick and count what it did."""
        with self._lock:
            self._rec = rec
            d = rec.decision
            if d is not None:
                for kind, rule in (("run", d.run_rule), ("scan", d.scan_rule)):
                    key = (kind, rule)
                    self._decisions[key] = self._decisions.get(key, 0.0) + 1
            for source, _msg in rec.errors:
                s = _source(source)
                self._errors[s] += 1
            for c in rec.changes:
                if c.knob in self._changes:
                    self._changes[c.knob] += 1
            for knob in rec.external:
                if knob in self._external:
                    self._external[knob] += 1
            for knob in rec.failed_writes:
                self._write_failures[knob if knob in self._write_failures else "other"] += 1
            for outcome in rec.parks:
                self._parks[outcome] += 1
            self._ticks["ok" if rec.ok else "failed"] += 1
            self._buckets[bisect.bisect_left(TICK_BUCKETS, rec.duration)] += 1
            self._dur_sum += rec.duration
            self._last_tick = rec.wall
            if rec.ok:
                self._last_ok = rec.wall
            self.generation += 1

    def count_error(self, source: ErrorSource, n: int = 1) -> None:
        """Errors outside a tick (policy reload, textfile write, rendering)."""
        with self._lock:
            self._errors[_source(source)] += n
            self.generation += 1

    # -- rendering --------------------------------------------------------------------------
    def describe(self) -> Iterable[Metric]:
        return []  # families vary with the kernel and the tick; skip registry name checks

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            rec = self._rec
            state = self._snapshot()
        parts: Sequence[Tuple[str, Callable[[], List[Metric]]]] = (
            ("controller", lambda: self._controller(rec, state)),
            ("ksm", lambda: self._ksm(rec.readings.ksm) if rec is not None and rec.readings else []),
            ("ksmd", lambda: self._ksmd(rec.readings) if rec is not None and rec.readings else []),
            ("host", lambda: self._host(rec.readings) if rec is not None and rec.readings else []),
            ("targets", lambda: self._targets(rec)),
            ("vms", lambda: self._vms(rec.readings) if rec is not None and rec.readings else []),
            ("unmergeable", lambda: self._unmergeable(rec)),
            ("merge", lambda: merge_families(rec.merge, self.per_vm) if rec is not None and rec.merge else []),
        )
        failed = 0
        out: List[Metric] = []
        for name, fn in parts:
            try:
                out.extend(fn())
            except Exception as e:  # one broken part never fails the scrape
                failed += 1
                log.error("cannot render %s metrics: %s", name, e)
        if failed:
            with self._lock:
                self._errors[ErrorSource.EXPORTER] += failed
                state["errors"][ErrorSource.EXPORTER] = self._errors[ErrorSource.EXPORTER]
            out = [m for m in out if m.name != "ksmctl_errors"] + [self._errors_family(state["errors"])]
        return iter(out)

    def _snapshot(self) -> dict:
        return {"decisions": dict(self._decisions), "errors": dict(self._errors),
                "changes": dict(self._changes), "external": dict(self._external),
                "write_failures": dict(self._write_failures),
                "ticks": dict(self._ticks), "parks": dict(self._parks),
                "buckets": list(self._buckets), "sum": self._dur_sum,
                "last_ok": self._last_ok, "last_tick": self._last_tick}

    @staticmethod
    def _errors_family(errors: Dict[ErrorSource, float]) -> Metric:
        f = CounterMetricFamily("ksmctl_errors", "Read and write errors by source (%s)."
                                % ", ".join(ERROR_SOURCES), labels=["source"])
        for s in ERROR_SOURCES:
            f.add_metric([s.value], errors.get(s, 0.0))
        return f

    def _controller(self, rec, st: dict) -> List[Metric]:
        out: List[Metric] = []
        b = InfoMetricFamily("ksmctl_build", "ksmctl build: version and Python version.")
        b.add_metric([], dict(self.build))
        out.append(b)
        if rec is not None:
            p = InfoMetricFamily("ksmctl_policy", "The active policy: name and sha256 of its file.")
            p.add_metric([], {"policy": rec.policy.policy.name, "sha256": rec.policy.sha256})
            out.append(p)
            budget = getattr(rec.policy.policy.scan, "cpu_budget", None)
            if budget is not None:
                out.append(GaugeMetricFamily("ksmctl_policy_cpu_budget_ratio",
                                             "The policy's CPU budget for ksmd (1 = one core).",
                                             value=budget / 100.0))
            out.append(GaugeMetricFamily("ksmctl_policy_interval_seconds", "The policy's tick interval.",
                                         value=_num(rec.policy.policy.interval)))
            mode = str(getattr(rec.policy.policy.run.mode, "value", rec.policy.policy.run.mode))
            m = GaugeMetricFamily("ksmctl_policy_run_mode", "The policy's run mode: 1 for the active one "
                                  "(off: the operator keeps KSM off).", labels=["mode"])
            for name in RUN_MODES:
                m.add_metric([name], 1.0 if name == mode else 0.0)
            out.append(m)
            out.append(GaugeMetricFamily("ksmctl_dry_run", "1 when the daemon only decides and logs "
                                         "(--dry-run): it writes no knob.", value=1.0 if rec.dry_run else 0.0))
        d = CounterMetricFamily("ksmctl_decisions", "Decisions by kind (run, scan) and the rule that made them; "
                                "one of each per tick.", labels=["kind", "rule"])
        for (kind, rule), v in sorted(st["decisions"].items()):
            d.add_metric([kind, rule], v)
        out.append(d)
        out.append(self._errors_family(st["errors"]))
        ch = CounterMetricFamily("ksmctl_changes", "Knob writes ksmctl made, by knob.", labels=["knob"])
        ex = CounterMetricFamily("ksmctl_external_changes", "Ticks that found a knob changed by another "
                                 "writer, by knob.", labels=["knob"])
        for k in st["changes"]:
            ch.add_metric([k], st["changes"][k])
            ex.add_metric([k], st["external"][k])
        wf = CounterMetricFamily("ksmctl_write_failures", "Knob writes the kernel refused, by knob "
                                 "(the log says why).", labels=["knob"])
        for k, v in st["write_failures"].items():
            wf.add_metric([k], v)
        pk = CounterMetricFamily("ksmctl_parks", "Parks (ksmd stopped where its last pass ends) by how they "
                                 "ended: parked in time, late (not parked), failed.", labels=["outcome"])
        for o in ParkOutcome:
            pk.add_metric([o.value], st["parks"][o])
        out += [ch, ex, wf, pk]
        t = CounterMetricFamily("ksmctl_ticks", "Controller ticks by result (ok: decided and applied; "
                                "failed: skipped or write failed).", labels=["result"])
        for r in ("ok", "failed"):
            t.add_metric([r], st["ticks"][r])
        out.append(t)
        h = HistogramMetricFamily("ksmctl_tick_duration_seconds", "Time one tick took: read, decide, write.")
        acc = 0
        buckets = []
        for bound, n in zip(TICK_BUCKETS + (math.inf,), st["buckets"]):
            acc += n
            buckets.append(("+Inf" if bound == math.inf else repr(bound), acc))
        h.add_metric([], buckets, st["sum"])
        out.append(h)
        if st["last_ok"] is not None:
            out.append(GaugeMetricFamily("ksmctl_last_successful_tick_timestamp_seconds",
                                         "Unix time of the last tick that read, decided and applied.",
                                         value=st["last_ok"]))
        if st["last_tick"] is not None:
            out.append(GaugeMetricFamily("ksmctl_last_tick_timestamp_seconds", "Unix time of the last tick.",
                                         value=st["last_tick"]))
        return out

    @staticmethod
    def _ksm(k: KsmState) -> List[Metric]:
        out: List[Metric] = []
        v = k.values
        for knob in knobs.export_order():
            if knob.kind is Kind.CHOICE:
                if k.advisor_mode is not None:  # advisor_mode, the one word-valued knob
                    f = GaugeMetricFamily(knob.metric, knob.help, labels=["mode"])
                    for mode in k.advisor_modes or (k.advisor_mode,):
                        f.add_metric([mode], 1.0 if mode == k.advisor_mode else 0.0)
                    out.append(f)
            elif knob.name not in v:
                continue  # unsupported by this kernel or unreadable this tick
            elif knob.metric_type is MetricType.COUNTER:
                out.append(CounterMetricFamily(knob.family, knob.help, value=_num(v[knob.name])))
            else:
                out.append(GaugeMetricFamily(knob.metric, knob.help, value=_num(v[knob.name]) / knob.scale))
        if "pages_sharing" in v:
            out.append(GaugeMetricFamily("ksm_memory_saved_bytes", "Memory KSM saves now: (pages_sharing + "
                                         "ksm_zero_pages) x page size.", value=_num(k.saved_bytes)))
        out.append(GaugeMetricFamily("ksm_page_size_bytes", "Page size the page counts are in.",
                                     value=_num(k.page_size)))
        return out

    @staticmethod
    def _ksmd(r: Readings) -> List[Metric]:
        if r.ksmd_cpu_seconds is None:
            return []
        return [CounterMetricFamily("ksm_ksmd_cpu_seconds", "CPU time the ksmd kernel thread has used "
                                    "(user + system).", value=_num(r.ksmd_cpu_seconds))]

    @staticmethod
    def _host(r: Readings) -> List[Metric]:
        out: List[Metric] = []
        if r.meminfo is not None:
            out.append(GaugeMetricFamily("ksmctl_memory_total_bytes", "MemTotal from /proc/meminfo.",
                                         value=_num(r.meminfo.total)))
            out.append(GaugeMetricFamily("ksmctl_memory_available_bytes", "MemAvailable from /proc/meminfo.",
                                         value=_num(r.meminfo.available)))
        if r.psi is not None:
            f = GaugeMetricFamily("ksmctl_memory_pressure_ratio", "Memory PSI: share of wall time tasks "
                                  "stalled on memory (some: at least one task; full: all), averaged over window.",
                                  labels=["kind", "window"])
            p = r.psi
            for kind, window, val in (("some", "10s", p.some_avg10), ("some", "60s", p.some_avg60),
                                      ("full", "10s", p.full_avg10), ("full", "60s", p.full_avg60)):
                f.add_metric([kind, window], val / 100.0)
            out.append(f)
        if r.mergeable_rss is not None:
            out.append(GaugeMetricFamily("ksmctl_mergeable_memory_bytes", "Anonymous RSS of processes "
                                         "with memory marked mergeable (KSM merges only private "
                                         "anonymous pages).", value=_num(r.mergeable_rss)))
        est = r.estimate  # the periodic estimator's last result, when enabled
        if est is not None:
            out.append(GaugeMetricFamily("ksmctl_merge_potential_bytes", "Estimated memory that could still "
                                         "be saved (achievable minus achieved).", value=_num(est.remaining)))
            out.append(GaugeMetricFamily("ksmctl_estimate_achievable_bytes", "Last estimate: memory merging "
                                         "could save among present mergeable pages.", value=_num(est.achievable)))
            out.append(GaugeMetricFamily("ksmctl_estimate_achieved_bytes", "Last estimate: memory KSM saves now "
                                         "among the same pages.", value=_num(est.achieved)))
            if est.efficiency is not None:
                out.append(GaugeMetricFamily("ksmctl_estimate_efficiency_ratio", "Last estimate: achieved / "
                                             "achievable (1 = nothing left to merge).", value=est.efficiency))
            out.append(GaugeMetricFamily("ksmctl_estimate_timestamp_seconds", "Unix time the last estimate "
                                         "finished.", value=_num(est.finished_wall)))
        return out

    @staticmethod
    def _targets(rec) -> List[Metric]:
        if rec is None or rec.decision is None:
            return []
        out: List[Metric] = []
        targets = rec.decision.targets
        for knob in knobs.export_order():
            if knob.name not in targets:
                continue
            value = targets[knob.name]
            if knob.kind is Kind.CHOICE:
                f = GaugeMetricFamily(knob.target_metric, "The policy's last target advisor mode.",
                                      labels=["mode"])
                f.add_metric([str(value)], 1.0)
                out.append(f)
            elif knob.kind is Kind.TUNABLE:
                out.append(GaugeMetricFamily(knob.target_metric, "The policy's last target for %s (same unit "
                                             "as %s)." % (knob.name, knob.metric),
                                             value=_num(value) / knob.scale))  # type: ignore[arg-type]
        return out

    def _unmergeable(self, rec: Any) -> List[Metric]:
        """Why a guest's memory cannot merge (doctor's reasons; docs/doctor.md): one sample per
        guest and reason, bounded by the Reason enum."""
        if not self.per_vm or rec is None or rec.readings is None or not rec.readings.vms:
            return []
        f = GaugeMetricFamily("ksmctl_vm_unmergeable", "1 for each reason a guest's memory cannot merge "
                              "(nosharepages, mem_merge_off, hugetlbfs, shared_memory, not_mergeable).",
                              labels=["domain", "uuid", "reason"])
        for vm in rec.readings.vms:
            for reason in getattr(rec, "unmergeable", {}).get(vm.uuid, ()):
                f.add_metric([vm.name, vm.uuid, reason.value], 1.0)
        return [f] if f.samples else []

    def _vms(self, r: Readings) -> List[Metric]:
        if r.vms is None:
            return []  # the VM source failed this tick: its error is counted, series dropped
        vms: Tuple[VmReading, ...] = r.vms
        page = r.ksm.page_size
        out: List[Metric] = [GaugeMetricFamily("ksmctl_vms", "Guests found on this host.",
                                               value=float(len(vms)))]
        if r.vm_source is not None:
            src = GaugeMetricFamily("ksmctl_vm_data_source", "Where per-VM data comes from: 1 for the "
                                    "current source (libvirt; proc: QEMU command lines in /proc).",
                                    labels=["source"])
            for s in VmSource:
                src.add_metric([s.value], 1.0 if s == r.vm_source else 0.0)
            out.append(src)
        if not self.per_vm:
            return out
        return out + self._vm_lines.families(vms, page)

def render_text(collector: Collector) -> bytes:
    """The text exposition format (what prometheus_client's generate_latest writes, byte for
    byte; a test holds them equal) at a fraction of its cost: generate_latest re-validates
    every label name of every sample, ~90 ms for 500 VMs on a 2-core host, this ~10 ms."""
    out: List[str] = []
    fmt = floatToGoString
    for metric in collector.collect():
        mname, mtype = metric.name, metric.type
        if mtype == "counter":
            mname += "_total"
        elif mtype == "info":
            mname += "_info"
            mtype = "gauge"
        elif mtype == "stateset":
            mtype = "gauge"
        elif mtype == "gaugehistogram":
            mtype = "histogram"
        elif mtype == "unknown":
            mtype = "untyped"
        out.append("# HELP %s %s\n# TYPE %s %s\n" % (
            mname, metric.documentation.replace("\\", r"\\").replace("\n", r"\n"), mname, mtype))
        rendered = getattr(metric, "rendered", None)
        if rendered is not None:  # per-VM families: lines cached per VM reading
            out.append(rendered)
            continue
        for s in metric.samples:
            if s.name == metric.name + "_created":
                continue  # never produced here; generate_latest would move them to their own family
            if s.labels:
                lab = ",".join('%s="%s"' % (k, escape_label(v)) for k, v in sorted(s.labels.items()))
                line = "%s{%s} %s" % (s.name, lab, fmt(s.value))
            else:
                line = "%s %s" % (s.name, fmt(s.value))
            if s.timestamp is not None:
                line += " %d" % int(float(s.timestamp) * 1000)
            out.append(line + "\n")
    return "".join(out).encode("utf-8")
