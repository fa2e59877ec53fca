"""`ksmctl doctor` against real guests, started side by side under the real libvirtd: a
normal guest, one with <nosharepages/>, one whose RAM is in huge pages (a memfd backend
with hugetlb, from a few hundred MiB of hugepages reserved for the test and given back),
and one with a shared memfd backend (what vhost-user and virtiofs need). Doctor must name
each one's reason with its evidence, and the normal guests must merge."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ksmctl.cli import cli
from tests.lab.lab import Lab

from .test_lab_vms import merging, merging_fast, sharing

pytestmark = [pytest.mark.lab, pytest.mark.kernel]

NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
GUEST_MIB = 256
HUGE_PAGES = GUEST_MIB // 2 + 16   # 2 MiB pages for one guest, and a little slack


@pytest.fixture(scope="module")
def variants(lab: Lab, lab_guests):
    before = int(NR_HUGEPAGES.read_text())
    NR_HUGEPAGES.write_text(str(before + HUGE_PAGES))
    started = []
    try:
        got = int(NR_HUGEPAGES.read_text())
        assert got >= before + GUEST_MIB // 2, "could reserve only %d hugepages" % (got - before)
        huge = lab.start_guest(memory_mib=GUEST_MIB, tag="huge",
                               memory_backing="<hugepages/><source type='memfd'/>")
        started.append(huge)
        shared = lab.start_guest(memory_mib=GUEST_MIB, tag="shared",
                                 memory_backing="<source type='memfd'/><access mode='shared'/>")
        started.append(shared)
        lab.wait_ready(started)
        yield {"huge": huge, "shared": shared}
    finally:
        for g in started:
            lab.destroy_guest(g)
        NR_HUGEPAGES.write_text(str(before))


def test_doctor_names_why_each_real_guest_merges_or_not(tmp_path, lab_guests, variants):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("state_file: %s\n" % (tmp_path / "state.json"))
    with merging_fast(lab_guests):
        names = [g.name for g in lab_guests] + [g.name for g in variants.values()]
        r = CliRunner().invoke(cli, ["--config", str(cfg), "doctor", "--json", "--cpu-window", "0"] + names)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    vms = {v["name"]: v for v in doc["vms"]}
    findings = {}
    for f in doc["findings"]:
        findings.setdefault(f["vm"], {})[f["reason"]] = f
    for g in sharing(lab_guests):
        assert vms[g.name]["can_merge"] and vms[g.name]["pid"] == g.pid, vms[g.name]
        assert findings[g.name]["merging"]["severity"] == "ok"
    noshare = [g for g in lab_guests if g.nosharepages][0]
    assert set(vms[noshare.name]["unmergeable"]) >= {"nosharepages", "mem_merge_off"}, vms[noshare.name]
    assert findings[noshare.name]["nosharepages"]["evidence"][0]["source"] == "libvirt domain XML"
    huge = variants["huge"]
    assert "hugetlbfs" in vms[huge.name]["unmergeable"], findings[huge.name]
    assert merging(huge.pid) == 0
    srcs = {e["source"] for e in findings[huge.name]["hugetlbfs"]["evidence"]}
    assert "/proc/%d/smaps" % huge.pid in srcs and "QEMU command line (/proc/%d/cmdline)" % huge.pid in srcs
    shared = variants["shared"]
    assert "shared_memory" in vms[shared.name]["unmergeable"], findings[shared.name]
    assert any("share" in e["what"] for e in findings[shared.name]["shared_memory"]["evidence"])


def test_mergeable_memory_leaves_out_a_shared_memfd_guests_ram(lab_guests, variants):
    """A guest whose RAM is a shared memfd (vhost-user, virtiofs) holds it as shmem, which
    KSM cannot merge: the mergeable figure counts only anonymous RSS. Its QEMU process still
    says ksm_mergeable (QEMU marks its other RAM blocks), so the kernel's word alone would
    count the whole guest, as the figure did before."""
    from ksmctl.collectors.procfs import ProcFs
    from ksmctl.collectors.vms import VmCollector
    from .test_lab_vms import URI
    c = VmCollector(URI, events=False)
    try:
        got = {v.name: v for v in c.collect()}
    finally:
        c.close()
    shared, plain = got[variants["shared"].name], got[sharing(lab_guests)[0].name]
    assert shared.ksm is not None and shared.ksm.mergeable, shared.ksm
    assert shared.rss - shared.anon_rss > 32 << 20, (shared.rss, shared.anon_rss)   # the guest's RAM, as shmem
    assert plain.anon_rss > shared.anon_rss + (32 << 20), (plain.anon_rss, shared.anon_rss)

    class OnlyIt(ProcFs):   # the /proc path (a process the VM collector does not know)
        def pids(self):
            return iter([shared.pid])
    counted = OnlyIt().mergeable_rss()
    assert abs(counted - shared.anon_rss) < 8 << 20 and shared.rss - counted > 32 << 20, (counted, shared)
