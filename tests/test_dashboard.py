"""The Grafana dashboard, checked structurally (Grafana cannot run here): every panel has
queries and uses the $datasource variable, every variable it references exists, no
datasource UID is hard-coded, and every query is valid PromQL (promtool parses them)."""
from __future__ import annotations

import subprocess

import yaml

from .dashboard_exprs import (BUILTINS, DASHBOARD, ROOT, SUBSTITUTE, VAR_RE, dashboard, dashboard_exprs, operands,
                              rule_exprs, substitute)
from .support import need_tool

DS_VAR = "${datasource}"


def _vars(d):
    return [v["name"] for v in d["templating"]["list"]]


def test_datasource_is_a_variable_and_no_uid_is_hard_coded():
    d = dashboard()
    ds = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
    assert len(ds) == 1 and ds[0]["name"] == "datasource" and ds[0]["query"] == "prometheus"
    assert "__inputs" not in d
    text = DASHBOARD.read_text()
    uids = set(__import__("re").findall(r'"uid":\s*"([^"]*)"', text))
    assert uids <= {DS_VAR, "-- Grafana --", d["uid"]}, uids


def test_every_panel_has_targets_on_the_datasource_variable():
    d = dashboard()
    ids = set()
    for p in d["panels"]:
        assert p["id"] not in ids
        ids.add(p["id"])
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": DS_VAR}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == DS_VAR, (p["title"], t)
    for a in d["annotations"]["list"]:
        if not a.get("builtIn"):
            assert a["datasource"]["uid"] == DS_VAR and a["expr"]


def test_panels_do_not_overlap():
    cells = {}
    for p in dashboard()["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, "%s overlaps %s" % (p["title"], cells[(x, y)])
                cells[(x, y)] = p["title"]


def test_every_variable_resolves():
    d = dashboard()
    names = _vars(d)
    defined = set()
    for v in d["templating"]["list"]:  # a variable may only use variables defined before it
        q = v["query"]["query"] if isinstance(v.get("query"), dict) else str(v.get("query", ""))
        for ref in VAR_RE.findall(q):
            assert ref in defined or ref in BUILTINS, "variable %s uses undefined $%s" % (v["name"], ref)
        defined.add(v["name"])
    text = DASHBOARD.read_text()
    for ref in set(VAR_RE.findall(text)):
        assert ref in names or ref in BUILTINS, "undefined variable $%s" % ref
    for where, expr in dashboard_exprs():
        for ref in VAR_RE.findall(expr):
            assert ref in SUBSTITUTE, (where, ref)


def test_operands_splits_conditions():
    assert operands("a > 1") == ["a"]
    assert operands('x{k=">"} > on(instance) (b or on(i) c)') == ['x{k=">"}', "b", "c"]
    assert operands("sum(ksm_run == bool 1)") == ["sum(ksm_run == bool 1)"]
    assert operands("a != 1 and on(instance, job) (b / c < 0.1 or d > 0.1)") == ["a", "b / c", "d"]


def test_every_query_is_valid_promql(tmp_path):
    """promtool parses rule expressions: wrap each substituted dashboard query in one."""
    rules = [{"record": "ksmctl_dashboard_check:q%d" % i, "expr": substitute(e)}
             for i, (_, e) in enumerate(dashboard_exprs())]
    path = tmp_path / "dash-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([need_tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert rule_exprs()  # the rules file itself is checked by tests/test_rules.py


def test_provisioning_files():
    ds = yaml.safe_load((ROOT / "grafana/provisioning/datasources/ksmctl.yaml").read_text())
    assert ds["apiVersion"] == 1 and ds["datasources"][0]["type"] == "prometheus"
    db = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/ksmctl.yaml").read_text())
    assert db["apiVersion"] == 1 and db["providers"][0]["type"] == "file" and db["providers"][0]["options"]["path"]


def _panels():
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def test_a_job_variable_selects_every_host_query():
    """Hosts are picked by job and instance: two Prometheus jobs scraping ksmctl (say
    staging and production) never mix on one panel."""
    d = dashboard()
    names = _vars(d)
    assert names.index("job") < names.index("instance"), names
    inst = [v for v in d["templating"]["list"] if v["name"] == "instance"][0]
    assert '$job' in inst["query"]["query"]
    for where, expr in dashboard_exprs():
        assert 'job=~"$job"' in expr, (where, expr)


_COUNTER = __import__("re").compile(r"\b(\w+_(?:total|bucket))\b")
_RATES = {"rate", "irate", "increase"}


def _enclosing_function(expr: str, pos: int) -> str:
    """The name of the innermost call whose parentheses contain position pos."""
    depth = 0
    for i in range(pos - 1, -1, -1):
        c = expr[i]
        if c == ")":
            depth += 1
        elif c == "(":
            if depth == 0:
                m = __import__("re").search(r"(\w+)\s*$", expr[:i])
                return m.group(1) if m else ""
            depth -= 1
    return ""


def test_no_counter_is_shown_without_a_rate():
    for where, expr in dashboard_exprs():
        for m in _COUNTER.finditer(expr):
            assert _enclosing_function(expr, m.start()) in _RATES, "%s: counter %s without rate()" % (where, m.group(1))


def test_the_counter_check_can_fail():
    e = "ksm_memory_saved_bytes / clamp_min(ksm_ksmd_cpu_seconds_total, 1)"
    assert _enclosing_function(e, e.index("ksm_ksmd")) == "clamp_min"
    e = "histogram_quantile(0.95, sum by (le) (rate(x_bucket[5m])))"
    assert _enclosing_function(e, e.index("x_bucket")) == "rate"


def expected_units(expr: str):
    """The units a query's values can honestly be shown in, from its metric names."""
    re_ = __import__("re")
    if "_bytes" in expr:
        return {"bytes"}                      # sizes, and sizes per CPU-second
    if "histogram_quantile" in expr and "_seconds_bucket" in expr:
        return {"s"}
    if re_.search(r"rate\(\w+_seconds_total", expr):
        return {"percentunit"}                # CPU-seconds per second: a share of a core
    if "_ratio" in expr:
        return {"percentunit"}
    if re_.search(r"\b(rate|irate|increase)\(", expr):
        return {"ops", "short"}               # events, decisions, pages per second
    if re_.search(r"_seconds\b", expr):
        return {"s"}
    if "_info" in expr:
        return {"short", "none", "string"}
    if "ksmctl_vm_excluded" in expr:
        return {"bool_yes_no"}
    return {"short", "none"}                  # counts, states, pages


def _unit(panel, ref):
    unit = panel["fieldConfig"]["defaults"].get("unit")
    for o in panel["fieldConfig"].get("overrides", []):
        if o["matcher"] == {"id": "byFrameRefID", "options": ref}:
            for prop in o["properties"]:
                if prop["id"] == "unit":
                    unit = prop["value"]
    return unit


def test_every_query_is_shown_in_its_unit():
    for p in _panels():
        for o in p["fieldConfig"].get("overrides", []):
            assert o["matcher"]["id"] != "byRegexp" or not any(pr["id"] == "unit" for pr in o["properties"]), \
                "%s: set units by refId (byFrameRefID), a display-name regex cannot be checked" % p["title"]
        for t in p["targets"]:
            unit = _unit(p, t["refId"])
            assert unit in expected_units(t["expr"]), (p["title"], t["refId"], t["expr"], unit)


def test_the_unit_check_can_fail():
    assert "bytes" not in expected_units('ksmctl_memory_pressure_ratio{kind="some"}')
    assert "s" not in expected_units("sum by (source) (rate(ksmctl_errors_total[5m]))")


def test_every_panel_says_what_it_shows():
    for p in _panels():
        assert len(p.get("description", "")) > 20, p["title"]


def test_estimator_panels_say_why_they_are_empty():
    """No data there usually means the periodic estimate is off: the panel says so."""
    for p in _panels():
        if any("estimate" in t["expr"] or "merge_potential" in t["expr"] for t in p["targets"]):
            assert "estimate.enabled" in p["fieldConfig"]["defaults"].get("noValue", ""), p["title"]


def test_merge_control_panels_say_why_they_are_empty():
    for p in _panels():
        if any("merge_violation" in t["expr"] or "guests_merge" in t["expr"] for t in p["targets"]):
            assert "vms section" in p["fieldConfig"]["defaults"].get("noValue", ""), p["title"]
