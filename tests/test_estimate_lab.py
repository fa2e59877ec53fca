"""`ksmctl estimate` on the real QEMU guests of the lab (tests/lab): per-VM and cross-VM
potential, and no page faulted in by the scan."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import pytest
from click.testing import CliRunner

from ksmctl.cli import cli
from ksmctl.estimate.discover import parse_smaps_mergeable, resolve_targets
from ksmctl.estimate.scan import Estimator

pytestmark = [pytest.mark.lab]

SHARED_PAGES = 8000   # each sharing guest writes ~12,000 pages that the others also hold


def _mergeable_rss(pid: int) -> int:
    return sum(r.rss_bytes for r in parse_smaps_mergeable(Path("/proc/%d/smaps" % pid).read_text()))


def test_per_vm_and_cross_vm_potential(lab_guests):
    sharing = [g for g in lab_guests if not g.nosharepages]
    noshare = [g for g in lab_guests if g.nosharepages]
    targets = resolve_targets(vms=[g.name for g in lab_guests])
    assert {t.pid for t in targets} == {g.pid for g in lab_guests}
    assert all(t.kind == "vm" for t in targets)
    rss_before: Dict[int, int] = {g.pid: _mergeable_rss(g.pid) for g in sharing}
    r = Estimator().run(targets)
    rss_after = {g.pid: _mergeable_rss(g.pid) for g in sharing}
    by = {t.name: t for t in r.targets}
    assert not r.partial and not r.skipped
    for g in sharing:
        t = by[g.name]
        assert t.scanned_pages > SHARED_PAGES
        assert t.achievable_share > t.achievable_alone >= 0
        # Guest RAM is 256 MiB but only what the guest touched is present. Reading
        # non-present pages would fault them in and grow the mergeable RSS towards 256 MiB;
        # allow only the guest's own background activity (2 MiB).
        assert rss_after[g.pid] - rss_before[g.pid] <= 2 << 20, g.name
        assert t.scanned_pages * r.page_size <= 256 << 20
    for g in noshare:   # <nosharepages/>: QEMU does not mark its RAM mergeable
        assert by[g.name].scanned_pages == 0
    # The sharing guests hold the same content: merging across VMs adds most of the potential.
    assert r.cross_target >= (len(sharing) - 1) * SHARED_PAGES
    assert r.achievable >= r.cross_target
    assert sum(t.achievable_share for t in r.targets) == pytest.approx(r.achievable)


def test_cli_json_on_guests(lab_guests):
    g1, g2 = [g for g in lab_guests if not g.nosharepages][:2]
    res = CliRunner().invoke(cli, ["estimate", "--vm", g1.name, "--vm", g2.name, "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert [t["name"] for t in data["targets"]] == [g1.name, g2.name]
    assert data["total"]["cross_target"]["pages"] >= SHARED_PAGES
    assert 0.0 <= (data["total"]["efficiency"] or 0.0) <= 1.0
