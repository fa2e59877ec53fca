"""The KSM writer: validation, write-only-what-changed, order, restore, the unmerge
guard (fixture trees), and the kernel's real refusals (real /sys/kernel/mm/ksm)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ksmctl.collectors.procfs import ProcFs
from ksmctl.kernel.sysfs import KsmSysfs
from ksmctl.errors import KernelWriteError, Refused, UsageError
from ksmctl.kernel.writer import KsmWriter, validate_value
from ksmctl.readings import MemInfo

from .fixtures import make_sys
from .ksmlock import ksm_exclusive, unmerge_and_wait
from .mergeable import Holder
from .support import need_root, wait_for


class RecordingSysfs(KsmSysfs):
    """A fixture tree that also records the order of writes."""

    def __init__(self, root):
        super().__init__(str(root), page_size=4096)
        self.writes = []

    def path(self, name):
        self.writes.append(name)
        return super().path(name)


def test_writes_only_changes_in_safe_order(tmp_path):
    sysfs = RecordingSysfs(make_sys(tmp_path, {"run": "0", "advisor_mode": "none [scan-time]"}))
    w = KsmWriter(sysfs)
    state = sysfs.read()
    changes = w.apply({"run": 1, "pages_to_scan": 100, "sleep_millisecs": 50, "advisor_mode": "none"}, state)
    assert [c.knob for c in changes] == ["advisor_mode", "sleep_millisecs", "run"]  # pages_to_scan unchanged
    assert sysfs.writes == ["advisor_mode", "sleep_millisecs", "run"]
    assert (tmp_path / "kernel/mm/ksm/sleep_millisecs").read_text() == "50\n"
    assert [(c.old, c.new) for c in changes] == [("scan-time", "none"), (20, 50), (0, 1)]


@pytest.mark.parametrize("knob,value,message", [
    ("pages_to_scan", "-5", "pages_to_scan: -5 is out of range; allowed: 0..4294967295"),
    ("pages_to_scan", "fast", "pages_to_scan: 'fast' is not a whole number; allowed: 0..4294967295"),
    ("run", "3", "run: 3 is out of range; allowed: 0..2"),
    ("max_page_sharing", "1", "max_page_sharing: 1 is out of range; allowed: 2..2147483647"),
    ("advisor_mode", "fast", "advisor_mode: 'fast' is not allowed; allowed: none, scan-time"),
    ("pages_volatile", "1", "unknown KSM knob 'pages_volatile'; writable knobs: advisor_max_cpu, "
                            "advisor_max_pages_to_scan, advisor_min_pages_to_scan, advisor_mode, "
                            "advisor_target_scan_time, max_page_sharing, merge_across_nodes, pages_to_scan, run, "
                            "sleep_millisecs, smart_scan, stable_node_chains_prune_millisecs, use_zero_pages"),
])
def test_validation_messages(knob, value, message):
    with pytest.raises(UsageError) as e:
        validate_value(knob, value)
    assert str(e.value) == message


@pytest.mark.parametrize("value,expected", [("02", 2), (" 7 ", 7), (True, 1), (5, 5)])
def test_numbers_are_normalised_before_checks(value, expected):
    assert validate_value("pages_to_scan", value) == expected


@pytest.mark.parametrize("value", ["+2", "\u0662", "\uff12", "1_0", "2.0", "0x2", "", 2.0])
def test_only_ascii_digits_are_numbers(value):
    with pytest.raises(UsageError) as e:
        validate_value("run", value)
    assert str(e.value) == "run: %r is not a whole number; allowed: 0..2" % (value,)


def test_unsupported_knob_on_old_kernel(tmp_path):
    state = KsmSysfs(str(make_sys(tmp_path, drop=("smart_scan",)))).read()
    with pytest.raises(UsageError, match="smart_scan is not supported by this kernel"):
        validate_value("smart_scan", 1, state)


def test_unmerge_guard(tmp_path):
    sysfs = KsmSysfs(str(make_sys(tmp_path, {"pages_sharing": "2621440", "ksm_zero_pages": "0"})), page_size=4096)
    state = sysfs.read()  # 10 GiB merged
    tight = MemInfo(total=32 << 30, available=9 << 30, free=9 << 30)
    with pytest.raises(Refused) as e:
        KsmWriter(sysfs).unmerge(state, tight)
    assert "it would allocate 10.0 GiB" in str(e.value) and "MemAvailable is 9.0 GiB" in str(e.value)
    assert "--force" in str(e.value)
    assert (tmp_path / "kernel/mm/ksm/run").read_text() == "1\n"
    KsmWriter(sysfs).unmerge(state, tight, force=True)
    assert (tmp_path / "kernel/mm/ksm/run").read_text() == "2\n"
    roomy = MemInfo(total=32 << 30, available=20 << 30, free=20 << 30)
    KsmWriter(sysfs).unmerge(state, roomy)


def test_apply_refuses_run_2(tmp_path):
    sysfs = KsmSysfs(str(make_sys(tmp_path)))
    with pytest.raises(Refused, match="checks memory first"):
        KsmWriter(sysfs).apply({"run": 2}, sysfs.read())


# -- the real kernel ------------------------------------------------------------------------
def test_kernel_refuses_pages_to_scan_while_advisor_active():
    need_root()
    sysfs = KsmSysfs()
    if "advisor_mode" in sysfs.read().unsupported:
        pytest.fail("this host's kernel is documented to have advisor_mode")
    with ksm_exclusive():
        with open(sysfs.path("advisor_mode"), "w") as f:
            f.write("scan-time")
        state = sysfs.read()
        assert state.advisor_mode == "scan-time"
        with pytest.raises(KernelWriteError) as e:
            KsmWriter(sysfs).apply({"pages_to_scan": state.get("pages_to_scan") + 1}, state)
        assert "advisor owns the scan rate; set advisor_mode=none first" in str(e.value)
        # Listing advisor_mode=none with it makes the same write succeed: the writer orders it first.
        KsmWriter(sysfs).apply({"advisor_mode": "none", "pages_to_scan": 777}, sysfs.read())
        assert sysfs.read().get("pages_to_scan") == 777


def test_kernel_refuses_merge_across_nodes_while_merged():
    need_root()
    sysfs = KsmSysfs()
    with ksm_exclusive(), Holder(pages=2000, distinct=4):
        KsmWriter(sysfs).apply({"pages_to_scan": 5000, "sleep_millisecs": 10, "run": 1}, sysfs.read())
        # The holder's own merges (about 1990 pages sharing), not a stable node an earlier
        # test left behind that ksmd may prune before the write below.
        wait_for(lambda: sysfs.read().get("pages_sharing") > 1500, 30, "pages to merge")
        state = sysfs.read()
        flip = 1 - state.get("merge_across_nodes")
        with pytest.raises(KernelWriteError) as e:
            KsmWriter(sysfs).apply({"merge_across_nodes": flip}, state)
        assert "cannot change while pages are merged" in str(e.value) and "ksmctl unmerge" in str(e.value)


def test_the_test_lock_puts_merge_across_nodes_back():
    """A test that flips merge_across_nodes leaves the host as it found it: the kernel
    takes the value back only with nothing merged, so the restore unmerges first."""
    need_root()
    with ksm_exclusive() as saved, Holder(pages=2000, distinct=4):
        sysfs = KsmSysfs()
        unmerge_and_wait()
        flip = 1 - sysfs.read().get("merge_across_nodes")
        KsmWriter(sysfs).apply({"merge_across_nodes": flip}, sysfs.read())
        assert sysfs.read().get("merge_across_nodes") == flip
        # Something merged under the flipped value, as a failed test would leave it.
        KsmWriter(sysfs).apply({"pages_to_scan": 5000, "sleep_millisecs": 10, "run": 1}, sysfs.read())
        wait_for(lambda: sysfs.read().get("pages_sharing") > 1500, 30, "pages to merge")
    after = KsmSysfs().read()
    assert str(after.get("merge_across_nodes")) == saved["merge_across_nodes"]
    assert str(after.get("run")) == saved["run"]


def test_non_root_gets_requires_root():
    need_root()  # we need root to drop to an unprivileged user
    # Import first: the interpreter under /root is not readable once we are nobody.
    with ksm_exclusive():
        value = KsmSysfs().read().get("pages_to_scan") + 1  # a real change, so a write is tried
        code = ("import os, sys; from ksmctl.cli import main; os.setgid(65534); os.setuid(65534); "
                "sys.argv=['ksmctl','set','pages_to_scan=%d']; main()" % value)
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           cwd=os.path.dirname(os.path.dirname(__file__)))
    assert p.returncode == 3, p.stderr
    assert "requires root to write /sys/kernel/mm/ksm" in p.stderr
    assert "Traceback" not in p.stderr


def test_unmerge_on_real_kernel_when_memory_allows():
    need_root()
    sysfs = KsmSysfs()
    with ksm_exclusive(), Holder(pages=3000, distinct=3):
        w = KsmWriter(sysfs)
        w.apply({"pages_to_scan": 5000, "sleep_millisecs": 10, "run": 1}, sysfs.read())
        wait_for(lambda: sysfs.read().get("pages_sharing") > 2000, 30, "pages to merge")
        w.unmerge(sysfs.read(), ProcFs().meminfo())
        wait_for(lambda: sysfs.read().get("pages_sharing") == 0, 30, "unmerge to finish")
        assert sysfs.read().get("run") == 2
