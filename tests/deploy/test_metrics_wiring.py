"""deploy/: the metrics wiring: every Ray container serves Ray's own metrics on 8080 (named
`metrics`), each head its dashboard's on 44227 (`dash-metrics`), each training worker pod one
port per GPU for ours (metrics-0, ...); deploy/monitoring's PodMonitor for the training metrics
selects exactly the Ray workers and scrapes every one of those ports, the Ray one scrapes the
heads' dashboard metrics, and the series keep what the run alerts join on.

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

DASHBOARD_METRICS_PORT = 44227  # Ray dashboard metrics: ray.dashboard.consts.DASHBOARD_METRIC_PORT
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


def ray_podmonitor() -> dict:
    """deploy/monitoring's PodMonitor for Ray's own metrics (the one scraping `metrics`)."""
    (monitor,) = [
        doc
        for doc in BUILDS["monitoring"]
        if doc["kind"] == "PodMonitor"
        and "metrics" in [e["port"] for e in doc["spec"]["podMetricsEndpoints"]]
    ]
    return monitor


def keeps(endpoint: dict, t) -> bool:
    """Whether the endpoint's `keep` relabelings keep a target of the pod that KubeRay creates
    from `t` (Prometheus sees pod label ray.io/node-type as
    __meta_kubernetes_pod_label_ray_io_node_type)."""
    meta = {
        "__meta_kubernetes_pod_label_" + re.sub(r"\W", "_", k): v for k, v in t.labels().items()
    }
    for r in endpoint.get("relabelings", []):
        if r.get("action", "replace") == "keep":
            value = r.get("separator", ";").join(meta.get(n, "") for n in r["sourceLabels"])
            if not re.fullmatch(r.get("regex", "(.*)"), value):
                return False
    return True


@needs_kubectl
@pytest.mark.parametrize("t", built(RAY_NODES), ids=template_id)
def test_heads_dashboard_metrics_are_scraped_on_the_head_only(t):
    """Ray's dashboard runs on the head and serves its metrics on `dash-metrics`, as in KubeRay's
    own config/prometheus/podMonitor.yaml; the Ray PodMonitor scrapes that port there."""
    monitor = ray_podmonitor()
    assert selects(monitor["spec"]["selector"], t.labels())
    (endpoint,) = [e for e in monitor["spec"]["podMetricsEndpoints"] if e["port"] == "dash-metrics"]
    if t.role == "head":
        assert ports_of(t).get("dash-metrics") == DASHBOARD_METRICS_PORT
    assert keeps(endpoint, t) == (t.role == "head")
    assert (endpoint["path"], endpoint["interval"]) == ("/metrics", "15s")


@needs_kubectl
def test_worker_series_name_the_rayjob_that_ran_them():
    """MetatrainerWorkersGone finds a run's RayJob from its workers' ray_io_cluster: KubeRay
    names a RayJob's cluster <RayJob name>-<5 random characters> (utils.GenerateRayClusterName)."""
    assert "ray.io/cluster" in worker_podmonitor()["spec"]["podTargetLabels"]
    (rules,) = [doc for doc in BUILDS["monitoring"] if doc["kind"] == "PrometheusRule"]
    (seen,) = [
        r
        for g in rules["spec"]["groups"]
        for r in g["rules"]
        if r.get("record") == "rayjob_run:metatrainer_workers_seen:timestamp"
    ]
    regex = re.search(r'"rayjob", "\$1", "ray_io_cluster", "([^"]+)"', seen["expr"]).group(1)
    rayjobs = {t.cluster for t in TRAIN_WORKERS}
    assert rayjobs
    for name in rayjobs:
        assert re.fullmatch(regex, f"{name}-x7k2p").group(1) == name
