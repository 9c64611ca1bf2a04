"""deploy/: the metrics wiring: every Ray container serves Ray's own metrics on 8080 (named
`metrics`), each training worker pod one port per GPU for ours (metrics-0, ...), and
deploy/monitoring's PodMonitor for the training metrics selects exactly the Ray workers and
scrapes every one of those ports.

    pytest tests/deploy -q
"""

from __future__ import annotations

import re

import pytest
from manifest_support import (
    APP_LABEL,
    BUILDS,
    DOCS,
    METRICS_BASE_PORT,
    RAY_METRICS_PORT,
    RAY_NODES,
    TEMPLATES,
    TRAIN_WORKERS,
    built,
    gpus_per_pod,
    needs_kubectl,
    ray_cluster_specs,
    selects,
    template_id,
)

IANA_SVC_NAME = re.compile(r"^(?=.{1,15}$)(?=.*[a-z])[a-z0-9]+(-[a-z0-9]+)*$")


def ports_of(t) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in t.ray_container.get("ports", [])}


@needs_kubectl
@pytest.mark.parametrize("t", built(TEMPLATES), ids=template_id)
def test_port_names_are_valid(t):
    for c in t.containers():
        for port in c.get("ports", []):
            assert "name" not in port or IANA_SVC_NAME.match(port["name"]), port


@needs_kubectl
@pytest.mark.parametrize("t", built(RAY_NODES), ids=template_id)
def test_every_ray_container_serves_ray_metrics_on_8080(t):
    assert ports_of(t).get("metrics") == RAY_METRICS_PORT


@needs_kubectl
def test_ray_exports_its_metrics_on_the_declared_port():
    for _, doc in DOCS:
        for spec in ray_cluster_specs(doc):
            groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
            for group in groups:
                assert group["rayStartParams"]["metrics-export-port"] == str(RAY_METRICS_PORT)


@needs_kubectl
@pytest.mark.parametrize("t", built(TRAIN_WORKERS), ids=template_id)
def test_train_workers_declare_one_metrics_port_per_gpu(t):
    """A CPU pod runs one training worker (tests/deploy/test_training_job.py), so one port."""
    metrics = {name: port for name, port in ports_of(t).items() if name.startswith("metrics-")}
    n = max(gpus_per_pod(t.template), 1)
    assert metrics == {f"metrics-{i}": METRICS_BASE_PORT + i for i in range(n)}


def worker_podmonitor() -> dict:
    """deploy/monitoring's PodMonitor for our training metrics (the one scraping metrics-*)."""
    (monitor,) = [
        doc
        for doc in BUILDS["monitoring"]
        if doc["kind"] == "PodMonitor"
        and any(e["port"].startswith("metrics-") for e in doc["spec"]["podMetricsEndpoints"])
    ]
    return monitor


@needs_kubectl
def test_podmonitor_selects_exactly_the_worker_pods():
    selector = worker_podmonitor()["spec"]["selector"]
    assert APP_LABEL.items() <= selector["matchLabels"].items()
    for t in TEMPLATES:
        assert selects(selector, t.labels()) == (t.role == "worker"), template_id(t)


@needs_kubectl
def test_podmonitor_scrapes_every_metrics_port_of_the_train_workers():
    endpoints = worker_podmonitor()["spec"]["podMetricsEndpoints"]
    names = [e["port"] for e in endpoints]
    assert len(names) == len(set(names)), names
    assert TRAIN_WORKERS
    for t in TRAIN_WORKERS:
        ports = {name for name in ports_of(t) if name.startswith("metrics-")}
        assert set(names) == ports, template_id(t)
    for e in endpoints:
        assert (e["path"], e["interval"]) == ("/metrics", "15s")
