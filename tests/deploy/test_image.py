"""deploy/Dockerfile: the image is built only from pinned inputs (the base image by digest, every
Python package from a lock with hashes), runs as the manifests' non-root user, bakes in no
credentials, installs the project with the manifests' Ray version and dashboard, and is the one
image every Ray pod uses.

    pytest tests/deploy -q
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import re
from pathlib import Path

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


def test_image_is_python_311_slim_pinned_by_digest():
    """A tag moves (python:3.11-slim is rebuilt with every Debian fix); a digest does not."""
    (base,) = dockerfile_args("FROM")
    assert re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", base), base


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


def test_image_installs_nothing_unchecked():
    """Every `pip install` either checks every file against the lock's hashes or downloads
    nothing (the project itself, built with the lock's setuptools)."""
    installs = [run for run in dockerfile_args("RUN") if "pip install" in run]
    assert installs
    for run in installs:
        for command in re.split(r"&&|;", run):
            if "pip install" in command:
                flags = command.split()
                assert "--require-hashes" in flags or "--no-index" in flags, command
                if "--no-index" in flags:
                    assert "--no-build-isolation" in flags, "build isolation downloads setuptools"


# --- The locks: deploy/requirements-<TORCH>.txt -------------------------------------------------

PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")
INDEX = re.compile(r"--(extra-)?index-url https://\S+")  # uv's --emit-index-url (the cpu lock)


def lock_path(torch: str) -> Path:
    return DEPLOY / f"requirements-{torch}.txt"


def lock(torch: str) -> dict[str, str]:
    """name -> version of a lock, whose every requirement must be pinned with == and carry its
    sha256 hashes (`pip install --require-hashes` refuses the whole lock otherwise)."""
    pins = {}
    for line in lock_path(torch).read_text().replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or INDEX.fullmatch(line):
            continue
        requirement, *hashes = line.split()
        pin = PIN.fullmatch(requirement)
        assert pin, f"{lock_path(torch).name}: not pinned with ==: {line}"
        assert hashes and all(HASH.fullmatch(h) for h in hashes), f"no hash for {requirement}"
        pins[canonical(pin[1])] = pin[2]
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def torch_choice() -> str:
    (arg,) = [a for a in dockerfile_args("ARG") if a.startswith("TORCH=")]
    return arg.split("=", 1)[1]


LOCKS = sorted(p.stem.removeprefix("requirements-") for p in DEPLOY.glob("requirements-*.txt"))


def test_the_default_build_has_its_lock():
    assert torch_choice() in LOCKS
    copied = " ".join(dockerfile_args("COPY"))
    assert "deploy/requirements-${TORCH}.txt" in copied, copied


@pytest.mark.parametrize("torch", LOCKS)
def test_lock_pins_every_package_with_its_hash(torch):
    pins = lock(torch)
    assert {"torch", "torchvision", "ray", "setuptools"} <= set(pins)


@pytest.mark.parametrize("torch", LOCKS)
def test_lock_satisfies_pyproject(torch):
    """A dependency added to pyproject.toml must be locked too (deploy/lock-requirements.sh)."""
    tomllib = pytest.importorskip("tomllib")
    requirements = pytest.importorskip("packaging.requirements")
    pins = lock(torch)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        requirement = requirements.Requirement(text)
        name = canonical(requirement.name)
        assert name in pins, f"{name} is not in {lock_path(torch).name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (text, pins[name])
    torch_local = pins["torch"].partition("+")[2]
    assert torch_local == ("cpu" if torch == "cpu" else ""), pins["torch"]


@needs_kubectl
@pytest.mark.parametrize("torch", LOCKS)
def test_lock_ray_version_matches_the_manifests(torch):
    versions = {spec["rayVersion"] for _, doc in DOCS for spec in ray_cluster_specs(doc)}
    assert versions == {lock(torch)["ray"]}


@needs_kubectl
def test_every_ray_pod_uses_one_image():
    for _, doc in DOCS:
        images = {c["image"] for t in pod_templates("", doc) for c in t.containers()}
        assert len(images) <= 1, images


def test_build_context_leaves_out_local_state_but_holds_the_locks():
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert {".git", ".venv"} <= set(patterns)
    for torch in LOCKS:  # the last pattern that matches the file or a folder above it decides
        path = f"deploy/requirements-{torch}.txt"
        matching = [
            p
            for p in patterns
            if fnmatch.fnmatch(path, p.lstrip("!/")) or path.startswith(p.lstrip("!/") + "/")
        ]
        assert matching and matching[-1].startswith("!"), f"{path} is not in the build context"


@pytest.mark.parametrize("torch", LOCKS)
def test_lock_has_ray_with_its_dashboard_train_and_tune(torch):
    """ray[default] brings the dashboard (KubeRay's probes and job submission talk to it), and
    Train and Tune their own dependencies: the lock holds every one of them."""
    requirements = pytest.importorskip("packaging.requirements")
    pins = lock(torch)
    if importlib.metadata.version("ray") != pins["ray"]:
        pytest.skip(f"this venv's Ray is not the lock's {pins['ray']}")
    environment = {"python_version": "3.11", "sys_platform": "linux"}
    extras = {"default", "train", "tune"}
    for text in importlib.metadata.requires("ray"):
        requirement = requirements.Requirement(text)
        marker = requirement.marker
        if marker and any(marker.evaluate({**environment, "extra": e}) for e in extras):
            if not marker.evaluate({**environment, "extra": ""}):
                assert canonical(requirement.name) in pins, text
