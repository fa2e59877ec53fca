"""Alert and recording rules: promtool's syntax check and its unit tests, which fire each
alert on a synthetic series and show it quiet on another (prometheus/ksmctl-rules.test.yml),
and every alert's runbook in docs/runbooks.md."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from .support import need_tool

RULES = Path(__file__).resolve().parent.parent / "prometheus"
ALERTS = {"KsmdCpuOverBudget", "KsmOffUnderMemoryPressure", "KsmGeneralProfitNegative", "KsmctlDown",
          "KsmctlTicksStale", "KsmctlErrorsRising", "KsmctlFightingAnotherWriter", "KsmctlWriteRefused",
          "KsmctlMergeViolation"}
RUNBOOKS = RULES.parent / "docs" / "runbooks.md"
RUNBOOK_PREFIX = "file:///usr/share/doc/ksmctl/runbooks.md#"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([need_tool("promtool"), *args], cwd=RULES, capture_output=True, text=True, timeout=120)


def test_promtool_check_rules():
    r = _promtool("check", "rules", "ksmctl-rules.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_test_rules():
    r = _promtool("test", "rules", "ksmctl-rules.test.yml")
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_every_alert_is_unit_tested_firing():
    rules = yaml.safe_load((RULES / "ksmctl-rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == ALERTS
    tests = yaml.safe_load((RULES / "ksmctl-rules.test.yml").read_text())
    fired = {t["alertname"] for case in tests["tests"] for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert fired == alerts


def _rules():
    return [r for g in yaml.safe_load((RULES / "ksmctl-rules.yml").read_text())["groups"] for r in g["rules"]]


def _minutes(text: str) -> float:
    m = re.fullmatch(r"(\d+)([smh])", text)
    assert m, text
    return int(m.group(1)) * {"s": 1 / 60, "m": 1, "h": 60}[m.group(2)]


IDENTITY = ("instance", "knob", "source")  # the labels alerts are grouped by


def _identities(series):
    out = set()
    for s in series:
        labels = dict(re.findall(r'(\w+)="([^"]*)"', s["series"]))
        out.add(tuple(labels.get(k) for k in IDENTITY))
    return out


def test_every_alert_is_unit_tested_quiet_after_its_for_duration():
    """Not firing, and meant: at an evaluation past the alert's `for`, some instance whose
    series are in the test (an instance, or a knob or error source of one) is absent from
    the expected alerts: a healthy host, a dry run, a policy that keeps KSM off by choice,
    a knob changed once. An early `exp_alerts: []` proves nothing."""
    waits = {r["alert"]: _minutes(r.get("for", "0m")) for r in _rules() if "alert" in r}
    tests = yaml.safe_load((RULES / "ksmctl-rules.test.yml").read_text())
    quiet = set()
    for case in tests["tests"]:
        present = _identities(case.get("input_series", []))
        for t in case.get("alert_rule_test", []):
            name = t["alertname"]
            fired = {tuple(a["exp_labels"].get(k) for k in IDENTITY) for a in t.get("exp_alerts") or []}
            if _minutes(t["eval_time"]) > waits[name] and present - fired:
                quiet.add(name)
    assert quiet == ALERTS, "alerts without a quiet case past their for: %s" % sorted(ALERTS - quiet)


def test_every_recording_rule_is_unit_tested():
    records = {r["record"] for r in _rules() if "record" in r}
    tests = yaml.safe_load((RULES / "ksmctl-rules.test.yml").read_text())
    tested = {e["expr"] for case in tests["tests"] for e in case.get("promql_expr_test", [])}
    assert records <= tested, sorted(records - tested)


def _anchor(heading: str) -> str:
    """GitHub's (and Pandoc's gfm) heading anchor: lower case, punctuation dropped, spaces to -."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_has_a_runbook_that_says_what_to_check_and_do():
    text = RUNBOOKS.read_text()
    sections = {}
    for block in re.split(r"(?m)^## ", text)[1:]:
        head, _, body = block.partition("\n")
        sections[_anchor(head)] = body
    for r in _rules():
        if "alert" not in r:
            continue
        url = r["annotations"].get("runbook_url", "")
        assert url.startswith(RUNBOOK_PREFIX), (r["alert"], url)
        anchor = url[len(RUNBOOK_PREFIX):]
        assert anchor == r["alert"].lower() and anchor in sections, (r["alert"], anchor, sorted(sections))
        body = sections[anchor]
        assert "**Check**" in body and "**Do**" in body, "runbook %s needs a Check and a Do part" % anchor
