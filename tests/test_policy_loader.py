"""The policy loader: one test per kind of invalid policy (exact messages), the shipped
policies, the JSON Schema, and a property test that nothing escapes as a traceback."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ksmctl.errors import PolicyError
from ksmctl.policy.loader import json_schema, load_policy, parse_policy, shipped_policy_names

REPO = Path(__file__).resolve().parent.parent

INVALID = [
    ("name: x\nscan:\n  pages_to_scan:\n    mx: 3\n",
     "p.yaml:4: scan.pages_to_scan: unknown key 'mx'; allowed here: boost, decay, initial, max, min"),
    ("name: x\ninterval: soon\n",
     "p.yaml:2: interval: 'soon' is not allowed: expected seconds, or with a unit: 500ms, 10s, 5m, 1h, found 'soon'"),
    ("name: x\nscan:\n  cpu_budget: 150\n",
     "p.yaml:3: scan.cpu_budget: 150 is not allowed: Input should be less than or equal to 100"),
    ("interval: 5\n", "p.yaml:1: top level: required key 'name' is missing"),
    ("", "p.yaml: top level: required key 'name' is missing"),
    ("name: x\nrun:\n  mode: conditional\n  start_when:\n    - {signal: memory_used, below: 10%}\n",
     "p.yaml:5: run.start_when[0].signal: 'memory_used' is not allowed: Input should be 'memory_available', "
     "'memory_free', 'memory_available_fall', 'psi_some_avg10', 'psi_some_avg60', 'psi_full_avg10', 'psi_full_avg60', 'guest_committed', "
     "'guest_maximum', 'guest_rss', 'guest_committed_headroom', 'guest_rss_headroom', 'guest_free', "
     "'running_vms', 'mergeable_memory' or 'merge_potential'"),
    ("name: x\nrun:\n  mode: conditional\n  start_when:\n    - {signal: psi_some_avg10, above: 10%}\n",
     "p.yaml:5: run.start_when[0]: a percentage of MemTotal only applies to memory signals, not psi_some_avg10"),
    ("name: x\nrun:\n  mode: conditional\n  start_when:\n    - {signal: memory_free, above: 1GiB, below: 2GiB}\n",
     "p.yaml:5: run.start_when[0]: a condition needs exactly one of below, at_most, above, at_least "
     "(found below, above)"),
    ("name: x\nscan:\n  pages_to_scan: {min: 500, max: 100}\n",
     "p.yaml:3: scan.pages_to_scan: min (500) is larger than max (100)"),
    ("name: x\nscan: {}\nscan: {}\n", "p.yaml:3: top level: key 'scan' appears twice"),
    ("name: x\nscan: [\n", "p.yaml:3: not valid YAML: expected the node content, but found '<stream end>'"),
    ("- name: x\n", "p.yaml:1: the top level must be a mapping of keys to values, found list"),
    ("name: x\nrun:\n  mode: conditional\n",
     "p.yaml:3: run: mode conditional needs at least one start_when condition"),
    ("name: x\nrun: &r {mode: always}\nscan: *r\n", "p.yaml:3: not valid YAML: YAML aliases (*name) are not supported"),
    ("name: x\nscan:\n  sleep_millisecs: {reference_memory: 16 gigs}\n",
     "p.yaml:3: scan.sleep_millisecs.reference_memory: '16 gigs' is not allowed: expected a size in bytes, or with "
     "a unit: 512MiB, 2GiB, 2048KiB (K/M/G/T = powers of 1024), found '16 gigs'"),
    ("name: x\nrun:\n  mode: conditional\n  start_when:\n    - {signal: memory_free, below: true}\n",
     "p.yaml:5: run.start_when[0].below: True is not allowed: expected a number, a size like 2GiB or a "
     "percentage like 20%, found True"),
    ("name: x\nrun:\n  mode: conditional\n  start_when: [{signal: memory_free, below: 1GiB}]\n  on_stop: background\n",
     "p.yaml:3: run: on_stop: background needs a background: {pages_to_scan, sleep_millisecs}"),
    ("Name: x\n", "p.yaml:1: top level: required key 'name' is missing\n"
                  "p.yaml:1: top level: unknown key 'Name'; allowed here: description, interval, kernel, name, ownership, "
                  "run, scan, vms"),
    ("name: x\nrun: {mode: sometimes}\n",
     "p.yaml:2: run.mode: 'sometimes' is not allowed: Input should be 'conditional', 'always' or 'off'"),
    # Cross-field consistency and the kernel's ranges (issue #11).
    ("name: x\nscan:\n  sleep_millisecs: {floor: 500, ceiling: 100}\n",
     "p.yaml:3: scan.sleep_millisecs: floor (500) is larger than ceiling (100)"),
    ("name: x\nscan:\n  sleep_millisecs: {base: 5, floor: 10}\n",
     "p.yaml:3: scan.sleep_millisecs: base (5) is outside floor..ceiling (10..60000)"),
    ("name: x\nrun:\n  mode: conditional\n  start_when:\n    - {signal: memory_free, below: {percent: 20, at_least: 2GiB, "
     "at_most: 1GiB}}\n",
     "p.yaml:5: run.start_when[0].below: at_least (2147483648) is larger than at_most (1073741824)"),
    ("name: x\nscan:\n  advisor: {min_pages_to_scan: 5000, max_pages_to_scan: 100}\n",
     "p.yaml:3: scan.advisor: min_pages_to_scan (5000) is larger than max_pages_to_scan (100)"),
    ("name: x\nscan:\n  advisor: {target_scan_time: 0}\n",
     "p.yaml:3: scan.advisor.target_scan_time: 0 is not allowed: Input should be greater than or equal to 1"),
    ("name: x\nscan:\n  adaptive: {idle: {pages_to_scan: 4294967296, sleep_millisecs: 10}}\n",
     "p.yaml:3: scan.adaptive.idle.pages_to_scan: 4294967296 is not allowed: Input should be less than or equal to "
     "4294967295"),
    ("name: x\nscan:\n  pages_to_scan: {max: 4294967296}\n",
     "p.yaml:3: scan.pages_to_scan.max: 4294967296 is not allowed: Input should be less than or equal to 4294967295"),
    ("name: x\nscan:\n  adaptive: {target_pass_seconds: 'nan'}\n",
     "p.yaml:3: scan.adaptive.target_pass_seconds: 'nan' is not allowed: Input should be a finite number"),
    ("name: x\nscan:\n  cpu_budget: 'inf'\n", "p.yaml:3: scan.cpu_budget: 'inf' is not allowed: Input should be a finite number"),
    ("name: x\nscan:\n  cpu_budget: .inf\n", "p.yaml:3: scan.cpu_budget: .inf: NaN and infinity are not allowed, write a finite number"),
    ("name: x\nrun:\n  mode: conditional\n  start_when: [{signal: memory_free, below: '1e999'}]\n",
     "p.yaml:4: run.start_when[0].below: '1e999' is not allowed: expected a size in bytes, or with a unit: 512MiB, "
     "2GiB, 2048KiB (K/M/G/T = powers of 1024), found '1e999'"),
    ("name: x\nrun:\n  mode: conditional\n  start_when: [{signal: memory_free, below: 99999999999999999999999999"
     "9999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999"
     "99999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999"
     "99999999999999999999999999999999999999999999999999999999999999999999999999999GiB}]\n",
     "p.yaml:4: run.start_when[0].below: too large for a size: 99999999999999999999..."),
    ("name: x\nscan:\n  adaptive: {resume_growth: .inf}\n",
     "p.yaml:3: scan.adaptive.resume_growth: .inf: NaN and infinity are not allowed, write a finite number"),
    ("name: x\nrun:\n  mode: conditional\n  start_when: [{signal: memory_free, below: -1}]\n",
     "p.yaml:4: run.start_when[0].below: -1 is not allowed: memory_free cannot be negative"),
    ("name: x\nrun:\n  mode: conditional\n  start_when: [{signal: psi_some_avg10, above: 101}]\n",
     "p.yaml:4: run.start_when[0].above: 101 is not allowed: PSI is a percentage of time, 0..100"),
    ("name: x\nrun:\n  mode: conditional\n  start_when: [{signal: memory_free, below: 120%}]\n",
     "p.yaml:4: run.start_when[0].below.percent: 120.0 is not allowed: Input should be less than or equal to 100"),
]

_SHARE = ("is not allowed: min_pass_yield is a share of the merging phase's yield per ksmd CPU-second: a number "
          "from 0 to 1 (e.g. 0.05; 0 always runs the pass), found ")
INVALID += [("name: x\nscan:\n  adaptive: {min_pass_yield: %s}\n" % v,
             "p.yaml:3: scan.adaptive.min_pass_yield: %s %s%s" % (shown, _SHARE, found))
            for v, shown, found in (("-0.01", "-0.01", "-0.01"), ("1.5", "1.5", "1.5"), ("'0.5'", "'0.5'", "'0.5'"),
                                    ("true", "True", "True"), ("'nan'", "'nan'", "'nan'"))]
INVALID += [("name: x\nscan:\n  adaptive: {min_pass_yield: [0.1]}\n",
             "p.yaml:3: scan.adaptive.min_pass_yield: " + _SHARE.split("allowed: ", 1)[1] + "[0.1]"),
            ("name: x\nscan:\n  adaptive: {min_pass_yield: .nan}\n",
             "p.yaml:3: scan.adaptive.min_pass_yield: .nan: NaN and infinity are not allowed, write a finite number")]

_SWEEP = ("is not allowed: sweep_cpu is the share of one core that idle sweeps may cost on average: a number "
          "from 0 to 1 (e.g. 0.01; 0: no sweeps), found ")
INVALID += [("name: x\nscan:\n  adaptive: {sweep_cpu: %s}\n" % v,
             "p.yaml:3: scan.adaptive.sweep_cpu: %s %s%s" % (shown, _SWEEP, found))
            for v, shown, found in (("-0.01", "-0.01", "-0.01"), ("2", "2", "2"), ("'1%'", "'1%'", "'1%'"),
                                    ("false", "False", "False"))]
INVALID += [("name: x\nscan:\n  adaptive: {sweep_cpu: 1e999}\n",
             "p.yaml:3: scan.adaptive.sweep_cpu: 1e999 is too large a number")]


def test_min_pass_yield_accepts_shares_from_0_to_1():
    for v in (0, 0.05, 1):
        p = parse_policy("name: x\nscan:\n  adaptive: {min_pass_yield: %s}\n" % v)
        assert p.scan.adaptive.min_pass_yield == v and isinstance(p.scan.adaptive.min_pass_yield, float)
    assert parse_policy("name: x\n").scan.adaptive.min_pass_yield == 0.05
    for v in (0, 0.01, 1):
        assert parse_policy("name: x\nscan:\n  adaptive: {sweep_cpu: %s}\n" % v).scan.adaptive.sweep_cpu == v
    assert parse_policy("name: x\n").scan.adaptive.sweep_cpu == 0


@pytest.mark.parametrize("text,message", INVALID, ids=[m.split(": ", 2)[-1][:40] for _, m in INVALID])
def test_invalid_policy_messages(text, message):
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "p.yaml")
    assert str(e.value) == message


def test_headroom_may_be_negative_and_scaled_base_may_leave_floor_ceiling():
    # Headroom is negative when guests are overcommitted; a reference_memory scales the base.
    p = parse_policy("name: x\nrun:\n  mode: conditional\n  start_when: [{signal: guest_rss_headroom, below: -1073741824}]\n"
                     "scan:\n  sleep_millisecs: {base: 5, floor: 10, reference_memory: 16GiB}\n")
    assert p.run.start_when[0].threshold.value == -1073741824 and p.scan.sleep_millisecs.base == 5


def test_several_problems_are_all_reported():
    with pytest.raises(PolicyError) as e:
        parse_policy("name: x\ninterval: -1\nscan:\n  cpu_budget: 0\n  bogus: 1\n", "p.yaml")
    lines = str(e.value).splitlines()
    assert len(lines) == 3
    assert lines[2] == "p.yaml:5: scan: unknown key 'bogus'; allowed here: adaptive, advisor, boost_when, " \
                       "cpu_budget, pages_to_scan, sleep_millisecs, strategy"


def test_file_errors(tmp_path):
    with pytest.raises(PolicyError, match=r"nope.yaml: no such policy file"):
        load_policy(tmp_path / "nope.yaml")
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"name: \xff\n")
    with pytest.raises(PolicyError, match=r"bin.yaml: not UTF-8 text \(byte 6\)"):
        load_policy(bad)
    with pytest.raises(PolicyError, match=r"no policy named 'fastest'; shipped policies: aggressive, conservative"):
        load_policy("fastest")


def test_shipped_policies_are_valid_and_documented():
    names = shipped_policy_names()
    assert {"ksmtuned", "default", "conservative", "aggressive", "kernel-advisor", "off"} <= set(names)
    for n in names:
        lp = load_policy(n)
        assert lp.policy.name == n
        text = Path(lp.path).read_text()
        assert text.startswith("# %s.yaml: " % n) and "# For: " in text and "Trades: " in text


def test_shipped_schema_matches_the_model():
    shipped = (REPO / "ksmctl/schema/policy.schema.json").read_text()
    assert shipped == json_schema(), "regenerate: ksmctl policy schema > ksmctl/schema/policy.schema.json"
    schema = json.loads(shipped)
    assert schema["additionalProperties"] is False and "name" in schema["required"]


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                         st.text(max_size=12), st.sampled_from(["20%", "2GiB", "10s", "-1", "scan-time", "x%"]))
keys = st.sampled_from(["name", "interval", "run", "scan", "mode", "start_when", "stop_when", "signal", "below",
                        "above", "pages_to_scan", "min", "max", "percent", "at_least", "strategy", "adaptive",
                        "cpu_budget", "bogus", "idle", "on_stop", "background"])
documents = st.recursive(yaml_scalars, lambda ch: st.one_of(st.lists(ch, max_size=4),
                                                             st.dictionaries(keys, ch, max_size=5)), max_leaves=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(documents.map(lambda d: json.dumps(d)), st.text(max_size=200)))
def test_no_input_raises_anything_but_policy_error(text):
    try:
        parse_policy(text, "fuzz.yaml")
    except PolicyError as e:
        assert str(e).startswith("fuzz.yaml")


def test_the_readme_policy_reference_is_a_policy_the_loader_accepts():
    import re
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), re.S)
                if "strategy: adaptive" in b]
    ad = parse_policy(block, "README.md").scan.adaptive
    assert (ad.sweep_cpu, ad.min_pass_yield, ad.target_pass_seconds) == (0.01, 0.05, 4)
