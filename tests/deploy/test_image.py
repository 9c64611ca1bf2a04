"""deploy/Dockerfile: the image runs as the manifests' non-root user, bakes in no credentials,
installs the project with the manifests' Ray version and dashboard, and is the one image every Ray
pod uses.

    pytest tests/deploy -q
"""

from __future__ import annotations

import re

import pytest
from manifest_support import (
    CREDENTIAL_NAME,
    DEPLOY,
    DOCS,
    REPO,
    RUN_AS_USER,
    needs_kubectl,
    pod_templates,
    ray_cluster_specs,
)


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


@needs_kubectl
def test_image_ray_version_matches_the_manifests():
    (ray_version,) = [
        a.split("=", 1)[1] for a in dockerfile_args("ARG") if a.startswith("RAY_VERSION=")
    ]
    versions = {spec["rayVersion"] for _, doc in DOCS for spec in ray_cluster_specs(doc)}
    assert versions == {ray_version}


@needs_kubectl
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
