"""deploy/monitoring/: every PromQL expression of the alert rules and the dashboard names only
metrics the code, Ray or the KubeRay operator export (and that check is checked itself), and the
kustomization builds valid objects (the dashboard as a sidecar ConfigMap, a PodMonitor that
finds the operator however it was installed). The rules: test_alert_rules.py; the dashboard:
test_dashboard.py.

kubectl (.ci/run installs it where missing) builds the kustomization; without it the tests
that need it fail in CI and skip elsewhere (manifest_support.tool).
"""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest
import test_crd_schemas as schemas  # tests/deploy's CRD validation
import yaml
from manifest_support import RAY_NODES, kustomize, selects
from monitoring_support import (
    DASHBOARD_FILE,
    MONITORING,
    SUFFIXES,
    all_rules,
    dashboard,
    dashboard_exprs,
    metric_names,
    unknown_metrics,
    variable_metrics,
)  # fmt: skip

from cluster.metrics import TrainMetrics


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Every series name a training worker serves, from its real registry."""
    families = TrainMetrics("r", 0).registry.collect()
    return {f.name + suffix for f in families for suffix in SUFFIXES[f.type]}


# --- The check that every name exists, checked itself ----------------------------------------


def test_metric_names_are_read_from_promql():
    expr = (
        'sum by (run, le) (rate(metatrainer_step_seconds_bucket{run=~"$run"}[$__rate_interval]))'
        ' / on (run) group_left count(up{job="x"} offset 10m) > bool 0.5e-3'
        " and histogram_quantile(0.9, foo:bar_total) unless time() - nan"
    )
    assert metric_names(expr) == {"metatrainer_step_seconds_bucket", "up", "foo:bar_total"}


def test_a_metric_the_code_does_not_export_is_caught(exported):
    assert "metatrainer_samples_trained_total" in exported
    assert "metatrainer_checkpoint_seconds_bucket" in exported
    assert unknown_metrics("rate(metatrainer_samples_trained_total[5m])", exported) == set()
    # The old instantaneous gauge is gone; a typo, an unsuffixed counter, a foreign metric:
    for name in (
        "metatrainer_samples_per_second",
        "metatrainer_step_second_bucket",
        "metatrainer_samples_trained",
        "node_cpu_seconds_total",
    ):
        assert unknown_metrics(f"max(rate({name}[5m])) by (run)", exported) == {name}
    assert unknown_metrics("ray_node_gpus_utilization", exported) == set()


def test_rules_name_only_exported_metrics(exported):
    for rule in all_rules():
        name = rule.get("alert") or rule["record"]
        assert metric_names(rule["expr"]), name
        assert not unknown_metrics(rule["expr"], exported), name
    # A recorded series is known only because a rule records it:
    assert unknown_metrics("rayjob:kuberay_job_failed:timestamp", exported)


def test_dashboard_names_only_exported_metrics(exported):
    for expr in dashboard_exprs():
        assert not unknown_metrics(expr, exported), expr
    for name in variable_metrics():
        assert name in exported or name.startswith("ray_"), name


# --- The kustomization ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(kubectl) -> list[dict[str, Any]]:
    """A fresh parse of `kubectl kustomize deploy/monitoring`, for this module to change."""
    text, error = kustomize(MONITORING)
    assert not error, error
    return [d for d in yaml.safe_load_all(text) if d]


def test_kustomization_builds_the_monitoring_objects(built):
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in built)
    assert kinds == [
        ("ConfigMap", "metatrainer-grafana-dashboard"),
        ("PodMonitor", "metatrainer-kuberay-operator"),
        ("PodMonitor", "metatrainer-ray"),
        ("PodMonitor", "metatrainer-workers"),
        ("PrometheusRule", "metatrainer"),
    ]


def test_dashboard_configmap_is_found_by_grafanas_sidecar(built):
    (cm,) = [d for d in built if d["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"][DASHBOARD_FILE.name]) == dashboard()
    kubernetes_validate.validate(cm, kubernetes_validate.latest_version(), strict=True)


def test_ray_podmonitor_scrapes_rays_metrics_port_on_every_ray_pod(built):
    (pm,) = [d for d in built if d["metadata"]["name"] == "metatrainer-ray"]
    assert pm["spec"]["selector"] == {
        "matchLabels": {"ray.io/is-ray-node": "yes", "app.kubernetes.io/part-of": "metatrainer"}
    }
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["metrics", "dash-metrics"]


# The KubeRay operator pod's labels, as each of KubeRay v1.7.0's installs sets them: the Helm
# chart (helm-chart/kuberay-operator/templates/deployment.yaml, release "kuberay-operator") and
# kustomize (ray-operator/config/manager/manager.yaml).
OPERATOR_POD_LABELS = {
    "helm": {
        "app.kubernetes.io/name": "kuberay-operator",
        "app.kubernetes.io/instance": "kuberay-operator",
        "app.kubernetes.io/component": "kuberay-operator",
    },
    "kustomize": {
        "app.kubernetes.io/name": "kuberay",
        "app.kubernetes.io/component": "kuberay-operator",
    },
}


@pytest.mark.parametrize("install", OPERATOR_POD_LABELS)
def test_operator_podmonitor_finds_the_operator_however_it_was_installed(built, install):
    (pm,) = [d for d in built if d["metadata"]["name"] == "metatrainer-kuberay-operator"]
    # A PodMonitor selects pods in its own namespace: the operator's (deploy/README.md step 2).
    assert pm["metadata"]["namespace"] == "kuberay-system"
    assert "namespaceSelector" not in pm["spec"]
    assert selects(pm["spec"]["selector"], OPERATOR_POD_LABELS[install])
    # Nor any Ray pod: KubeRay labels those app.kubernetes.io/name: kuberay too.
    for t in RAY_NODES:
        assert not selects(pm["spec"]["selector"], t.labels()), t.source
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    # The operator's container port `http` serves /metrics.
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    # The series' own namespace label (the RayJob's) must survive the scrape, or the rules'
    # namespace="metatrainer" matches none of them.
    assert endpoint["honorLabels"] is True


def crd_validator(kind_plural: str):
    """A strict validator for monitoring.coreos.com/v1 `kind_plural`, from the vendored CRD."""
    (crd,) = schemas.load_yaml_docs(schemas.CRDS / f"monitoring.coreos.com_{kind_plural}.yaml")
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = schemas.strict_schema(version["schema"]["openAPIV3Schema"])
    return schemas.CrdValidator(schema, format_checker=schemas.FORMATS)


@pytest.mark.parametrize("kind", ["PodMonitor", "PrometheusRule"])
def test_objects_are_valid_against_their_crds(built, kind):
    validator = crd_validator(kind.lower() + "s")
    docs = [d for d in built if d["kind"] == kind]
    assert docs
    for doc in docs:
        errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, (doc["metadata"]["name"], errors)


def test_crd_validation_rejects_a_broken_rule(built):
    validator = crd_validator("prometheusrules")
    (doc,) = [d for d in built if d["kind"] == "PrometheusRule"]
    rule = doc["spec"]["groups"][0]["rules"][0]
    rule["for"] = "5 minutes"
    rule["expresion"] = rule.pop("expr")
    errors = " ".join(e.message for e in validator.iter_errors(doc))
    assert "does not match" in errors and "'expresion' was unexpected" in errors, errors
