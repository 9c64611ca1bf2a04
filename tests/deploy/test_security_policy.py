"""deploy/: every pod of every kustomize build follows the project's security policy: non-root
under the "restricted" Pod Security Standard, a read-only root filesystem with emptyDirs for what
is written, ephemeral-storage limits, no service-account token, Ray token auth on every Ray
process and the submitter, no Ray Client port, and credentials only from Secrets (never a
Secret, a literal or a credential-looking string written in deploy/).

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
    HOME,
    OVERLAY_NAMES,
    RAY_NODES,
    RUN_AS_USER,
    TEMPLATES,
    TOKEN_SECRET,
    PodTemplate,
    built,
    docs_of,
    env_of,
    needs_kubectl,
    quantity,
    ray_cluster_specs,
    template_id,
)

S3_SECRET = "metatrainer-s3"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
ENDPOINT_CONFIGMAP = "metatrainer-s3-endpoint"
RAY_CLIENT_PORT = 10001
DASHBOARD_PORT = 8265
# Strings that look like real credentials, whatever field they hide in.
CREDENTIAL_VALUE = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|aws_secret_access_key\s*[=:]\s*\S")


# --- Pods: non-root, restricted -------------------------------------------------------------------


@needs_kubectl
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


@needs_kubectl
@pytest.mark.parametrize("t", built(TEMPLATES), ids=template_id)
def test_every_container_runs_as_non_root(t):
    assert t.containers()
    for c in t.containers():
        assert effective(t, c, "runAsNonRoot") is True, c["name"]
        assert effective(t, c, "runAsUser") == RUN_AS_USER, c["name"]
        assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False, c["name"]


@needs_kubectl
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


@needs_kubectl
@pytest.mark.parametrize("t", built(TEMPLATES), ids=template_id)
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


# --- Pods: what they may write, and with what identity --------------------------------------------


def mounts(t: PodTemplate, container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> the volume mounted there."""
    volumes = {v["name"]: v for v in t.spec.get("volumes", [])}
    return {
        m["mountPath"]: volumes.get(m["name"], {"name": m["name"]})
        for m in container.get("volumeMounts", [])
    }


def writable_dirs(t: PodTemplate, container: dict[str, Any]) -> list[str]:
    """Where a container writes: /tmp always; HOME, Ray's session dir and the weights/shard
    cache (METATRAINER_CACHE_DIR) for our image."""
    if container["image"].split("@")[0].rsplit("/", 1)[-1].split(":")[0] != "metatrainer":
        return ["/tmp"]
    cache = env_of(container).get("METATRAINER_CACHE_DIR", {}).get("value")
    return ["/tmp", HOME] + (["/tmp/ray"] if t.is_ray_node else []) + ([cache] if cache else [])


@needs_kubectl
@pytest.mark.parametrize("t", built(TEMPLATES), ids=template_id)
def test_root_filesystem_is_read_only_with_sized_emptydirs(t):
    for c in t.containers():
        assert c.get("securityContext", {}).get("readOnlyRootFilesystem") is True, c["name"]
        mounted = mounts(t, c)
        for path in writable_dirs(t, c):
            volume = mounted.get(path)
            assert volume and "emptyDir" in volume, f"{c['name']}: no emptyDir at {path}"
            assert volume["emptyDir"].get("sizeLimit"), f"{c['name']}: {path} has no sizeLimit"


@needs_kubectl
@pytest.mark.parametrize("t", built(TEMPLATES), ids=template_id)
def test_ephemeral_storage_is_limited_and_holds_the_emptydirs(t):
    """A container's ephemeral-storage limit covers its disk-backed emptyDirs: the kubelet then
    evicts a pod that fills the node's disk, and never one that stays within its own sizes."""
    for c in t.containers():
        resources = c.get("resources", {})
        assert "ephemeral-storage" in resources.get("requests", {}), c["name"]
        limit = quantity(resources.get("limits", {}).get("ephemeral-storage", "0"))
        disk = sum(
            quantity(v["emptyDir"]["sizeLimit"])
            for v in mounts(t, c).values()
            if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"
        )
        assert limit >= disk > 0, f"{c['name']}: limit {limit} < emptyDirs {disk}"


@needs_kubectl
@pytest.mark.parametrize("t", built(TEMPLATES), ids=template_id)
def test_no_pod_mounts_a_service_account_token(t):
    assert t.spec.get("automountServiceAccountToken") is False


@needs_kubectl
def test_service_accounts_mount_no_token():
    for _, doc in DOCS:
        if doc["kind"] == "ServiceAccount":
            assert doc.get("automountServiceAccountToken") is False, doc["metadata"]["name"]


@needs_kubectl
def test_irsa_example_is_an_annotated_service_account_the_ray_pods_use():
    (account,) = docs_of("overlays/gpu", "ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws")
    for t in RAY_NODES:
        if t.source.startswith("overlays/gpu:"):
            assert t.spec["serviceAccountName"] == account["metadata"]["name"], template_id(t)


@needs_kubectl
@pytest.mark.parametrize("t", built(RAY_NODES), ids=template_id)
def test_ray_containers_run_ray_stop_before_they_stop(t):
    """preStop `ray stop`: the raylet leaves the cluster cleanly instead of being declared dead."""
    command = t.ray_container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[-1].split()[:2] == ["ray", "stop"] or command[:2] == ["ray", "stop"], command


# --- Ray token auth and ports ---------------------------------------------------------------------


@needs_kubectl
def test_every_ray_cluster_has_token_auth_from_a_secret():
    specs = [spec for _, doc in DOCS for spec in ray_cluster_specs(doc)]
    assert specs
    for spec in specs:
        assert spec["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET["name"]}


@needs_kubectl
@pytest.mark.parametrize(
    "t",
    built([t for t in TEMPLATES if t.role in ("head", "worker", "submitter")]),
    ids=template_id,
)
def test_ray_containers_and_submitter_carry_the_token_from_the_secret(t):
    env = env_of(t.ray_container)
    assert env["RAY_AUTH_MODE"].get("value") == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == TOKEN_SECRET


@needs_kubectl
@pytest.mark.parametrize("t", built(TEMPLATES), ids=template_id)
def test_no_ray_client_port(t):
    for c in t.containers():
        assert RAY_CLIENT_PORT not in {p["containerPort"] for p in c.get("ports", [])}
        assert "client" not in {p.get("name") for p in c.get("ports", [])}


@needs_kubectl
def test_no_ray_start_opens_a_client_port():
    for _, doc in DOCS:
        for spec in ray_cluster_specs(doc):
            params = [spec["headGroupSpec"]["rayStartParams"]] + [
                g["rayStartParams"] for g in spec.get("workerGroupSpecs", [])
            ]
            assert not [p for p in params if "ray-client-server-port" in p]


@needs_kubectl
def test_dashboard_is_on_no_service_and_no_ingress():
    """The head Service KubeRay creates is reachable only as the NetworkPolicies allow
    (tests/deploy/test_network_policy.py); nothing here publishes the dashboard beyond it."""
    for _, doc in DOCS:
        if doc["kind"] == "Service":
            ports = {p.get("targetPort", p["port"]) for p in doc["spec"]["ports"]}
            assert DASHBOARD_PORT not in ports and "dashboard" not in ports
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP"
        assert doc["kind"] not in ("Ingress", "Route", "Gateway", "HTTPRoute")
        for spec in ray_cluster_specs(doc):
            head = spec["headGroupSpec"]
            assert not head.get("enableIngress") and head.get("serviceType", "ClusterIP") in (
                "ClusterIP",
            )


# --- Credentials ----------------------------------------------------------------------------------


@needs_kubectl
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
        if doc["kind"] == "ConfigMap":
            names = doc.get("data", {})
            assert not [n for n in names if CREDENTIAL_NAME.search(n.upper())], names


@needs_kubectl
def test_no_build_contains_a_secret():
    """Secrets are created by their owner (deploy/README.md), referenced here by name only; the
    MinIO overlay too takes its root password from metatrainer-s3 by reference."""
    assert not [doc_name for doc_name, doc in DOCS if doc["kind"] == "Secret"]
    minio = [t for t in TEMPLATES if t.source.startswith("overlays/minio:") and t.role == "pod"]
    assert {t.component for t in minio} == {"minio", "minio-setup"}
    for t in minio:
        env = env_of(t.spec["containers"][0])
        for name in [n for n in env if CREDENTIAL_NAME.search(n)]:
            assert env[name]["valueFrom"]["secretKeyRef"]["name"] == S3_SECRET, name


DEPLOY_TEXT_FILES = sorted(
    p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in (".yaml", ".md", ".json", "")
)


@pytest.mark.parametrize("path", DEPLOY_TEXT_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_no_credential_is_written_down(path):
    assert not CREDENTIAL_VALUE.search(path.read_text())


@needs_kubectl
@pytest.mark.parametrize("t", built(RAY_NODES), ids=template_id)
def test_ray_pods_read_s3_credentials_from_the_secret(t):
    """The driver (on the head) and every worker read shards and write checkpoints on S3. The
    keys are optional so that IRSA works without the Secret (deploy/README.md)."""
    env = env_of(t.ray_container)
    for key in S3_SECRET_KEYS:
        ref = env[key]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (S3_SECRET, key)


@needs_kubectl
@pytest.mark.parametrize("build", OVERLAY_NAMES)
def test_all_ray_pods_use_one_s3_endpoint(build):
    """Every Ray pod reads the endpoint from the one ConfigMap; absent means AWS S3."""
    (configmap,) = [
        d for d in docs_of(build, "ConfigMap") if d["metadata"]["name"] == ENDPOINT_CONFIGMAP
    ]
    assert "AWS_REGION" in configmap["data"]
    for t in RAY_NODES:
        if t.source.startswith(build + ":"):
            refs = [e["configMapRef"]["name"] for e in t.ray_container.get("envFrom", [])]
            assert refs == [ENDPOINT_CONFIGMAP], template_id(t)
            assert "AWS_ENDPOINT_URL" not in env_of(t.ray_container)
    endpoint = configmap["data"].get("AWS_ENDPOINT_URL")
    assert (endpoint == "http://metatrainer-minio:9000") == (build == "overlays/minio")
