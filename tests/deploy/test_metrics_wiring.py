"""deploy/: the metrics wiring: each worker serves one metrics port per GPU, and the PodMonitor
selects exactly the worker pods and scrapes every one of those ports.

    pytest tests/deploy -q
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from manifest_support import (
    METRICS_BASE_PORT,
    TEMPLATES,
    WORKERS,
    gpus_per_pod,
    template_id,
    the_doc,
)

APP_LABEL = {"app.kubernetes.io/part-of": "metatrainer"}
IANA_SVC_NAME = re.compile(r"^(?=.{1,15}$)(?=.*[a-z])[a-z0-9]+(-[a-z0-9]+)*$")


@pytest.mark.parametrize("t", TEMPLATES, ids=template_id)
def test_port_names_are_valid(t):
    for c in t.containers():
        for port in c.get("ports", []):
            assert "name" not in port or IANA_SVC_NAME.match(port["name"]), port


@pytest.mark.parametrize("t", WORKERS, ids=template_id)
def test_worker_serves_one_metrics_port_per_gpu(t):
    ports = {p["name"]: p["containerPort"] for p in t.ray_container.get("ports", [])}
    metrics = {name: port for name, port in ports.items() if name.startswith("metrics-")}
    n = gpus_per_pod(t.template)
    assert n >= 1
    assert metrics == {f"metrics-{i}": METRICS_BASE_PORT + i for i in range(n)}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels AND every matchExpression)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def test_podmonitor_selects_exactly_the_worker_pods():
    selector = the_doc("PodMonitor")["spec"]["selector"]
    assert selector.get("matchLabels", {}).get("ray.io/node-type") == "worker"
    assert APP_LABEL.items() <= selector["matchLabels"].items()
    for t in TEMPLATES:
        assert selects(selector, t.labels()) == (t.role == "worker"), template_id(t)


def test_podmonitor_scrapes_every_metrics_port_of_the_workers():
    endpoints = the_doc("PodMonitor")["spec"]["podMetricsEndpoints"]
    names = [e["port"] for e in endpoints]
    assert len(names) == len(set(names)), names
    for t in WORKERS:
        ports = {p["name"] for p in t.ray_container["ports"] if p["name"].startswith("metrics-")}
        assert set(names) == ports, template_id(t)
    for e in endpoints:
        assert (e["path"], e["interval"]) == ("/metrics", "15s")
