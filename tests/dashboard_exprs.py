"""Reads the PromQL out of the Grafana dashboard and the rules file, with Grafana's
variables substituted as a fully-selected dashboard would send them. Shared by the
structural dashboard test and the end-to-end Prometheus test."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Tuple

import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "ksmctl-dashboard.json"
RULES = ROOT / "prometheus" / "ksmctl-rules.yml"
BUILTINS = {"__rate_interval", "__interval", "__range", "__field"}
# What Grafana sends with every variable at "All" (allValue .*) and the default Top N.
SUBSTITUTE = {"job": ".*", "instance": ".*", "vm": ".*", "topn": "10", "__rate_interval": "30s", "__interval": "15s",
              "__range": "5m"}
VAR_RE = re.compile(r"\$\{?(\w+)")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def substitute(expr: str, values: Dict[str, str] = SUBSTITUTE) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], expr)


def dashboard_exprs() -> List[Tuple[str, str]]:
    """(where, expr) for every panel target and annotation query (raw, unsubstituted)."""
    d = dashboard()
    out = []
    for p in d["panels"]:
        for t in p.get("targets", []):
            out.append(("panel %r %s" % (p["title"], t["refId"]), t["expr"]))
    for a in d["annotations"]["list"]:
        if "expr" in a:
            out.append(("annotation %r" % a["name"], a["expr"]))
    return out


def rule_exprs() -> List[Tuple[str, str, bool]]:
    """(name, expr, is_alert) for every rule."""
    out = []
    for g in yaml.safe_load(RULES.read_text())["groups"]:
        for r in g["rules"]:
            out.append((r.get("alert") or r["record"], r["expr"].strip(), "alert" in r))
    return out


_CMP = re.compile(r"(==|!=|>=|<=|>|<)(\s*bool\b)?|\b(and|or|unless)\b")
_MOD = re.compile(r"\s*(?:on|ignoring)\s*\([^)]*\)(?:\s*(?:group_left|group_right)(?:\s*\([^)]*\))?)?", re.S)


def operands(expr: str) -> List[str]:
    """Split an expression at its top-level comparison and set operators: an alert's
    condition `signal > threshold` gives `signal` and `threshold`, so each can be required
    to return data on a healthy host where the condition itself is (rightly) empty."""
    parts, depth, start, i = [], 0, 0, 0
    in_str = None
    while i < len(expr):
        c = expr[i]
        if in_str:
            if c == in_str:
                in_str = None
        elif c in "\"'":
            in_str = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            m = _CMP.match(expr, i)
            if m and not (m.group(1) and expr[i - 1:i] in "=!<>"):
                parts.append(expr[start:i])
                i = m.end()
                mod = _MOD.match(expr, i)
                if mod:
                    i = mod.end()
                start = i
                continue
        i += 1
    parts.append(expr[start:])
    out: List[str] = []
    for p in parts:
        p = p.strip()
        while p.startswith("(") and p.endswith(")") and _balanced(p[1:-1]):
            p = p[1:-1].strip()
        if not p or re.fullmatch(r"[-+0-9.e]+", p):
            continue
        if len(parts) > 1 or p != expr.strip():
            out.extend(operands(p))  # a parenthesised condition inside: split it too
        else:
            out.append(p)
    return out


def _balanced(s: str) -> bool:
    depth = 0
    for c in s:
        depth += c == "("
        depth -= c == ")"
        if depth < 0:
            return False
    return depth == 0
