"""deploy/monitoring/: the alert rules pass their `promtool` unit tests (and those tests catch the
rule mistakes that would page for a finished run or stay silent for a dead one), the Grafana
dashboard is valid and shows what the issue lists, every PromQL expression names only metrics
the code, Ray or the KubeRay operator export, and the kustomization builds valid objects (the
dashboard as a sidecar ConfigMap, a PodMonitor that finds the operator however it was installed).

    pytest tests/deploy/test_monitoring.py -q

promtool comes with Debian's `prometheus` package (.ci/run installs it); without it, or without
kubectl, the tests that run them fail in CI and skip elsewhere (manifest_support.tool).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import test_crd_schemas as schemas  # tests/deploy's CRD validation
import yaml
from manifest_support import NAMESPACE, RAY_NODES, kustomize, selects, tool

from cluster.metrics import TrainMetrics

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


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Every series name a training worker serves, from its real registry."""
    families = TrainMetrics("r", 0).registry.collect()
    return {f.name + suffix for f in families for suffix in SUFFIXES[f.type]}


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


# --- Alert rules ---------------------------------------------------------------------------------

ALERTS = {
    "MetatrainerTrainingStalled",
    "MetatrainerThroughputDropped",
    "MetatrainerDataWaitHigh",
    "MetatrainerCheckpointSlow",
    "MetatrainerCheckpointMissing",
    "MetatrainerWorkerRestarted",
    "MetatrainerWorkersRestartingRepeatedly",
    "MetatrainerRunErrored",
    "MetatrainerWorkersNotStarting",
    "MetatrainerRayJobFailed",
    "MetatrainerWorkersGone",
}
# What MetatrainerWorkersGone compares: when each run's workers, and each RayJob's completion,
# were last seen.
RECORDS = {
    "rayjob_run:metatrainer_workers_seen:timestamp",
    "rayjob:kuberay_job_complete:timestamp",
}


def test_rules_are_the_documented_alerts_each_with_severity_and_text():
    rules = alert_rules()
    assert {r["alert"] for r in rules} == ALERTS
    assert recorded_names() == RECORDS
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert {"summary", "description"} <= r["annotations"].keys(), r["alert"]


@pytest.fixture
def rules_dir(tmp_path) -> Path:
    """The PrometheusRule's spec as a plain rules file, beside a copy of the unit tests."""
    (tmp_path / "metatrainer-rules.yaml").write_text(yaml.safe_dump(rule_groups()))
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    return tmp_path


def promtool(*args: str | Path) -> subprocess.CompletedProcess:
    command = [tool("promtool"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_promtool_checks_the_rules(rules_dir):
    done = promtool("check", "rules", rules_dir / "metatrainer-rules.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERTS) + len(RECORDS)} rules found" in done.stdout


def test_promtool_unit_tests_pass(rules_dir):
    done = promtool("test", "rules", rules_dir / RULES_TEST.name)
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULES_TEST.read_text()))
    assert tested == ALERTS  # every alert has a unit test


def promtool_test_with(rules_dir: Path, alert: str, change) -> str:
    """`promtool test rules` with `alert`'s expression changed by `change`; its output, after
    checking that the unit tests failed."""
    spec = rule_groups()
    (rule,) = [r for g in spec["groups"] for r in g["rules"] if r.get("alert") == alert]
    changed = change(rule["expr"])
    assert changed != rule["expr"], "the change must change the rule"
    rule["expr"] = changed
    (rules_dir / "metatrainer-rules.yaml").write_text(yaml.safe_dump(spec))
    done = promtool("test", "rules", rules_dir / RULES_TEST.name)
    assert done.returncode != 0, done.stdout
    return done.stdout + done.stderr


def test_promtool_unit_tests_catch_a_broken_rule(rules_dir):
    """A stalled-training alert that forgets "the workers are up" fires for a finished run."""
    out = promtool_test_with(
        rules_dir, "MetatrainerTrainingStalled", lambda e: re.split(r"\s+and on ", e)[0]
    )
    assert 'run="done"' in out, out


def test_a_run_in_its_final_evaluation_does_not_page(rules_dir):
    """Without its evaluation clause, the stalled alert pages for a run scoring its test split."""
    out = promtool_test_with(
        rules_dir, "MetatrainerTrainingStalled", lambda e: re.split(r"\s+unless on ", e)[0]
    )
    assert 'run="final"' in out, out


def test_a_run_whose_workers_vanished_pages_at_60_minutes(rules_dir):
    """The gap of every worker-based alert: with the workers' series gone, only
    MetatrainerWorkersGone fires; stripped of its "gone" test it never does."""
    out = promtool_test_with(
        rules_dir, "MetatrainerWorkersGone", lambda e: e.replace("unless", "and", 1)
    )
    assert "alertname: MetatrainerWorkersGone, time: 1h," in out, out
    assert 'run="lost"' in out, out


@pytest.mark.parametrize(
    "forget",
    [
        # Without "unless its RayJob completed": pages after every finished run.
        lambda e: re.split(r"\s+unless on \(namespace, rayjob, run\)", e)[0],
        # "Its RayJob was Complete at some time in 6 h", not "after its workers were last seen":
        # silent for the next run of a RayJob that once completed.
        lambda e: e.replace(
            "max_over_time(rayjob_run:metatrainer_workers_seen:timestamp[6h])\n  <=",
            "0 * max_over_time(rayjob_run:metatrainer_workers_seen:timestamp[6h])\n  <=",
        ),
    ],
    ids=["pages-after-a-finished-run", "silent-after-a-rayjob-reused"],
)
def test_workers_gone_is_quiet_exactly_for_runs_whose_rayjob_completed(rules_dir, forget):
    out = promtool_test_with(rules_dir, "MetatrainerWorkersGone", forget)
    assert "alertname: MetatrainerWorkersGone" in out, out


def test_an_errored_run_seen_by_one_scrape_pages(rules_dir):
    """ERRORED is there for one scrape before the controller exits: an alert on the state now
    would miss it."""
    out = promtool_test_with(
        rules_dir,
        "MetatrainerRunErrored",
        lambda e: re.sub(r"max_over_time\((.*)\[30m\]\)", r"\1", e),
    )
    assert 'run="crashed"' in out, out


def test_rayjob_alert_watches_the_namespace_of_deploy_base():
    (rule,) = [r for r in alert_rules() if r["alert"] == "MetatrainerRayJobFailed"]
    assert f'namespace="{NAMESPACE}"' in rule["expr"]
    assert yaml.safe_load(RULES_FILE.read_text())["metadata"]["namespace"] == NAMESPACE


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
