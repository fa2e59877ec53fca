"""What a scan found, and its JSON form (`ksmctl estimate --json`).

No numpy here: the CLI's table and the daemon's summary use these types without the
scan engine.

Accounting (pages; see docs/estimate.md):
- A content present c >= 2 times can save c - 1 pages (one frame kept).
- Zero pages are reported separately. With use_zero_pages=1 KSM maps each one to the
  kernel's zero page, saving all Z of them; otherwise they merge like any content (Z - 1).
  Pages already mapping the zero page (read before ever written) already cost nothing.
- Across targets, a content held once by A and once by B saves one page globally. Each
  target gets its standalone figure (as if scanned alone) and a share of the global figure:
  each of its pages of a content held c times globally carries (c - 1) / c.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional

from ksmctl.estimate.discover import TargetKind
from ksmctl.readings import KsmStat

if TYPE_CHECKING:   # count.py imports numpy; its results are only read here
    from ksmctl.estimate.count import TallyResult

# The page hash (xxhash's function of this name): 128 bits, see scan.py's docstring.
HASH_NAME = "xxh3_128"


@dataclass
class Progress:
    """Handed to the progress callback; total is the mergeable Rss from smaps (an estimate)."""

    done_bytes: int
    total_bytes: int
    elapsed_s: float
    target: str

    @property
    def rate_bytes_per_s(self) -> float:
        return self.done_bytes / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> Optional[float]:
        rate = self.rate_bytes_per_s
        if rate <= 0 or self.total_bytes <= self.done_bytes:
            return None if rate <= 0 else 0.0
        return (self.total_bytes - self.done_bytes) / rate


@dataclass
class TargetEstimate:
    pid: int
    name: str
    kind: TargetKind
    scanned_pages: int = 0
    zero_pages: int = 0             # pages whose content is all zeros (incl. zero_mapped)
    zero_mapped_pages: int = 0      # of those, already mapping the kernel's zero page
    distinct_nonzero: int = 0       # distinct non-zero contents within this target
    duplicate_pages: int = 0        # non-zero pages whose content occurs >= 2 times here
    achievable_alone: int = 0       # pages KSM could save if this target were alone
    achieved_alone: int = 0         # pages already sharing a frame within this target
    achievable_share: float = 0.0   # this target's part of the global achievable figure
    achieved_share: float = 0.0
    unreadable_pages: int = 0       # present in pagemap, but /proc/<pid>/mem said EIO
    mergeable_rss_bytes: int = 0
    ksm_stat: Optional[KsmStat] = None   # after the scan (before it, if it exited meanwhile)

    @property
    def efficiency(self) -> Optional[float]:
        return _ratio(self.achieved_share, self.achievable_share)

    @property
    def remaining_share(self) -> float:
        return max(0.0, self.achievable_share - self.achieved_share)


@dataclass
class Skipped:
    pid: int
    name: str
    reason: str


@dataclass
class EstimateResult:
    page_size: int
    use_zero_pages: bool
    max_page_sharing: int
    targets: List[TargetEstimate] = field(default_factory=list)
    skipped: List[Skipped] = field(default_factory=list)
    partial: bool = False
    scanned_pages: int = 0
    zero_pages: int = 0
    zero_mapped_pages: int = 0
    distinct_nonzero: int = 0
    duplicate_pages: int = 0        # non-zero pages whose content occurs >= 2 times overall
    achievable_nonzero: int = 0     # sum over non-zero contents of (count - 1)
    zero_saving: int = 0            # what the zero pages can save (see module doc)
    achievable_capped: int = 0      # achievable, limited by max_page_sharing per frame
    achieved: int = 0               # pages already sharing a frame (or the zero page)
    unreadable_pages: int = 0
    bytes_read: int = 0
    elapsed_s: float = 0.0
    cpu_s: float = 0.0
    host: Dict[str, int] = field(default_factory=dict)

    @property
    def achievable(self) -> int:
        return self.achievable_nonzero + self.zero_saving

    @property
    def remaining(self) -> int:
        return max(0, self.achievable - self.achieved)

    @property
    def efficiency(self) -> Optional[float]:
        return _ratio(self.achieved, self.achievable)

    @property
    def cross_target(self) -> int:
        """What sharing between targets adds over each target deduplicated on its own."""
        return self.achievable - sum(t.achievable_alone for t in self.targets)

    def account(self, c: TallyResult, f: TallyResult) -> None:
        """Every figure, by the rules above, from the counts of the targets' page contents
        (`c`, zero pages left out) and of their shared frames (`f`)."""
        ts, use_zero, mps = self.targets, self.use_zero_pages, self.max_page_sharing
        self.scanned_pages = sum(t.scanned_pages for t in ts)
        self.unreadable_pages = sum(t.unreadable_pages for t in ts)
        self.zero_pages = z = sum(t.zero_pages for t in ts)
        self.zero_mapped_pages = zm = sum(t.zero_mapped_pages for t in ts)
        self.distinct_nonzero = c.distinct
        self.duplicate_pages = c.duplicate_pages
        self.achievable_nonzero = c.saving
        self.zero_saving = zero_saving(z, zm, use_zero)
        self.achievable_capped = (c.saving - c.capped_excess(mps)
                                  + zero_saving(z, zm, use_zero, mps if mps > 0 else None))
        self.achieved = f.saving + zm
        for t, tcnt, fcnt in zip(ts, c.targets, f.targets):
            t.distinct_nonzero = tcnt.distinct
            t.duplicate_pages = tcnt.pages - tcnt.singles
            t.achievable_alone = (tcnt.pages - tcnt.distinct) + zero_saving(
                t.zero_pages, t.zero_mapped_pages, use_zero)
            t.achieved_alone = (fcnt.pages - fcnt.distinct) + t.zero_mapped_pages
            if len(ts) == 1:
                t.achievable_share, t.achieved_share = float(t.achievable_alone), float(t.achieved_alone)
            else:
                zshare = self.zero_saving * t.zero_pages / z if z else 0.0
                t.achievable_share = tcnt.share + zshare
                t.achieved_share = fcnt.share + t.zero_mapped_pages

    def to_dict(self) -> Dict[str, object]:
        ps = self.page_size

        def pages(n: float) -> Dict[str, object]:
            return {"pages": round(n, 2) if isinstance(n, float) else n, "bytes": int(round(n * ps))}

        return {
            "partial": self.partial,
            "page_size": ps,
            "hash": HASH_NAME,
            "use_zero_pages": self.use_zero_pages,
            "max_page_sharing": self.max_page_sharing,
            "total": {
                "scanned": pages(self.scanned_pages),
                "zero": pages(self.zero_pages),
                "zero_mapped": pages(self.zero_mapped_pages),
                "distinct_nonzero": self.distinct_nonzero,
                "duplicate": pages(self.duplicate_pages),
                "achievable": pages(self.achievable),
                "achievable_nonzero": pages(self.achievable_nonzero),
                "zero_saving": pages(self.zero_saving),
                "achievable_capped": pages(self.achievable_capped),
                "cross_target": pages(self.cross_target),
                "achieved": pages(self.achieved),
                "remaining": pages(self.remaining),
                "efficiency": self.efficiency,
                "unreadable": pages(self.unreadable_pages),
            },
            "targets": [{
                "pid": t.pid, "name": t.name, "kind": t.kind.value,
                "scanned": pages(t.scanned_pages),
                "zero": pages(t.zero_pages),
                "zero_mapped": pages(t.zero_mapped_pages),
                "distinct_nonzero": t.distinct_nonzero,
                "duplicate": pages(t.duplicate_pages),
                "achievable_alone": pages(t.achievable_alone),
                "achieved_alone": pages(t.achieved_alone),
                "achievable_share": pages(t.achievable_share),
                "achieved_share": pages(t.achieved_share),
                "remaining_share": pages(t.remaining_share),
                "efficiency": t.efficiency,
                "unreadable": pages(t.unreadable_pages),
                "ksm_stat": t.ksm_stat.kernel_fields() if t.ksm_stat is not None else {},
            } for t in self.targets],
            "skipped": [{"pid": s.pid, "name": s.name, "reason": s.reason} for s in self.skipped],
            "host": self.host,
            "scan": {"bytes_read": self.bytes_read, "elapsed_s": round(self.elapsed_s, 3),
                     "cpu_s": round(self.cpu_s, 3)},
        }


def _ratio(a: float, b: float) -> Optional[float]:
    return None if b <= 0 else min(1.0, a / b)


def zero_saving(zero: int, zero_mapped: int, use_zero_pages: bool,
                max_page_sharing: Optional[int] = None) -> int:
    """Pages `zero` all-zero pages can save; `zero_mapped` of them already map the zero page."""
    own = zero - zero_mapped
    if own <= 0 or use_zero_pages:
        return zero
    if max_page_sharing:
        return zero_mapped + own - -(-own // max_page_sharing)
    return zero - 1
