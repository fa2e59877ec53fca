"""`ksmctl set` and `ksmctl unmerge` fail closed (issue #11), through CliRunner on
fixture trees: run=2 only through unmerge however it is spelled; unmerge needs a
terminal or --yes, and refuses when it cannot count what it would allocate."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from ksmctl.cli import cli
from ksmctl.errors import EXIT_REFUSED, EXIT_USAGE

from .fixtures import make_proc, make_sys

TIGHT = "MemTotal: 1048576 kB\nMemFree: 10000 kB\nMemAvailable: 50000 kB\n"


def run(tmp_path, *args, sys_over=None, drop=(), meminfo=None, input=None):
    sys_root = make_sys(tmp_path / "sys", sys_over, drop=drop)
    proc_root = make_proc(tmp_path / "proc", **({"meminfo": meminfo} if meminfo is not None else {}))
    cfg = tmp_path / "config.yaml"
    cfg.write_text("state_file: %s\nlibvirt: false\n" % (tmp_path / "state.json"))
    return CliRunner().invoke(cli, ["--config", str(cfg), "--sys-root", str(sys_root), "--proc-root",
                                    str(proc_root), *args], input=input)


def run_file(tmp_path) -> str:
    return (tmp_path / "sys/kernel/mm/ksm/run").read_text()


@pytest.mark.parametrize("spelling", ["run=2", "run=02", "run=002", "run= 2", "run=2 "])
@pytest.mark.parametrize("dry", [(), ("--dry-run",)])
def test_unmerge_guard_holds_for_every_spelling_of_two(tmp_path, spelling, dry):
    r = run(tmp_path, "set", *dry, "pages_to_scan=500", spelling)
    assert r.exit_code == EXIT_USAGE, r.output
    assert "run=2 unmerges every merged page: use `ksmctl unmerge`" in r.output
    assert run_file(tmp_path) == "1\n"
    assert (tmp_path / "sys/kernel/mm/ksm/pages_to_scan").read_text() == "100\n"  # nothing written


@pytest.mark.parametrize("value", ["+2", "\u0662", "\uff12", "2.0", "0x2", "1_0", "two"])
def test_only_ascii_digits_are_numbers(tmp_path, value):
    r = run(tmp_path, "set", "run=" + value)
    assert r.exit_code == EXIT_USAGE, r.output
    assert "ksmctl: run: %r is not a whole number; allowed: 0..2" % value in r.output
    assert "Traceback" not in r.output and run_file(tmp_path) == "1\n"


def test_leading_zeros_are_the_same_number(tmp_path):
    r = run(tmp_path, "set", "pages_to_scan=0500", "run=00")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == ["pages_to_scan: 100 -> 500", "run: 1 -> 0"]


@pytest.mark.parametrize("input", ["n\n", "y\n", ""])
def test_unmerge_without_a_terminal_needs_yes(tmp_path, input):
    r = run(tmp_path, "unmerge", input=input)
    assert r.exit_code == EXIT_REFUSED, r.output
    assert "stdin is not a terminal: pass --yes to unmerge without confirmation" in r.output
    assert run_file(tmp_path) == "1\n"


def test_unmerge_with_yes_unmerges_when_memory_allows(tmp_path):
    r = run(tmp_path, "unmerge", "--yes")
    assert r.exit_code == 0, r.output
    assert "unmerged: run=2" in r.output and run_file(tmp_path) == "2\n"


@pytest.mark.parametrize("sys_over,drop,what", [
    ({"pages_sharing": "lots"}, (), "pages_sharing: expected an integer, found 'lots'"),
    ({}, ("pages_sharing",), "pages_sharing is not available"),
    ({"ksm_zero_pages": "??"}, (), "ksm_zero_pages: expected an integer, found '??'"),
])
def test_unmerge_refuses_when_it_cannot_count_what_it_allocates(tmp_path, sys_over, drop, what):
    r = run(tmp_path, "unmerge", "--yes", "--force", sys_over=sys_over, drop=drop)
    assert r.exit_code == EXIT_REFUSED, r.output
    assert "refusing to unmerge: cannot tell how much memory it would allocate" in r.output
    assert what in r.output and run_file(tmp_path) == "1\n"


def test_unmerge_refuses_without_meminfo(tmp_path):
    r = run(tmp_path, "unmerge", "--yes", meminfo="MemFree: 10 kB\n")
    assert r.exit_code == EXIT_REFUSED, r.output
    assert "cannot tell whether the host can absorb it" in r.output and "MemTotal is missing" in r.output
    assert run_file(tmp_path) == "1\n"


def test_unmerge_on_a_kernel_without_ksm_zero_pages_counts_pages_sharing(tmp_path):
    r = run(tmp_path, "unmerge", "--dry-run", drop=("ksm_zero_pages",))
    assert r.exit_code == 0, r.output
    assert "Unmerging allocates 97.7 MiB" in r.output  # 25000 pages


def test_unmerge_dry_run_says_what_and_writes_nothing(tmp_path):
    r = run(tmp_path, "unmerge", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "Unmerging allocates 99.6 MiB" in r.output
    assert "dry run: the memory guard allows it; nothing written" in r.output
    assert run_file(tmp_path) == "1\n"
    r = run(tmp_path, "unmerge", "--dry-run", meminfo=TIGHT)
    assert r.exit_code == EXIT_REFUSED and "refusing to unmerge: it would allocate" in r.output
    assert "(dry run: nothing written)" in r.output and run_file(tmp_path) == "1\n"
    r = run(tmp_path, "unmerge", "--dry-run", "--force", meminfo=TIGHT)
    assert r.exit_code == 0 and "refuses it, --force overrides" in r.output and run_file(tmp_path) == "1\n"
