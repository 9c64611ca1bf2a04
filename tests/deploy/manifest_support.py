"""The manifests in deploy/, parsed once, and the pod templates KubeRay will create from them.

Shared by the tests in tests/deploy/ (tests/deploy/conftest.py makes it importable).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

RUN_AS_USER = 1000  # the image's USER; it owns HOME
METRICS_BASE_PORT = 9100  # `metatrainer train --metrics-port` default; local rank i serves +i
GPU = "nvidia.com/gpu"
CREDENTIAL_NAME = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY")

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


def gpus_per_pod(template: dict[str, Any]) -> int:
    ray_container = template["spec"]["containers"][0]
    return int(ray_container.get("resources", {}).get("limits", {}).get(GPU, 0))
