"""What the deploy/monitoring tests share: where the files are, the metric names a PromQL
expression selects, and the rules and the dashboard as data."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from manifest_support import tool

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
RULES_FILE = MONITORING / "prometheusrule.yaml"
RULES_TEST = MONITORING / "rules-test.yaml"
DASHBOARD_FILE = MONITORING / "grafana-dashboard.json"

# The series Prometheus stores for each kind of prometheus_client metric.
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
PROMQL_WORDS = {"and", "or", "unless", "offset", "bool", "group_left", "group_right", "inf", "nan"}
LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
IDENTIFIER = re.compile(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not its functions, labels or keywords)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: label values, count_values' label
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # range and subquery durations
    e = LABEL_LIST.sub("", e)  # by (run, le), on (run), ...
    names = set()
    for m in IDENTIFIER.finditer(e):
        if e[m.end() :].lstrip().startswith("(") or m.group().lower() in PROMQL_WORDS:
            continue  # a function or aggregation, or a keyword
        names.add(m.group())
    return names


# The KubeRay operator's series the rules read (KubeRay v1.7.0,
# ray-operator/controllers/ray/metrics/ray_job_metrics.go; podmonitor-kuberay.yaml scrapes them).
KUBERAY_METRICS = {"kuberay_job_deployment_status"}


def unknown_metrics(expr: str, exported: set[str]) -> set[str]:
    """Names neither ours, nor Ray's own (ray_*, scraped by podmonitor-ray.yaml), nor the
    operator's, nor recorded by the rules themselves."""
    known = exported | KUBERAY_METRICS | recorded_names()
    return {n for n in metric_names(expr) if n not in known and not n.startswith("ray_")}


def rule_groups() -> dict[str, Any]:
    return yaml.safe_load(RULES_FILE.read_text())["spec"]


def all_rules() -> list[dict[str, Any]]:
    return [r for g in rule_groups()["groups"] for r in g["rules"]]


def alert_rules() -> list[dict[str, Any]]:
    return [r for r in all_rules() if "alert" in r]


def recorded_names() -> set[str]:
    return {r["record"] for r in all_rules() if "record" in r}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def variable_metrics() -> list[str]:
    """The metric each query variable's label_values(METRIC, label) reads."""
    names = []
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            names.append(re.fullmatch(r"label_values\((\w+),\s*\w+\)", query).group(1))
    return names


def promtool(*args: str | Path) -> subprocess.CompletedProcess:
    """Debian's promtool (fails under CI=true, skips elsewhere, when missing)."""
    command = [tool("promtool"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)
