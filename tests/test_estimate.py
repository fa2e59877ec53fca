"""Fast tests of the estimator: parsing, accounting and error paths on fake /proc trees
(sparse `mem` and `pagemap` files laid out as the kernel presents them), plus one scan of
this process's own memory."""
from __future__ import annotations

import collections
import json
import mmap
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ksmctl.cli import cli
from ksmctl.cli.estimate import render_table
from ksmctl.errors import EXIT_PERMISSION, EXIT_USAGE, PermissionDenied, UsageError
from ksmctl.estimate import caps
from ksmctl.estimate.caps import missing_capabilities
from ksmctl.estimate.discover import (Region, Target, TargetKind, describe_pid, discover_mergeable,
                                      find_qemu_guests, parse_smaps_mergeable, resolve_targets)
from ksmctl.estimate.pagemap import PM_EXCLUSIVE, PM_FILE, PM_PRESENT, PM_SWAPPED, ZeroFrames
from ksmctl.estimate.result import Progress, zero_saving
from ksmctl.estimate.scan import HOST_COUNTERS, Estimator
from ksmctl.kernel import knobs
from ksmctl.estimate.schedule import TokenBucket
from tests.ksmlock import ksm_exclusive
from tests.support import need_root

PS = 4096
ZERO_PFN = 777


def page(label: int) -> bytes:
    """Distinct non-zero content per label; label 0 is the zero page."""
    if label == 0:
        return bytes(PS)
    return label.to_bytes(8, "little") * (PS // 8)


# A page spec: (kind, label, pfn). kind: 'x' exclusive anon, 's' non-exclusive (shares a
# frame: pfn says which), 'z' maps the zero page, 'n' not present, 'w' swapped out,
# 'f' file page. label is the content written to `mem` at that address (even for
# non-present pages, so reading them by mistake would change the figures).
Spec = Tuple[str, int, int]

_FLAGS = {
    "x": PM_PRESENT | PM_EXCLUSIVE,
    "s": PM_PRESENT,
    "z": PM_PRESENT,
    "n": 0,
    "w": PM_SWAPPED,
    "f": PM_PRESENT | PM_FILE | PM_EXCLUSIVE,
}


class FakeHost:
    """A /proc and /sys tree with fake processes whose mergeable memory is given page by page."""

    def __init__(self, root: Path, use_zero_pages: int = 0, max_page_sharing: int = 256) -> None:
        self.root = root
        self.proc = root / "proc"
        self.sys = root / "sys"
        ksm = self.sys / "kernel" / "mm" / "ksm"
        ksm.mkdir(parents=True)
        for name, value in (("use_zero_pages", use_zero_pages), ("max_page_sharing", max_page_sharing),
                            ("pages_sharing", 5), ("pages_shared", 2), ("run", 1)):
            (ksm / name).write_text("%d\n" % value)
        self.proc.mkdir()
        self._next_pfn = 10_000

    def add(self, pid: int, regions: Sequence[Sequence[Spec]], comm: str = "proc",
            cmdline: Sequence[str] = ("/usr/bin/proc",), unmergeable: Sequence[Spec] = ()) -> None:
        d = self.proc / str(pid)
        d.mkdir()
        (d / "comm").write_text(comm + "\n")
        (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in cmdline) + b"\0")
        (d / "ksm_stat").write_text("ksm_rmap_items 3\nksm_merging_pages 2\nksm_mergeable: yes\n")
        smaps = []
        with open(d / "mem", "wb") as mem, open(d / "pagemap", "wb") as pm:
            addr = 0x100000
            for specs, mergeable in [(r, True) for r in regions] + [(unmergeable, False)]:
                if not specs:
                    continue
                start = addr
                rss = 0
                for kind, label, pfn in specs:
                    mem.seek(addr)
                    mem.write(page(label))
                    if kind == "x":
                        pfn = self._next_pfn
                        self._next_pfn += 1
                    elif kind == "z":
                        pfn = ZERO_PFN
                    elif kind in "nw":
                        pfn = 0
                    elif kind == "f":
                        pfn = self._next_pfn
                        self._next_pfn += 1
                    if kind in "xsf":
                        rss += PS
                    pm.seek(addr // PS * 8)
                    pm.write((_FLAGS[kind] | pfn).to_bytes(8, "little"))
                    addr += PS
                smaps.append("%x-%x rw-p 00000000 00:00 0 \nSize: %d kB\nRss: %d kB\nVmFlags: rd wr mr mw me ac%s\n"
                             % (start, addr, (addr - start) // 1024, rss // 1024, " mg" if mergeable else ""))
                addr += 16 * PS   # a gap between VMAs
        (d / "smaps").write_text("".join(smaps))

    def estimator(self, **kw) -> Estimator:
        return Estimator(proc_root=str(self.proc), sys_root=str(self.sys), page_size=PS,
                         zero_probe=lambda proc_root, page_size: ZeroFrames((ZERO_PFN,)), **kw)


def expected(procs: Dict[int, List[Spec]], use_zero_pages: bool) -> Dict[str, object]:
    """The accounting, computed directly from the construction."""
    read = {pid: [s for s in specs if s[0] in "xsz"] for pid, specs in procs.items()}
    allc = collections.Counter(lbl for specs in read.values() for _, lbl, _ in specs)
    z = allc.pop(0, 0)
    zm = sum(1 for specs in read.values() for k, _, _ in specs if k == "z")
    frames = collections.Counter(pfn for specs in read.values() for k, _, pfn in specs if k == "s")
    out = {
        "scanned": sum(len(v) for v in read.values()),
        "zero": z, "zero_mapped": zm,
        "achievable_nonzero": sum(c - 1 for c in allc.values()),
        "duplicate": sum(c for c in allc.values() if c > 1),
        "zero_saving": zero_saving(z, zm, use_zero_pages),
        "achieved": sum(c - 1 for c in frames.values()) + zm,
        "alone": {},
    }
    for pid, specs in read.items():
        c = collections.Counter(lbl for _, lbl, _ in specs)
        tz = c.pop(0, 0)
        tzm = sum(1 for k, _, _ in specs if k == "z")
        out["alone"][pid] = sum(n - 1 for n in c.values()) + zero_saving(tz, tzm, use_zero_pages)
    return out


def targets(host: FakeHost, pids: Sequence[int]) -> List[Target]:
    return [describe_pid(p, str(host.proc)) for p in pids]


# ------------------------------------------------------------------ parsing

SMAPS = """\
55d0c0a00000-55d0c0a21000 r--p 00000000 08:01 123  /usr/bin/qemu-system-x86_64
Size:                132 kB
Rss:                 100 kB
VmFlags: rd mr mw me dw sd
7f0000000000-7f0010000000 rw-p 00000000 00:00 0 
Size:             262144 kB
Rss:               81920 kB
AnonHugePages:      2048 kB
THPeligible:           1
VmFlags: rd wr mr mw me ac sd mg hg
7f0010000000-7f0010001000 rw-p 00000000 00:00 0 
Size:                  4 kB
Rss:                   4 kB
VmFlags: rd wr mr mw me ac mg
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                  12 kB
VmFlags: rd wr mr mw me gd ac
"""


def test_parse_smaps_keeps_only_mergeable_vmas_with_rss():
    regions = parse_smaps_mergeable(SMAPS)
    assert regions == [Region(0x7f0000000000, 0x7f0010000000, 81920 * 1024),
                       Region(0x7f0010000000, 0x7f0010001000, 4096)]
    assert parse_smaps_mergeable("") == []


KSM_STAT = ("ksm_rmap_items 10\nksm_zero_pages 2\nksm_merging_pages 7\nksm_process_profit -4\n"
            "ksm_merge_any: no\nksm_mergeable: yes\n")


def test_json_shows_ksm_stat_under_the_kernels_names(tmp_path):
    host = FakeHost(tmp_path)
    host.add(1, [[("x", 7, 0)]])
    (host.proc / "1" / "ksm_stat").write_text(KSM_STAT)
    shown = host.estimator().run(targets(host, [1])).to_dict()["targets"][0]["ksm_stat"]   # type: ignore
    assert list(shown.items()) == [("ksm_rmap_items", 10), ("ksm_zero_pages", 2), ("ksm_merging_pages", 7),
                                   ("ksm_process_profit", -4), ("ksm_merge_any", False),
                                   ("ksm_mergeable", True)]
    (host.proc / "1" / "ksm_stat").unlink()   # a kernel before 6.1
    assert host.estimator().run(targets(host, [1])).to_dict()["targets"][0]["ksm_stat"] == {}   # type: ignore


@pytest.mark.parametrize("argv,name", [
    (["/usr/bin/qemu-system-x86_64", "-name", "guest=web1,debug-threads=on", "-m", "256"], "web1"),
    (["qemu-system-aarch64", "-name", "db,process=qemu:db"], "db"),
    (["/usr/libexec/qemu-kvm", "-name", "guest=a,,b,debug-threads=on"], "a,b"),
    (["/usr/bin/qemu-system-x86_64", "-m", "256"], None),
    (["/usr/bin/python3", "-name", "guest=x"], None),
    ([], None),
])
def test_targets_are_named_after_their_guest(tmp_path, argv, name):
    host = FakeHost(tmp_path)
    host.add(7, [[("x", 1, 0)]], comm="worker", cmdline=argv)
    t = describe_pid(7, str(host.proc))
    assert (t.name, t.kind) == ((name, TargetKind.VM) if name else ("worker[7]", TargetKind.PROCESS))
    assert find_qemu_guests(str(host.proc)) == ({name: 7} if name else {})


def test_zero_saving_rules():
    assert zero_saving(0, 0, False) == 0
    assert zero_saving(10, 0, False) == 9          # merge into one KSM frame
    assert zero_saving(10, 0, True) == 10          # mapped to the zero page
    assert zero_saving(10, 10, False) == 10        # all already map the zero page
    assert zero_saving(10, 9, False) == 9          # one own zero frame stays
    assert zero_saving(1000, 0, False, 256) == 1000 - 4


# ------------------------------------------------------------------ accounting

def _two_process_host(tmp_path: Path, use_zero_pages: int = 0) -> Tuple[FakeHost, Dict[int, List[Spec]]]:
    host = FakeHost(tmp_path, use_zero_pages=use_zero_pages)
    a = ([("x", 1, 0)] * 5 + [("x", 2, 0)] * 3 + [("x", 10, 0), ("x", 11, 0)]
         + [("x", 0, 0)] * 4 + [("z", 0, 0)] * 2 + [("n", 1, 0)] * 6 + [("w", 2, 0)] * 3
         + [("s", 3, 900), ("s", 3, 900), ("x", 3, 0)] + [("x", 50, 0)])
    b = ([("x", 1, 0)] * 2 + [("x", 12, 0)] + [("s", 3, 900)] + [("x", 50, 0)] + [("x", 0, 0)]
         + [("n", 12, 0)] * 4)
    host.add(101, [a[:10], a[10:]], unmergeable=[("x", 1, 0)] * 7)
    host.add(102, [b], cmdline=["/usr/bin/qemu-system-x86_64", "-name", "guest=vm2,debug-threads=on"])
    return host, {101: a, 102: b}


@pytest.mark.parametrize("uzp", [0, 1])
def test_fake_host_matches_construction(tmp_path, uzp):
    host, procs = _two_process_host(tmp_path, uzp)
    r = host.estimator().run(targets(host, [101, 102]))
    exp = expected(procs, bool(uzp))
    assert not r.partial and not r.skipped
    assert r.scanned_pages == exp["scanned"]
    assert r.zero_pages == exp["zero"] and r.zero_mapped_pages == exp["zero_mapped"]
    assert r.achievable_nonzero == exp["achievable_nonzero"]
    assert r.duplicate_pages == exp["duplicate"]
    assert r.zero_saving == exp["zero_saving"]
    assert r.achieved == exp["achieved"]
    assert r.use_zero_pages == bool(uzp)
    by_pid = {t.pid: t for t in r.targets}
    for pid, alone in exp["alone"].items():
        assert by_pid[pid].achievable_alone == alone
    # shares add up to the global figures
    assert sum(t.achievable_share for t in r.targets) == pytest.approx(r.achievable)
    assert sum(t.achieved_share for t in r.targets) == pytest.approx(r.achieved)
    assert r.cross_target == r.achievable - sum(exp["alone"].values())
    assert by_pid[102].kind is TargetKind.VM and by_pid[102].name == "vm2"
    assert by_pid[101].ksm_stat is not None and by_pid[101].ksm_stat.merging_pages == 2
    assert r.host["pages_sharing"] == 5
    assert r.efficiency == pytest.approx(r.achieved / r.achievable)


def test_share_of_a_content_split_across_targets(tmp_path):
    host = FakeHost(tmp_path)
    host.add(1, [[("x", 7, 0)]])
    host.add(2, [[("x", 7, 0), ("x", 7, 0), ("x", 8, 0)]])
    r = host.estimator().run(targets(host, [1, 2]))
    t1, t2 = r.targets
    assert r.achievable == 2 and r.cross_target == 1
    assert (t1.achievable_alone, t2.achievable_alone) == (0, 1)
    assert t1.achievable_share == pytest.approx(2 / 3)
    assert t2.achievable_share == pytest.approx(4 / 3)


def test_capped_by_max_page_sharing(tmp_path):
    host = FakeHost(tmp_path, max_page_sharing=4)
    host.add(1, [[("x", 7, 0)] * 10 + [("x", 0, 0)] * 9 + [("x", 8, 0)] * 2])
    r = host.estimator().run(targets(host, [1]))
    assert r.achievable == 9 + 8 + 1
    assert r.achievable_capped == (10 - 3) + (9 - 3) + 1


def test_large_region_spans_windows_and_buffers(tmp_path):
    host = FakeHost(tmp_path)
    specs = [("x", 1 + (i % 97), 0) if i % 5 else ("n", 1, 0) for i in range(3000)]
    host.add(1, [specs])
    r = host.estimator(buffer_bytes=3 * PS, window_pages=64).run(targets(host, [1]))
    exp = expected({1: specs}, False)
    assert r.scanned_pages == exp["scanned"]
    assert r.achievable == exp["achievable_nonzero"] + exp["zero_saving"]


_spec = st.one_of(
    st.tuples(st.sampled_from("xxxxz n w f".replace(" ", "")), st.integers(0, 6), st.just(0)),
    st.tuples(st.just("s"), st.integers(1, 3), st.integers(1, 3)).map(lambda t: ("s", t[1], 500 + t[1] * 10 + t[2])),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(procs=st.lists(st.lists(_spec, min_size=0, max_size=40), min_size=1, max_size=4),
       uzp=st.booleans())
def test_any_structure_matches_construction(tmp_path_factory, procs, uzp):
    host = FakeHost(tmp_path_factory.mktemp("h"), use_zero_pages=int(uzp))
    built = {}
    for i, specs in enumerate(procs):
        # a 'z' page must hold zeros, an 's' page with a given pfn one content
        specs = [("z", 0, 0) if k == "z" else (k, lbl, p) for k, lbl, p in specs]
        specs = [(k, (p - 500) // 10 if k == "s" else lbl, p) for k, lbl, p in specs]
        built[100 + i] = specs
        host.add(100 + i, [specs])
    r = host.estimator(buffer_bytes=2 * PS, window_pages=7).run(targets(host, list(built)))
    exp = expected(built, uzp)
    assert r.scanned_pages == exp["scanned"]
    assert r.zero_pages == exp["zero"]
    assert r.achievable_nonzero == exp["achievable_nonzero"]
    assert r.zero_saving == exp["zero_saving"]
    assert r.achieved == exp["achieved"]
    assert sum(t.achievable_share for t in r.targets) == pytest.approx(r.achievable)
    for t in r.targets:
        assert t.achievable_alone == exp["alone"][t.pid]


def test_host_counters_keep_a_negative_profit_and_leave_out_missing_ones(tmp_path):
    """general_profit < 0 (KSM costs more than it saves) is a reading, not a missing file."""
    host, _ = _two_process_host(tmp_path)
    ksm = host.sys / "kernel" / "mm" / "ksm"
    (ksm / "general_profit").write_text("-8192\n")
    (ksm / "pages_volatile").write_text("garbled\n")
    r = host.estimator().run(targets(host, [101]))
    assert r.host == {"pages_shared": 2, "pages_sharing": 5, "general_profit": -8192, "run": 1}
    assert "general_profit=-8.0 KiB" in render_table(r)
    assert set(HOST_COUNTERS) <= set(knobs.BY_NAME)   # the kernel's names, from the one table


# ------------------------------------------------------------------ error paths

def test_needs_root(tmp_path, monkeypatch):
    host, _ = _two_process_host(tmp_path)
    monkeypatch.setattr(caps.os, "geteuid", lambda: 1000)
    with pytest.raises(PermissionDenied, match="needs root"):
        host.estimator().run(targets(host, [101]))


def test_process_gone_is_skipped_with_a_note(tmp_path):
    host, _ = _two_process_host(tmp_path)
    ts = targets(host, [101, 102])
    (host.proc / "102" / "pagemap").write_bytes(b"")      # what an exited process reads as
    ts.append(Target(4242, "ghost", "process"))            # gone before the scan
    r = host.estimator().run(ts)
    assert [t.pid for t in r.targets] == [101]
    assert {s.pid: s.reason for s in r.skipped} == {102: "exited during the scan",
                                                    4242: "exited before the scan"}


def test_ctrl_c_gives_partial_result(tmp_path):
    host, _ = _two_process_host(tmp_path)
    calls = []

    def progress(p: Progress) -> None:
        calls.append(p)
        raise KeyboardInterrupt

    r = host.estimator(progress=progress, progress_interval_s=0, buffer_bytes=PS).run(
        targets(host, [101, 102]))
    assert r.partial
    assert len(r.targets) == 1 and r.scanned_pages == 1
    assert r.to_dict()["partial"] is True


def test_progress_reports_rate_and_eta(tmp_path):
    host, _ = _two_process_host(tmp_path)
    seen: List[Progress] = []
    host.estimator(progress=seen.append, progress_interval_s=0, buffer_bytes=PS).run(
        targets(host, [101, 102]))
    assert seen and seen[-1].done_bytes == seen[-1].total_bytes
    p = Progress(done_bytes=100, total_bytes=300, elapsed_s=2.0, target="x")
    assert p.rate_bytes_per_s == 50 and p.eta_s == 4.0


def test_token_bucket_limits_rate():
    now = [0.0]
    slept: List[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    b = TokenBucket(1000.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(10):
        b.consume(500)
    assert now[0] == pytest.approx(5.0 - 0.1, abs=0.01)   # 5000 bytes at 1000/s, 0.1 s burst
    with pytest.raises(UsageError):
        TokenBucket(0)


def test_rate_limit_is_applied_to_reads(tmp_path):
    host, _ = _two_process_host(tmp_path)
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    r = host.estimator(rate_limit_bytes_per_s=10 * PS, clock=lambda: now[0], sleep=sleep).run(
        targets(host, [101, 102]))
    assert r.bytes_read == r.scanned_pages * PS
    assert now[0] >= r.bytes_read / (10 * PS) - 0.1 - 1e-9


def test_resolve_targets(tmp_path):
    host, _ = _two_process_host(tmp_path)
    root = str(host.proc)
    assert [t.pid for t in resolve_targets(["vm2"], [], root)] == [102]
    assert [t.name for t in resolve_targets([], [101, 101], root)] == ["proc[101]"]
    with pytest.raises(UsageError, match="no running QEMU guest named 'nope'.*vm2"):
        resolve_targets(["nope"], [], root)
    with pytest.raises(UsageError, match="no process with pid 9"):
        resolve_targets([], [9], root)
    assert {t.pid for t in discover_mergeable(root)} == {101, 102}
    (host.proc / "102" / "ksm_stat").write_text("ksm_mergeable: no\n")
    assert {t.pid for t in discover_mergeable(root)} == {101}


def test_memory_per_scanned_page_is_bounded(tmp_path):
    """Memory grows with the pages scanned (a 16-byte hash each, then one sort), not with
    their contents: all-distinct pages cost the same as duplicates."""
    host = FakeHost(tmp_path)
    n = 20000
    host.add(1, [[("x", i + 1, 0) for i in range(n)]])
    host.add(2, [[("x", i + 1, 0) for i in range(0, n, 2)]])
    e = host.estimator()
    tracemalloc.start()
    try:
        r = e.run(targets(host, [1, 2]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    per_page = peak / r.scanned_pages
    assert r.achievable == n // 2
    assert per_page < 100, per_page   # documented in docs/estimate.md


# ------------------------------------------------------------------ CLI

def test_cli_json_and_table(tmp_path):
    host, procs = _two_process_host(tmp_path)
    runner = CliRunner()
    res = runner.invoke(cli, ["--proc-root", str(host.proc), "--sys-root", str(host.sys), "estimate", "--json",
                              "--pid", "101", "--vm", "vm2"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    exp = expected(procs, False)
    assert data["total"]["achievable"]["pages"] == exp["achievable_nonzero"] + exp["zero_saving"]
    assert data["total"]["achievable"]["bytes"] == data["total"]["achievable"]["pages"] * PS
    assert {t["name"] for t in data["targets"]} == {"proc[101]", "vm2"}
    res = runner.invoke(cli, ["--proc-root", str(host.proc), "--sys-root", str(host.sys), "estimate"])
    assert res.exit_code == 0, res.output
    assert "ALL (2)" in res.output and "vm vm2" in res.output and "EFFICIENCY" in res.output


def test_cli_errors_have_exit_codes(tmp_path, monkeypatch):
    host, _ = _two_process_host(tmp_path)
    runner = CliRunner()
    res = runner.invoke(cli, ["--proc-root", str(host.proc), "estimate", "--vm", "nope"])
    assert res.exit_code == EXIT_USAGE and "no running QEMU guest named 'nope'" in res.output
    res = runner.invoke(cli, ["estimate", "--rate", "0"])
    assert res.exit_code == EXIT_USAGE
    monkeypatch.setattr(caps.os, "geteuid", lambda: 1000)
    res = runner.invoke(cli, ["--proc-root", str(host.proc), "--sys-root", str(host.sys), "estimate"])
    assert res.exit_code == EXIT_PERMISSION and "needs root" in res.output


def test_table_marks_partial(tmp_path):
    host, _ = _two_process_host(tmp_path)
    r = host.estimator().run(targets(host, [101]))
    r.partial = True
    text = render_table(r)
    assert text.startswith("PARTIAL RESULT")


# ------------------------------------------------------------------ this process, for real

def test_scan_own_memory():
    """Real pagemap + mem of this process: a mergeable mapping with a known layout."""
    need_root()
    if os.sysconf("SC_PAGE_SIZE") != PS:
        pytest.skip("layout assumes 4 KiB pages")
    with ksm_exclusive():   # our mapping is mergeable: keep it away from other KSM tests
        m = mmap.mmap(-1, 600 * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            for i in range(100):
                m[i * PS:(i + 1) * PS] = page(1000001 + i % 10)    # 10 contents x 10
            for i in range(100, 200):
                m[i * PS:(i + 1) * PS] = page(2000000 + i)         # unique
            for i in range(200, 250):
                m[i * PS] = 0                                       # zero, own frames
            for i in range(250, 270):
                _ = m[i * PS]                                       # zero page, read only
            m.madvise(mmap.MADV_MERGEABLE)
            r = Estimator().run([Target(os.getpid(), "self")])
        finally:
            m.close()
    t = r.targets[0]
    assert t.scanned_pages == 270
    assert t.zero_pages == 70 and t.zero_mapped_pages == 20
    assert r.achievable_nonzero == 90
    assert r.zero_saving == (70 if r.use_zero_pages else 69)
    assert r.achieved >= 20


# ------------------------------------------------------------------ daemon's periodic scan

def test_periodic_estimate_publishes_and_refuses_to_publish_nothing(tmp_path):
    """A scan that could read no target is a failure, not a zero potential: publishing 0
    would make a merge_potential policy stop KSM."""
    from ksmctl.config import EstimateConfig
    from ksmctl.estimate.schedule import PeriodicEstimate
    host, procs = _two_process_host(tmp_path)
    published, errors = [], []
    pe = PeriodicEstimate(EstimateConfig(enabled=True), str(host.proc), str(host.sys),
                          publish=published.append, on_error=errors.append)
    summary = pe.run_once()
    exp = expected(procs, False)
    assert published == [summary] and not errors
    assert summary.achievable == (exp["achievable_nonzero"] + exp["zero_saving"]) * PS
    for pid in procs:
        (host.proc / str(pid) / "mem").unlink()   # unreadable from now on
    assert pe.run_once() is None
    assert len(published) == 1
    assert len(errors) == 1 and errors[0].startswith("no process could be scanned: ")
    assert "proc[101] (pid 101): exited during the scan" in errors[0]


def test_missing_capabilities_parses_capeff():
    full = "Name:\tx\nCapEff:\t000001ffffffffff\n"
    assert missing_capabilities(full) == []
    only_dac_read_search = "CapEff:\t0000000000000004\n"
    missing = missing_capabilities(only_dac_read_search)
    assert [m.split()[0] for m in missing] == ["CAP_SYS_PTRACE", "CAP_SYS_ADMIN"]
    assert missing_capabilities("CapEff:\t0000000000280000\n") == []   # bits 19 and 21
    assert missing_capabilities("no such line\n") == []


# ------------------------------------------------------------------ numpy and OpenBLAS

def _python(code: str, env_overrides: Dict[str, str], drop: Sequence[str] = (), args: Sequence[str] = ()) -> str:
    """stdout of `code` in a fresh interpreter (this checkout first on the path)."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_overrides)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    p = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


THREADS_AFTER = "import os, {module}; print(len(os.listdir('/proc/self/task')), os.environ.get('OPENBLAS_NUM_THREADS'))"


def test_openblas_runs_one_thread_once_the_estimator_is_imported():
    """OpenBLAS reads OPENBLAS_NUM_THREADS once, when numpy is first imported; the
    package's __init__ sets it before any submodule imports numpy."""
    bare = _python(THREADS_AFTER.format(module="numpy"), {}, drop=["OPENBLAS_NUM_THREADS"])
    if int(bare.split()[0]) < 2:
        pytest.skip("numpy alone starts no extra thread here (one CPU, or no OpenBLAS): nothing to prove")
    assert _python(THREADS_AFTER.format(module="ksmctl.estimate.scan"), {},
                   drop=["OPENBLAS_NUM_THREADS"]) == "1 1"
    # the path the CLI takes: `import ksmctl.cli` first, the engine when the command runs
    assert _python(THREADS_AFTER.format(module="ksmctl.cli, ksmctl.estimate.count"), {},
                   drop=["OPENBLAS_NUM_THREADS"]) == "1 1"
    # an operator's own setting wins
    assert _python(THREADS_AFTER.format(module="ksmctl.estimate.scan"), {"OPENBLAS_NUM_THREADS": "2"}) == "2 2"


def test_numpy_is_imported_only_inside_the_estimate_package():
    """Otherwise numpy could be loaded before ksmctl/estimate/__init__.py sets the thread count."""
    import ast
    import ksmctl
    root = Path(ksmctl.__file__).parent
    importers = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "numpy" or n.startswith("numpy.") for n in names):
                importers.add(path.relative_to(root).as_posix())
    assert importers and all(p.startswith("estimate/") for p in importers), sorted(importers)


NUMPY_AFTER_DAEMON = r"""
import sys, time
from ksmctl.config import Config, EstimateConfig, ExporterConfig
from ksmctl.service.wiring import build_daemon
import ksmctl.cli
root, enabled = sys.argv[1], sys.argv[2] == "1"
config = Config(sys_root=root + "/sys", proc_root=root + "/proc", run_root=root + "/run", libvirt=False,
                state_dir=root + "/state", state_file=root + "/state.json",
                exporter=ExporterConfig(enabled=False), estimate=EstimateConfig(enabled=enabled))
d = build_daemon(config, dry_run=True)
d.tick()
deadline = time.monotonic() + 60
while enabled and "numpy" not in sys.modules and time.monotonic() < deadline:
    time.sleep(0.05)
print("numpy" in sys.modules)
"""


@pytest.mark.parametrize("enabled", [False, True])
def test_numpy_stays_unloaded_by_the_cli_and_a_daemon_with_estimates_off(tmp_path, enabled):
    """The control (estimates on) proves the check sees numpy when the scan is wired in."""
    from tests.fixtures import make_proc, make_sys
    make_sys(tmp_path / "sys")
    make_proc(tmp_path / "proc")
    (tmp_path / "run").mkdir()
    assert _python(NUMPY_AFTER_DAEMON, {}, args=[str(tmp_path), "1" if enabled else "0"]) == str(enabled)


def test_package_exports_the_library_names_lazily():
    """docs/estimate.md's `from ksmctl.estimate import Estimator, resolve_targets`."""
    import ksmctl.estimate as pkg
    from ksmctl.estimate.scan import Estimator as engine
    assert pkg.Estimator is engine and pkg.resolve_targets is resolve_targets
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pkg.nope   # type: ignore[attr-defined]
