"""deploy/: the manifests are valid against the real CRD schemas and follow the project's rules.

Offline and fast: the KubeRay and Prometheus Operator CRDs are vendored in tests/deploy/crds/ (see
its README), so nothing here needs a cluster or the network.

    pytest tests/deploy -q
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CRDS = Path(__file__).resolve().parent / "crds"
CRD_FILES = (
    "ray.io_rayjobs.yaml",
    "ray.io_rayclusters.yaml",
    "monitoring.coreos.com_podmonitors.yaml",
)

RUN_AS_USER = 1000  # the image's USER; it owns HOME
SECRET_NAME = "metatrainer-s3"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
APP_LABEL = {"app.kubernetes.io/part-of": "metatrainer"}
METRICS_BASE_PORT = 9100  # `metatrainer train --metrics-port` default; local rank i serves +i
GPU = "nvidia.com/gpu"
CREDENTIAL_NAME = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY")
# Strings that look like real credentials, whatever field they hide in.
CREDENTIAL_VALUE = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|aws_secret_access_key\s*[=:]\s*\S")
IANA_SVC_NAME = re.compile(r"^(?=.{1,15}$)(?=.*[a-z])[a-z0-9]+(-[a-z0-9]+)*$")
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME_LENGTH = {"RayJob": 47, "RayCluster": 53}  # KubeRay's validation, leaves room for suffixes

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader parses the CRDs 6x faster


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.load_all(f, Loader=_Loader) if doc is not None]


MANIFEST_FILES = sorted(DEPLOY.glob("*.yaml"))
DOCS = [(path.name, doc) for path in MANIFEST_FILES for doc in load_yaml_docs(path)]


def doc_id(item: tuple[str, dict[str, Any]]) -> str:
    name, doc = item
    return f"{name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def the_doc(kind: str) -> dict[str, Any]:
    (doc,) = [doc for _, doc in DOCS if doc["kind"] == kind]
    return doc


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
    return "." in doc.get("apiVersion", "").split("/")[0]


@pytest.mark.parametrize("item", DOCS, ids=doc_id)
def test_manifest_is_valid(item, crd_validators):
    _, doc = item
    if is_custom_resource(doc):
        errors = schema_errors(crd_validators, doc)
        assert not errors, "\n".join(errors)
    else:
        kubernetes_validate = pytest.importorskip("kubernetes_validate")
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_deploy_ships_the_expected_manifests():
    assert sorted(doc["kind"] for _, doc in DOCS) == ["PodMonitor", "RayCluster", "RayJob"]


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
    "head group missing": ("RayCluster", _set("spec.headGroupSpec", _DELETE), "is a required"),
    "bad scrape interval": (
        "PodMonitor",
        _set("spec.podMetricsEndpoints.0.interval", "15 seconds"),
        "does not match",
    ),
    "bad scheme": ("PodMonitor", _set("spec.podMetricsEndpoints.0.scheme", "tcp"), "is not one of"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_validation_rejects_a_broken_manifest(case, crd_validators):
    kind, mutate, expected = BROKEN[case]
    doc = copy.deepcopy(the_doc(kind))
    mutate(doc)
    errors = schema_errors(crd_validators, doc)
    assert any(expected in e for e in errors), f"expected {expected!r} among {errors}"


@pytest.mark.parametrize("kind", sorted(MAX_NAME_LENGTH))
def test_name_is_valid_for_kuberay(kind):
    name = the_doc(kind)["metadata"]["name"]
    assert DNS_1035_LABEL.match(name) and len(name) <= MAX_NAME_LENGTH[kind], name


# --- Pod templates --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodTemplate:
    source: str
    role: str  # head, worker, submitter
    group: str
    template: dict[str, Any]
    cluster: str

    @property
    def spec(self) -> dict[str, Any]:
        return self.template["spec"]

    def containers(self) -> list[dict[str, Any]]:
        return self.spec.get("containers", []) + self.spec.get("initContainers", [])

    @property
    def ray_container(self) -> dict[str, Any]:
        return self.spec["containers"][0]  # KubeRay's rule without a RAY=true env marker

    def labels(self) -> dict[str, str]:
        """The pod's labels once KubeRay has created it (ray.io/node-type etc. are KubeRay's)."""
        labels = {
            "ray.io/is-ray-node": "yes",
            "app.kubernetes.io/name": "kuberay",
            "app.kubernetes.io/created-by": "kuberay-operator",
        }
        labels.update(self.template.get("metadata", {}).get("labels", {}))
        if self.role != "submitter":
            labels.update(
                {
                    "ray.io/node-type": self.role,
                    "ray.io/group": self.group,
                    "ray.io/cluster": self.cluster,
                }
            )
        return labels


def ray_cluster_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "RayCluster":
        return [doc["spec"]]
    if doc["kind"] == "RayJob" and "rayClusterSpec" in doc["spec"]:
        return [doc["spec"]["rayClusterSpec"]]
    return []


def pod_templates(source: str, doc: dict[str, Any]) -> list[PodTemplate]:
    name = doc["metadata"]["name"]
    found = []
    for spec in ray_cluster_specs(doc):
        head = spec["headGroupSpec"]["template"]
        found.append(PodTemplate(source, "head", "headgroup", head, name))
        for group in spec.get("workerGroupSpecs", []):
            found.append(PodTemplate(source, "worker", group["groupName"], group["template"], name))
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        submitter = doc["spec"]["submitterPodTemplate"]
        found.append(PodTemplate(source, "submitter", "", submitter, name))
    if "template" in doc.get("spec", {}) and doc["kind"] != "RayJob":
        found.append(PodTemplate(source, "pod", "", doc["spec"]["template"], name))
    return found


TEMPLATES = [t for source, doc in DOCS for t in pod_templates(source, doc)]
WORKERS = [t for t in TEMPLATES if t.role == "worker"]


def template_id(t: PodTemplate) -> str:
    return f"{t.source}:{t.role}/{t.group}" if t.group else f"{t.source}:{t.role}"


def test_every_rayjob_names_its_submitter_pod():
    """Without submitterPodTemplate, KubeRay submits from a default pod no policy here covers."""
    for _, doc in DOCS:
        if (
            doc["kind"] == "RayJob"
            and doc["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode"
        ):
            assert "submitterPodTemplate" in doc["spec"], doc["metadata"]["name"]


@pytest.mark.parametrize("t", TEMPLATES, ids=template_id)
def test_pod_template_is_a_valid_kubernetes_pod_template(t):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}}
    pod_template["template"] = t.template
    kubernetes_validate.validate(pod_template, kubernetes_validate.latest_version(), strict=True)


def effective(t: PodTemplate, container: dict[str, Any], field: str) -> Any:
    """A securityContext field as the kubelet sees it: the container's, else the pod's."""
    value = container.get("securityContext", {}).get(field)
    return t.spec.get("securityContext", {}).get(field) if value is None else value


@pytest.mark.parametrize("t", TEMPLATES, ids=template_id)
def test_every_container_runs_as_non_root(t):
    assert t.containers()
    for c in t.containers():
        assert effective(t, c, "runAsNonRoot") is True, c["name"]
        assert effective(t, c, "runAsUser") == RUN_AS_USER, c["name"]
        assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False, c["name"]


def test_autoscaler_sidecar_would_run_as_non_root():
    for _, doc in DOCS:
        for spec in ray_cluster_specs(doc):
            if spec.get("enableInTreeAutoscaling"):
                context = spec.get("autoscalerOptions", {}).get("securityContext", {})
                assert context.get("runAsNonRoot") is True and context.get("runAsUser"), doc


RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


@pytest.mark.parametrize("t", TEMPLATES, ids=template_id)
def test_pod_meets_the_restricted_pod_security_standard(t):
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        assert not t.spec.get(host), host
    for volume in t.spec.get("volumes", []):
        assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, volume
    for c in t.containers():
        context = c.get("securityContext", {})
        assert not context.get("privileged"), c["name"]
        assert "ALL" in context.get("capabilities", {}).get("drop", []), c["name"]
        assert set(context.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}
        seccomp = effective(t, c, "seccompProfile") or {}
        assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), c["name"]
        assert all("hostPort" not in p for p in c.get("ports", [])), c["name"]


# --- Credentials ----------------------------------------------------------------------------------


def test_credentials_come_only_from_secrets():
    for t in TEMPLATES:
        for c in t.containers():
            for env in c.get("env", []):
                if CREDENTIAL_NAME.search(env["name"].upper()):
                    assert "value" not in env, f"{template_id(t)}: literal {env['name']}"
                    assert "secretKeyRef" in env.get("valueFrom", {}), env["name"]
    for _, doc in DOCS:  # a RayJob's runtime env reaches every Ray process, in plain text
        runtime_env = yaml.safe_load(doc.get("spec", {}).get("runtimeEnvYAML") or "{}")
        names = runtime_env.get("env_vars", {})
        assert not [n for n in names if CREDENTIAL_NAME.search(n.upper())], names


@pytest.mark.parametrize(
    "path", [*MANIFEST_FILES, DEPLOY / "Dockerfile", DEPLOY / "README.md"], ids=lambda p: p.name
)
def test_no_credential_is_written_down(path):
    assert not CREDENTIAL_VALUE.search(path.read_text())


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {env["name"]: env for env in container.get("env", [])}


@pytest.mark.parametrize("t", [t for t in TEMPLATES if t.role != "submitter"], ids=template_id)
def test_ray_pods_read_s3_credentials_from_the_secret(t):
    """The driver (on the head) and every worker read shards and write checkpoints on S3."""
    env = env_of(t.ray_container)
    if t.spec.get("serviceAccountName"):  # IRSA: the AWS SDK's web-identity credentials
        return
    for key in S3_SECRET_KEYS:
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": SECRET_NAME, "key": key}


def test_all_ray_pods_use_one_s3_endpoint():
    """A plain value (MinIO/Ceph), the same in every pod that touches S3; absent means AWS S3."""
    endpoints = set()
    for t in TEMPLATES:
        if t.role != "submitter":
            env = env_of(t.ray_container).get("AWS_ENDPOINT_URL", {"value": None})
            endpoints.add(env["value"])
    assert len(endpoints) == 1, endpoints


# --- Cluster shape and the training entrypoint ----------------------------------------------------


def test_head_runs_no_training():
    for _, doc in DOCS:
        for spec in ray_cluster_specs(doc):
            head = spec["headGroupSpec"]
            assert head["rayStartParams"].get("num-cpus") == "0"
            resources = head["template"]["spec"]["containers"][0].get("resources", {})
            for kind in ("limits", "requests"):
                assert GPU not in resources.get(kind, {}), kind


def test_rayjob_cleans_up_after_itself():
    spec = the_doc("RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["ttlSecondsAfterFinished"] <= 24 * 3600
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"


def gpus_per_pod(template: dict[str, Any]) -> int:
    ray_container = template["spec"]["containers"][0]
    return int(ray_container.get("resources", {}).get("limits", {}).get(GPU, 0))


def train_flags(argv: list[str]) -> argparse.Namespace:
    """The few `metatrainer train` flags the cluster shape depends on, parsed independently."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--gpus-per-worker", type=float)
    parser.add_argument("--metrics-port", type=int, default=METRICS_BASE_PORT)
    return parser.parse_known_args(argv[2:])[0]


def rayjob_argv() -> list[str]:
    return shlex.split(the_doc("RayJob")["spec"]["entrypoint"])


def test_cluster_has_the_gpus_the_job_asks_for():
    argv = rayjob_argv()
    assert argv[:2] == ["metatrainer", "train"], argv
    flags = train_flags(argv)
    assert flags.workers and flags.gpus_per_worker, "say --workers and --gpus-per-worker explicitly"
    (spec,) = ray_cluster_specs(the_doc("RayJob"))
    available = sum(
        g.get("replicas", g.get("minReplicas", 0)) * gpus_per_pod(g["template"])
        for g in spec["workerGroupSpecs"]
    )
    assert flags.workers * flags.gpus_per_worker <= available
    assert flags.metrics_port == METRICS_BASE_PORT  # the port the manifests and PodMonitor use


def submit_commands(text: str) -> list[list[str]]:
    """Every `ray job submit ... -- CMD` in a file (comments or code blocks): the CMD argv."""
    lines = [line.strip().lstrip("#").strip() for line in text.splitlines()]
    commands = []
    for start, line in enumerate(lines):
        if line.startswith("ray job submit"):
            command, nxt = line, start + 1
            while command.endswith("\\"):
                command, nxt = command[:-1] + " " + lines[nxt], nxt + 1
            argv = shlex.split(command)
            commands.append(argv[argv.index("--") + 1 :])
    return commands


ENTRYPOINTS = {
    "rayjob.yaml": rayjob_argv(),
    **{
        f"{name} ray job submit": argv
        for name in ("raycluster.yaml", "README.md")
        for argv in submit_commands((DEPLOY / name).read_text())
    },
}


def test_docs_show_a_ray_job_submit_command():
    assert {"raycluster.yaml ray job submit", "README.md ray job submit"} <= set(ENTRYPOINTS)


def metatrainer_parser() -> argparse.ArgumentParser:
    from cluster.cli import build_parser

    try:
        return build_parser()
    except ModuleNotFoundError as e:
        if e.name in ("training", "training.cli", "data_prep", "data_prep.cli"):
            pytest.skip(f"the metatrainer CLI is not assembled yet ({e.name} is missing)")
        raise


@pytest.mark.parametrize("where", ENTRYPOINTS)
def test_entrypoint_is_a_valid_train_command(where, capsys):
    argv = ENTRYPOINTS[where]
    assert argv[:2] == ["metatrainer", "train"], argv
    parser = metatrainer_parser()
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{where}: metatrainer rejects {shlex.join(argv)}:\n{capsys.readouterr().err}")
    assert args.command == "train"
    assert getattr(args, "metrics_port", METRICS_BASE_PORT) == METRICS_BASE_PORT


# --- Metrics ports and the PodMonitor -------------------------------------------------------------


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


# --- The image ------------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; comments dropped, continuation lines joined."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            instructions.append((instruction.upper(), args.strip()))
    return instructions


def dockerfile_args(instruction: str) -> list[str]:
    return [args for name, args in dockerfile() if name == instruction]


def test_image_is_python_311_slim():
    assert dockerfile_args("FROM") == ["python:3.11-slim"]


def test_image_runs_as_the_non_root_user_of_the_manifests():
    user = dockerfile_args("USER")[-1].split(":")[0]
    assert user.isdigit() and int(user) == RUN_AS_USER


def test_image_bakes_in_no_credentials():
    for args in dockerfile_args("ENV") + dockerfile_args("ARG"):
        for name in re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", args):
            assert not CREDENTIAL_NAME.search(name.upper()), args


def test_image_installs_the_project():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    ]
    copied = " ".join(dockerfile_args("COPY"))
    for name in ("pyproject.toml", *packages):
        assert re.search(rf"(^|\s){re.escape(name)}(\s|$)", copied), f"{name} is not copied"
    assert any(re.search(r"pip install .*(\s\.|/src)(\s|$)", run) for run in dockerfile_args("RUN"))


def test_image_ray_version_matches_the_manifests():
    (ray_version,) = [
        a.split("=", 1)[1] for a in dockerfile_args("ARG") if a.startswith("RAY_VERSION=")
    ]
    for _, doc in DOCS:
        for spec in ray_cluster_specs(doc):
            assert spec["rayVersion"] == ray_version


def test_every_ray_pod_uses_one_image():
    for _, doc in DOCS:
        images = {c["image"] for t in pod_templates("", doc) for c in t.containers()}
        assert len(images) <= 1, images


def test_build_context_leaves_out_local_state():
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)


def test_image_has_the_ray_dashboard():
    """ray[default] brings the dashboard: KubeRay's probes and job submission talk to it."""
    runs = " ".join(dockerfile_args("RUN"))
    assert re.search(r"ray\[[^\]]*\bdefault\b[^\]]*\]==\$\{?RAY_VERSION\b", runs), runs
