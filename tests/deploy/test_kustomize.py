"""deploy/ is a kustomize base with overlays: every kustomization builds with `kubectl kustomize`,
every component is used by an overlay, every overlay pins its images by digest and keeps all of
its objects in one namespace, and the README's step-by-step `kubectl apply -k ... -l` selectors
pick exactly the objects of each step.

    pytest tests/deploy -q
"""

from __future__ import annotations

import re

import pytest
from manifest_support import (
    BUILDS,
    DEPLOY,
    NAMESPACE,
    OVERLAY_NAMES,
    TEMPLATES,
    build_name,
    is_component,
    kustomization_dirs,
    kustomize,
    load_yaml_docs,
    needs_kubectl,
)

DIGEST = re.compile(r"^[^@:]+(:[^@]+)?@sha256:[0-9a-f]{64}$")
CLUSTER_SCOPED = {"Namespace"}
STEP_LABEL = "metatrainer.io/step"


@needs_kubectl
@pytest.mark.parametrize(
    "directory",
    [d for d in kustomization_dirs() if not is_component(d)],
    ids=build_name,
)
def test_kustomization_builds(directory):
    _, error = kustomize(directory)
    assert not error, f"kubectl kustomize {build_name(directory)}:\n{error}"


def test_deploy_has_a_base_and_the_overlays():
    names = {build_name(d) for d in kustomization_dirs()}
    assert {"base", "overlays/gpu", "overlays/cpu-small", "overlays/minio"} <= names


@pytest.mark.parametrize(
    "component", [d for d in kustomization_dirs() if is_component(d)], ids=build_name
)
def test_every_component_is_built_through_an_overlay(component):
    """A Component cannot be built alone: an overlay that uses it is how it gets validated."""
    users = []
    for directory in kustomization_dirs():
        (kustomization,) = load_yaml_docs(directory / "kustomization.yaml")
        for ref in kustomization.get("components", []):
            if (directory / ref).resolve() == component.resolve():
                users.append(build_name(directory))
    assert [u for u in users if u.startswith("overlays/")], f"no overlay uses {component}"


@needs_kubectl
@pytest.mark.parametrize("build", OVERLAY_NAMES)
def test_overlay_pins_every_image_by_digest(build):
    templates = [t for t in TEMPLATES if t.source.startswith(build + ":")]
    images = {c["image"] for t in templates for c in t.containers()}
    assert images
    for image in images:
        assert DIGEST.match(image), f"{build}: {image} is not pinned by digest"


@needs_kubectl
@pytest.mark.parametrize("build", OVERLAY_NAMES)
def test_overlay_keeps_everything_in_its_namespace(build):
    for doc in BUILDS[build]:
        if doc["kind"] in CLUSTER_SCOPED:
            assert doc["metadata"]["name"] == NAMESPACE
        else:
            assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]["name"]


@needs_kubectl
@pytest.mark.parametrize("build", OVERLAY_NAMES)
def test_namespace_enforces_the_restricted_pod_security_standard(build):
    (namespace,) = [d for d in BUILDS[build] if d["kind"] == "Namespace"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@needs_kubectl
@pytest.mark.parametrize("build", OVERLAY_NAMES)
def test_apply_selectors_pick_each_step(build):
    """deploy/README.md applies an overlay in three steps with label selectors:
    `-l 'metatrainer.io/step notin (prep,train)'`, then `-l metatrainer.io/step=prep`, then
    `-l metatrainer.io/step=train`. Each RayJob is exactly one step; everything else is setup."""
    steps: dict[str, list[str]] = {}
    for doc in BUILDS[build]:
        step = doc["metadata"].get("labels", {}).get(STEP_LABEL, "setup")
        steps.setdefault(step, []).append(f"{doc['kind']}/{doc['metadata']['name']}")
    assert steps.pop("prep") == ["RayJob/metatrainer-prep"]
    assert steps.pop("train") == ["RayJob/metatrainer-train"]
    assert set(steps) == {"setup"} and not [s for s in steps["setup"] if s.startswith("RayJob")]


def test_readme_applies_the_steps_it_describes():
    readme = (DEPLOY / "README.md").read_text()
    for selector in (
        f"-l '{STEP_LABEL} notin (prep,train)'",
        f"-l {STEP_LABEL}=prep",
        f"-l {STEP_LABEL}=train",
    ):
        assert selector in readme, selector
