"""deploy/: the pods follow the project's security policy: every container runs as the non-root
user of the image under the "restricted" Pod Security Standard, and credentials reach a pod only
through the S3 Secret (secretKeyRef), never written down in a manifest, runtime env or doc.

    pytest tests/deploy -q
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from manifest_support import (
    CREDENTIAL_NAME,
    DEPLOY,
    DOCS,
    MANIFEST_FILES,
    RUN_AS_USER,
    TEMPLATES,
    PodTemplate,
    ray_cluster_specs,
    template_id,
)

SECRET_NAME = "metatrainer-s3"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# Strings that look like real credentials, whatever field they hide in.
CREDENTIAL_VALUE = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|aws_secret_access_key\s*[=:]\s*\S")


# --- Pods: non-root, restricted -------------------------------------------------------------------


def test_every_rayjob_names_its_submitter_pod():
    """Without submitterPodTemplate, KubeRay submits from a default pod no policy here covers."""
    for _, doc in DOCS:
        if (
            doc["kind"] == "RayJob"
            and doc["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode"
        ):
            assert "submitterPodTemplate" in doc["spec"], doc["metadata"]["name"]


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
