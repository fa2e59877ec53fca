"""Every attribute of /sys/kernel/mm/ksm, written down once.

The reader (sysfs.py), the writer's validation and write order (writer.py), the policy
model's ranges, the metrics, `ksmctl set`'s help and the table in docs/metrics.md all
come from KNOBS. Adding a kernel attribute is one row here.

Ranges are what mm/ksm.c's *_store functions accept (kstrtouint: 0..2^32-1;
max_page_sharing: at least 2; the advisor's: at least 1). `since` is the kernel release
that added the file; older kernels lack it and the readers report it unsupported.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Dict, Iterator, Mapping, Optional, Tuple, Union

U32 = 2 ** 32 - 1
I32 = 2 ** 31 - 1
U63 = 2 ** 63 - 1
RUN_UNMERGE = 2  # run=2: stop ksmd and break every merged page apart (only via KsmWriter.unmerge)

KnobValue = Union[int, str]


class Kind(enum.Enum):
    """TUNABLE: a writable number. CHOICE: a writable word out of a [selected] list
    (advisor_mode). COUNTER: read-only, what ksmd reports."""

    TUNABLE = "tunable"
    CHOICE = "choice"
    COUNTER = "counter"


class MetricType(enum.Enum):
    GAUGE = "gauge"
    COUNTER = "counter"


class WriteOrder(enum.IntEnum):
    """The kernel refuses some writes until others are done: advisor_mode=none comes
    before pages_to_scan (the advisor owns the rate, EINVAL), advisor_mode=scan-time
    after the scan knobs it reads, run last so ksmd starts with the new settings."""

    ADVISOR_OFF = 0
    SCAN = 1
    ADVISOR_ON = 2
    RUN = 3


@dataclass(frozen=True)
class Knob:
    name: str
    kind: Kind
    since: str                          # kernel release that added the file
    help: str                           # one line, also the metric's HELP
    metric: str                         # the exported family (counters end in _total)
    metric_type: MetricType = MetricType.GAUGE
    scale: float = 1.0                  # divide by this for the metric's base unit
    lo: int = 0                         # accepted range (TUNABLE)
    hi: int = U32
    choices: Tuple[str, ...] = ()       # accepted words (CHOICE)
    order: WriteOrder = WriteOrder.SCAN
    restorable: bool = True             # put back at stop (run: only back to 0/1, never 2)
    needs_unmerged: bool = False        # EBUSY while pages are merged (pages_shared > 0)

    @property
    def writable(self) -> bool:
        return self.kind is not Kind.COUNTER

    @property
    def family(self) -> str:
        """The name prometheus_client's families take: counters without `_total`."""
        if self.metric_type is MetricType.COUNTER and self.metric.endswith("_total"):
            return self.metric[:-len("_total")]
        return self.metric

    @property
    def target_metric(self) -> str:
        """ksmctl_target_*: the policy's target, in the unit of the ksm_ family."""
        return "ksmctl_target_" + self.metric[len("ksm_"):]

    def restore_value(self, original: KnobValue) -> KnobValue:
        """What restore writes back for a value found before our first write: run=2 (an
        unmerge in progress, or done) comes back as 0, stopped, so restoring never unmerges."""
        if self.name == "run" and original == RUN_UNMERGE:
            return 0
        return original

    def write_order(self, value: KnobValue) -> WriteOrder:
        if self.kind is Kind.CHOICE:
            return WriteOrder.ADVISOR_OFF if value == "none" else WriteOrder.ADVISOR_ON
        return self.order

    def range_text(self) -> str:
        if self.kind is Kind.CHOICE:
            return " | ".join(self.choices)
        if self.kind is Kind.COUNTER:
            return "read-only"
        return "%d..%d" % (self.lo, self.hi)


def _t(name: str, since: str, help: str, metric: str, lo: int = 0, hi: int = U32, scale: float = 1.0,
       order: WriteOrder = WriteOrder.SCAN, restorable: bool = True, needs_unmerged: bool = False) -> Knob:
    return Knob(name, Kind.TUNABLE, since, help, metric, MetricType.GAUGE, scale, lo, hi, (), order,
                restorable, needs_unmerged)


def _c(name: str, since: str, help: str, metric: str, cumulative: bool = False) -> Knob:
    return Knob(name, Kind.COUNTER, since, help, metric,
                MetricType.COUNTER if cumulative else MetricType.GAUGE)


# In the kernel documentation's order: tunables, the advisor, counters.
KNOBS: Tuple[Knob, ...] = (
    _t("run", "2.6.32", "KSM state: 0 stopped, 1 running, 2 stopped and unmerging.", "ksm_run",
       hi=2, order=WriteOrder.RUN),
    _t("pages_to_scan", "2.6.32", "Pages ksmd scans per wake-up.", "ksm_pages_to_scan"),
    _t("sleep_millisecs", "2.6.32", "ksmd's sleep between scan batches (sleep_millisecs).",
       "ksm_sleep_seconds", scale=1000),
    _t("use_zero_pages", "4.11", "1 when empty pages are merged with the kernel zero page.",
       "ksm_use_zero_pages", hi=1),
    _t("merge_across_nodes", "3.9", "1 when pages merge across NUMA nodes.", "ksm_merge_across_nodes",
       hi=1, needs_unmerged=True),
    _t("max_page_sharing", "4.13", "Maximum sharers of one KSM page.", "ksm_max_page_sharing",
       lo=2, hi=I32, needs_unmerged=True),
    _t("stable_node_chains_prune_millisecs", "4.13", "Interval of stale stable node chain pruning.",
       "ksm_stable_node_chains_prune_seconds", scale=1000),
    _t("smart_scan", "6.7", "1 when ksmd skips pages that did not merge on earlier passes.",
       "ksm_smart_scan", hi=1),
    Knob("advisor_mode", Kind.CHOICE, "6.9", "Scan-rate advisor mode: 1 for the selected one "
         "(none: pages_to_scan as written; scan-time: the kernel sets it).", "ksm_advisor_mode",
         choices=("none", "scan-time")),
    _t("advisor_target_scan_time", "6.9", "Kernel advisor: target time for one full pass.",
       "ksm_advisor_target_scan_time_seconds", lo=1, hi=U63),
    _t("advisor_max_cpu", "6.9", "Kernel advisor: CPU cap for ksmd (1 = one core).",
       "ksm_advisor_max_cpu_ratio", lo=1, hi=100, scale=100),
    _t("advisor_min_pages_to_scan", "6.9", "Kernel advisor: lower bound of pages_to_scan.",
       "ksm_advisor_min_pages_to_scan", lo=1, hi=U63),
    _t("advisor_max_pages_to_scan", "6.9", "Kernel advisor: upper bound of pages_to_scan.",
       "ksm_advisor_max_pages_to_scan", lo=1, hi=U63),
    _c("pages_shared", "2.6.32", "KSM pages in use (one physical page each, shared by the pages_sharing "
       "mappings).", "ksm_pages_shared"),
    _c("pages_sharing", "2.6.32", "Pages that map a KSM page instead of their own copy: each one is a "
       "page saved.", "ksm_pages_sharing"),
    _c("pages_unshared", "2.6.32", "Pages scanned as candidates but unique so far.", "ksm_pages_unshared"),
    _c("pages_volatile", "2.6.32", "Pages that change too fast to be merged.", "ksm_pages_volatile"),
    _c("pages_scanned", "6.7", "Pages ksmd has scanned since boot.", "ksm_pages_scanned_total", True),
    _c("pages_skipped", "6.7", "Pages the smart_scan optimisation skipped since boot.",
       "ksm_pages_skipped_total", True),
    _c("full_scans", "2.6.32", "Completed passes over all mergeable memory since boot.",
       "ksm_full_scans_total", True),
    _c("general_profit", "6.1", "Kernel's net saving: merged memory minus KSM's own metadata (negative: "
       "KSM costs more than it saves).", "ksm_general_profit_bytes"),
    _c("ksm_zero_pages", "6.6", "Empty pages mapped to the kernel zero page (use_zero_pages): each one is "
       "a page saved.", "ksm_zero_pages"),
    _c("stable_node_chains", "4.13", "Stable node chains (KSM pages that hit max_page_sharing).",
       "ksm_stable_node_chains"),
    _c("stable_node_dups", "4.13", "Duplicated stable nodes in chains.", "ksm_stable_node_dups"),
)

BY_NAME: Dict[str, Knob] = {k.name: k for k in KNOBS}


# Everything below reads KNOBS and BY_NAME at call time, so a test that swaps both
# (tests/knobtable.py) sees its extra row in the reader, writer, metrics and CLI.


def knob(name: str) -> Knob:
    return BY_NAME[name]


def find(name: str) -> Optional[Knob]:
    return BY_NAME.get(name)


def all_knobs() -> Tuple[Knob, ...]:
    return KNOBS


def attribute_names() -> Tuple[str, ...]:
    return tuple(k.name for k in KNOBS)


def counter_names() -> Tuple[str, ...]:
    return tuple(k.name for k in KNOBS if k.kind is Kind.COUNTER)


_EXPORT_RANK = {Kind.COUNTER: 0, Kind.TUNABLE: 1, Kind.CHOICE: 2}


def export_order(table: Optional[Tuple[Knob, ...]] = None) -> Tuple[Knob, ...]:
    """The order /metrics lists the families and knob labels in (counters, numeric
    tunables, choices; table order within each), which the golden files pin."""
    return tuple(sorted(KNOBS if table is None else table, key=lambda k: _EXPORT_RANK[k.kind]))


def writable() -> Tuple[Knob, ...]:
    return tuple(k for k in KNOBS if k.writable)


def writable_names() -> Tuple[str, ...]:
    return tuple(k.name for k in KNOBS if k.writable)


def numeric_names() -> Tuple[str, ...]:
    """Attributes read as one integer (everything but advisor_mode)."""
    return tuple(k.name for k in KNOBS if k.kind is not Kind.CHOICE)


@dataclass(frozen=True, eq=False)  # Mapping's __eq__: equal to a dict with the same items
class Targets(Mapping[str, KnobValue]):
    """What a decision wants the kernel to hold: knob name -> value, writable knobs of
    the table only. A read-only Mapping, so the writer, traces and metrics take it as
    they took a dict. Values are checked against the kernel's ranges by the writer
    (writer.validate_value), the only place that writes them."""

    knobs: Mapping[str, KnobValue]

    def __post_init__(self) -> None:
        for name in self.knobs:
            k = BY_NAME.get(name)
            if k is None or not k.writable:
                raise ValueError("not a writable KSM knob: %r" % name)

    def __getitem__(self, name: str) -> KnobValue:
        return self.knobs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.knobs)

    def __len__(self) -> int:
        return len(self.knobs)

    def to_dict(self) -> Dict[str, KnobValue]:
        return dict(self.knobs)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table() -> str:
    """docs/metrics.md's table of every attribute (tests/test_knob_table.py holds the
    file equal to it; KSMCTL_UPDATE_DOCS=1 rewrites it)."""
    rows = ["| attribute | values | since | metric | type | meaning |",
            "| --- | --- | --- | --- | --- | --- |"]
    for k in KNOBS:
        metric = "`%s{mode}`" % k.metric if k.kind is Kind.CHOICE else "`%s`" % k.metric
        if k.scale != 1:
            metric += " (`%s` / %g)" % (k.name, k.scale)
        rows.append("| `%s` | %s | %s | %s | %s | %s |" % (
            k.name, _cell(k.range_text()), k.since, metric, k.metric_type.value, _cell(k.help)))
    return "\n".join(rows) + "\n"
