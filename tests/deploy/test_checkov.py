"""deploy/: checkov finds nothing in any overlay, beyond the checks deploy/.checkov.yaml skips with
a reason each.

checkov does not look inside custom resources, so each pod template of a RayJob (head, workers,
submitter) is also given to it as the Pod that KubeRay will create from it: the pods that hold
the credentials are checked like any Deployment's.

checkov pins its own boto3 and packaging, so it lives in a venv of its own: .ci/run installs it at
.venv-tools/bin/checkov; `checkov` on PATH works too.

    pytest tests/deploy/test_checkov.py -q
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from manifest_support import DEPLOY, OVERLAY_NAMES, OVERLAYS, needs_kubectl, pod_templates, tool

CONFIG = DEPLOY / ".checkov.yaml"


def as_pods(build: str, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Pods KubeRay creates from the build's RayJobs, for checkov to see."""
    pods = []
    for doc in docs:
        if doc["kind"] != "RayJob":
            continue
        for t in pod_templates(build, doc):
            name = f"{doc['metadata']['name']}-{t.role}{'-' + t.group if t.group else ''}"
            metadata = {**t.template.get("metadata", {}), "name": name}
            metadata["namespace"] = doc["metadata"]["namespace"]
            pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": t.spec})
    return pods


@pytest.fixture(scope="module")
def checkov_report(tmp_path_factory) -> dict[str, Any]:
    """One checkov run over every overlay (its start-up is most of its time)."""
    directory = tmp_path_factory.mktemp("checkov")
    files = []
    for build, docs in sorted(OVERLAYS.items()):
        built = directory / f"{build.replace('/', '-')}.yaml"
        built.write_text(yaml.safe_dump_all(docs + as_pods(build, docs), sort_keys=False))
        files += ["-f", str(built)]
    result = subprocess.run(
        [tool("checkov"), *files, "--framework", "kubernetes", "--config-file", str(CONFIG)]
        + ["--output", "json", "--compact", "--quiet", "--skip-download"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.stdout.strip(), f"checkov printed nothing ({result.returncode}):{result.stderr}"
    report = json.loads(result.stdout)
    return report[0] if isinstance(report, list) else report


@needs_kubectl
def test_checkov_checked_the_pods(checkov_report):
    summary = checkov_report["summary"]
    assert summary["passed"] > 100 and summary["parsing_errors"] == 0, summary


@needs_kubectl
@pytest.mark.parametrize("build", OVERLAY_NAMES)
def test_checkov_passes(build, checkov_report):
    assert build in OVERLAYS, f"kubectl kustomize {build} failed: checkov had none of it"
    failed = [
        f"{c['check_id']} {c['resource']}: {c['check_name']}"
        for c in checkov_report.get("results", {}).get("failed_checks", [])
        if Path(c["file_path"]).name == f"{build.replace('/', '-')}.yaml"
    ]
    assert not failed, "\n".join(failed)


def test_every_skip_has_a_reason():
    """deploy/.checkov.yaml: each skipped check is preceded by a comment saying why."""
    lines = CONFIG.read_text().splitlines()
    config = yaml.safe_load(CONFIG.read_text())
    skips = config["skip-check"]
    assert skips
    for check in skips:
        (i,) = [i for i, line in enumerate(lines) if line.strip() == f"- {check}"]
        assert lines[i - 1].strip().startswith("#") and len(lines[i - 1].strip()) > 20, check
