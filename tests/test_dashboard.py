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
