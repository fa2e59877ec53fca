"""Alert and recording rules: promtool's syntax check and its unit tests, which fire each
alert on a synthetic series (prometheus/ksmctl-rules.test.yml)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from .support import need_tool

RULES = Path(__file__).resolve().parent.parent / "prometheus"
ALERTS = {"KsmdCpuOverBudget", "KsmOffUnderMemoryPressure", "KsmGeneralProfitNegative", "KsmctlDown",
          "KsmctlTicksStale", "KsmctlErrorsRising"}


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
