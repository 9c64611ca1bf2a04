"""deploy/ is a kustomize base with overlays: every kustomization builds with `kubectl kustomize`,
every component is used by an overlay, every overlay pins its images by digest, names its S3
region and keeps all of its objects in one namespace, and the README's step-by-step
`kubectl apply -k ... -l` selectors pick exactly the objects of each step.

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
    the_doc,
)

DIGEST = re.compile(r"^[^@:]+(:[^@]+)?@sha256:[0-9a-f]{64}$")
CLUSTER_SCOPED = {"Namespace"}
STEP_LABEL = "metatrainer.io/step"
ENDPOINT_CONFIGMAP = "metatrainer-s3-endpoint"
REGION_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")  # pyarrow's, boto3's
AWS_REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d$")


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


def region_of(build: str) -> dict[str, str]:
    data = the_doc(build, "ConfigMap", ENDPOINT_CONFIGMAP)["data"]
    return {var: data.get(var) for var in REGION_VARS}


@needs_kubectl
def test_base_region_is_a_placeholder_no_sdk_accepts():
    """The base names no region: were us-east-1 its default, a bucket elsewhere would fail every
    checkpoint with a 301 (pyarrow follows no cross-region redirect) in an overlay that forgot."""
    for var, value in region_of("base").items():
        assert value and "REPLACE" in value and not AWS_REGION.match(value), (var, value)


@needs_kubectl
@pytest.mark.parametrize("build", OVERLAY_NAMES)
def test_overlay_sets_the_bucket_region_for_boto3_and_pyarrow(build):
    regions = region_of(build)
    assert regions["AWS_REGION"] == regions["AWS_DEFAULT_REGION"], regions
    assert AWS_REGION.match(regions["AWS_REGION"] or ""), f"{build} keeps the base's {regions}"


def test_readme_lists_the_region_among_the_placeholders():
    readme = (DEPLOY / "README.md").read_text()
    step0 = readme[readme.index("## 0.") : readme.index("## 1.")]
    assert "`REPLACE-region`" in step0 and "AWS_REGION" in step0


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
