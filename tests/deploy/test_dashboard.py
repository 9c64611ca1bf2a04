"""deploy/monitoring/grafana-dashboard.json: the panels the issue lists, its datasource from a
variable, and every query valid PromQL (promtool).
"""

from __future__ import annotations

from typing import Any

import yaml
from monitoring_support import (
    dashboard,
    dashboard_exprs,
    promtool,
)  # fmt: skip

# --- Grafana dashboard --------------------------------------------------------------------------

# Panel title -> what its queries must read.
PANELS = {
    "Throughput per rank": ["rate(metatrainer_samples_trained_total", "by (run, rank)"],
    "Loss terms": ["metatrainer_loss", "metatrainer_cross_entropy", "metatrainer_meta_penalty"],
    "Data-wait share": ["metatrainer_data_wait_seconds_sum", "metatrainer_step_seconds_sum"],
    "Step time p50 / p99": [
        "histogram_quantile(0.5, sum by (run, le) (rate(metatrainer_step_seconds_bucket",
        "histogram_quantile(0.99, sum by (run, le) (rate(metatrainer_step_seconds_bucket",
    ],
    "Checkpoint seconds": ["metatrainer_checkpoint_seconds_sum", "_count", "_bucket"],
    "Validation accuracy": ["metatrainer_val_accuracy_ratio"],
    "Epoch and worker restarts": ["metatrainer_epoch", "metatrainer_worker_start_time_seconds"],
    "GPU utilisation (Ray)": ["ray_node_gpus_utilization"],
}


def walk(node: Any):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def test_dashboard_has_the_listed_panels():
    panels = {p["title"]: p for p in dashboard()["panels"]}
    assert panels.keys() == PANELS.keys()
    for title, needles in PANELS.items():
        queries = " ".join(t["expr"] for t in panels[title]["targets"])
        for needle in needles:
            assert needle in queries, (title, needle)
    ids = [p["id"] for p in panels.values()]
    assert len(ids) == len(set(ids))


def test_dashboard_takes_its_datasource_from_a_variable():
    d = dashboard()
    (var,) = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
    assert (var["name"], var["query"]) == ("datasource", "prometheus")
    refs = [n["datasource"] for n in walk(d) if isinstance(n.get("datasource"), dict)]
    assert refs and all(r == {"type": "prometheus", "uid": "${datasource}"} for r in refs)
    targets = [t for p in d["panels"] for t in p["targets"]]
    assert all("datasource" in t for t in targets)


def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses each query (Grafana's variables replaced) as a recording rule."""
    values = {"$__rate_interval": "1m", "$run": ".*", "$cluster": ".*"}
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        for var, value in values.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = promtool("check", "rules", path)
    assert done.returncode == 0, done.stdout + done.stderr
