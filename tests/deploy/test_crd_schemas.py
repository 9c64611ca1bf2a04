"""deploy/: every object that `kubectl kustomize` builds from every kustomization under deploy/
is valid: KubeRay and Prometheus Operator kinds against the real CRD schemas, built-in kinds and
KubeRay's pod templates against Kubernetes' own (kubernetes-validate, strict), and the validation
is strict enough to catch a broken one.

Offline and fast: the CRDs are vendored in tests/deploy/crds/ (see its README), so nothing here
needs a cluster or the network; kubectl only builds.

    pytest tests/deploy -q
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from manifest_support import (
    DOCS,
    OVERLAY_DOCS,
    TEMPLATES,
    built,
    doc_id,
    load_yaml_docs,
    needs_kubectl,
    template_id,
    the_doc,
)

CRDS = Path(__file__).resolve().parent / "crds"
CRD_FILES = (
    "ray.io_rayjobs.yaml",
    "ray.io_rayclusters.yaml",
    "monitoring.coreos.com_podmonitors.yaml",
    "monitoring.coreos.com_servicemonitors.yaml",
    "monitoring.coreos.com_prometheusrules.yaml",
)
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME_LENGTH = {"RayJob": 47, "RayCluster": 53}  # KubeRay's validation, leaves room for suffixes


# --- Validating against a CRD's openAPIV3Schema ---------------------------------------------------


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as the API server enforces it, in JSON Schema terms.

    A field the schema does not know is an error (kubectl's default `--validate=strict`; otherwise
    the server silently drops it, so a typo would pass unnoticed), and `nullable` admits null.
    """
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: strict_schema(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_schema(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = strict_schema(out["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict_schema(s) for s in out[key]]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def _list_type(validator, list_type, instance, schema) -> Iterator[jsonschema.ValidationError]:
    """`x-kubernetes-list-type`: a `map` list has unique keys (env names, container names, ...)."""
    if not validator.is_type(instance, "array") or list_type not in ("map", "set"):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    defaults = {
        k: v.get("default") for k, v in schema.get("items", {}).get("properties", {}).items()
    }
    seen: dict[str, int] = {}
    for i, item in enumerate(instance):
        if list_type == "map" and isinstance(item, dict):
            key = json.dumps({k: item.get(k, defaults.get(k)) for k in keys}, sort_keys=True)
        else:
            key = json.dumps(item, sort_keys=True)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry {key} (items {seen[key]} and {i})")
        seen.setdefault(key, i)


CrdValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type}
)
FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


@pytest.fixture(scope="module")
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> a validator for every served version of every vendored CRD."""
    validators = {}
    for name in CRD_FILES:
        (crd,) = load_yaml_docs(CRDS / name)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served", True):
                schema = strict_schema(version["schema"]["openAPIV3Schema"])
                validators[f"{group}/{version['name']}", kind] = CrdValidator(
                    schema, format_checker=FORMATS
                )
    return validators


def schema_errors(validators, doc: dict[str, Any]) -> list[str]:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in validators:
        return [f"no vendored CRD for {key}; add it to tests/deploy/crds/"]
    errors = sorted(validators[key].iter_errors(doc), key=lambda e: list(map(str, e.path)))
    return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors]


def is_custom_resource(doc: dict[str, Any]) -> bool:
    """Not a built-in kind: an API group with a dot that is not Kubernetes' own (*.k8s.io)."""
    group = doc.get("apiVersion", "").rpartition("/")[0]
    return "." in group and not group.endswith(".k8s.io")


@needs_kubectl
@pytest.mark.parametrize("item", built(DOCS), ids=doc_id)
def test_built_object_is_valid(item, crd_validators):
    _, doc = item
    if is_custom_resource(doc):
        errors = schema_errors(crd_validators, doc)
        assert not errors, "\n".join(errors)
    else:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


@needs_kubectl
def test_overlays_ship_the_expected_objects():
    """Each overlay is a whole deployment: namespace, identity, network policy, the two jobs."""
    kinds: dict[str, set[str]] = {}
    for build, doc in OVERLAY_DOCS:
        kinds.setdefault(build, set()).add(doc["kind"])
    assert set(kinds) == {"overlays/gpu", "overlays/cpu-small", "overlays/minio"}
    core = {"Namespace", "ServiceAccount", "ConfigMap", "NetworkPolicy", "RayJob"}
    assert kinds["overlays/gpu"] == kinds["overlays/cpu-small"] == core
    assert kinds["overlays/minio"] == core | {"Service", "StatefulSet", "Job"}


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node = doc
        for p in parents:
            node = node[p]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


_DELETE = object()
_WORKER = "spec.rayClusterSpec.workerGroupSpecs.0"
_WORKER_CONTAINER = f"{_WORKER}.template.spec.containers.0"
BROKEN = {
    "replicas is a string": ("RayJob", _set(f"{_WORKER}.replicas", "two"), "is not of type"),
    "groupName missing": ("RayJob", _set(f"{_WORKER}.groupName", _DELETE), "is a required"),
    "misspelt field": ("RayJob", _set("spec.shutdownAfterJobFinish", True), "was unexpected"),
    "misspelt container field": (
        "RayJob",
        _set(f"{_WORKER_CONTAINER}.securityContxt", {}),
        "was unexpected",
    ),
    "duplicate env name": (
        "RayJob",
        _set(f"{_WORKER_CONTAINER}.env", [{"name": "A", "value": "1"}, {"name": "A"}]),
        "duplicate entry",
    ),
    "int32 overflow": ("RayJob", _set("spec.ttlSecondsAfterFinished", 2**31), "int32"),
    "bad quantity": (
        "RayJob",
        _set(f"{_WORKER_CONTAINER}.resources.limits.memory", "lots"),
        "does not match",
    ),
    "head group missing": (
        "RayJob",
        _set("spec.rayClusterSpec.headGroupSpec", _DELETE),
        "is a required",
    ),
    "bad auth mode": ("RayJob", _set("spec.rayClusterSpec.authOptions.mode", "on"), "is not one"),
    "bad scrape interval": (
        "PodMonitor",
        _set("spec.podMetricsEndpoints.0.interval", "15 seconds"),
        "does not match",
    ),
    "bad scheme": ("PodMonitor", _set("spec.podMetricsEndpoints.0.scheme", "tcp"), "is not one of"),
}


KIND_NAMES = {"RayJob": "metatrainer-train", "PodMonitor": "metatrainer-workers"}


@needs_kubectl
@pytest.mark.parametrize("case", BROKEN)
def test_validation_rejects_a_broken_manifest(case, crd_validators):
    kind, mutate, expected = BROKEN[case]
    build = "monitoring" if kind == "PodMonitor" else "overlays/gpu"
    doc = copy.deepcopy(the_doc(build, kind, KIND_NAMES.get(kind)))
    mutate(doc)
    errors = schema_errors(crd_validators, doc)
    assert any(expected in e for e in errors), f"expected {expected!r} among {errors}"


@needs_kubectl
def test_names_are_valid_for_kuberay():
    for _, doc in DOCS:
        if doc["kind"] in MAX_NAME_LENGTH:
            name = doc["metadata"]["name"]
            assert DNS_1035_LABEL.match(name) and len(name) <= MAX_NAME_LENGTH[doc["kind"]], name


@needs_kubectl
@pytest.mark.parametrize("t", built(TEMPLATES), ids=template_id)
def test_pod_template_is_a_valid_kubernetes_pod_template(t):
    pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}}
    pod_template["template"] = t.template
    kubernetes_validate.validate(pod_template, kubernetes_validate.latest_version(), strict=True)
