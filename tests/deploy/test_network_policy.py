"""deploy/: the NetworkPolicies of every overlay, evaluated: a default deny, and then exactly the
flows deploy/base/networkpolicy.yaml documents (DNS, Ray among the Ray pods of one cluster but
never Ray Client, the job submitter and the KubeRay operator to the dashboard, Prometheus's pods
to the metrics ports, the Ray pods to S3, and to STS and the EKS Pod Identity agent where the
overlay uses IRSA), and nothing else: not the other Ray cluster, not another pod of the namespace
or of `monitoring`, not another namespace, not the internet.

The evaluator follows the NetworkPolicy semantics of the Kubernetes API (policies add up; a pod
selected by no policy of a direction is open in that direction; a connection needs the egress of
its source and the ingress of its destination).

    pytest tests/deploy -q
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pytest
from manifest_support import (
    NAMESPACE,
    OVERLAY_NAMES,
    RAY_NODES,
    TEMPLATES,
    built,
    docs_of,
    needs_kubectl,
    selects,
    template_id,
)

MONITORING = "monitoring"
OPERATOR_NAMESPACE = "kuberay-system"
S3_PLACEHOLDER = "198.51.100.7"  # inside the overlays' placeholder S3 range
STS_PLACEHOLDER = "203.0.113.7"  # inside overlays/gpu's placeholder STS range
POD_IDENTITY_AGENT = ("169.254.170.23", "fd00:ec2::23")  # EKS Pod Identity agent, port 80
INTERNET = "93.184.216.34"
RAY_CLIENT_PORT = 10001
DASHBOARD_METRICS_PORT = 44227  # Ray's DASHBOARD_METRIC_PORT default
# GCS, a worker process, the dashboard agent, an object manager, gloo/NCCL, the dashboard metrics.
RAY_PORTS = (6379, 10002, 52365, 8076, 29500, DASHBOARD_METRICS_PORT)
ROLE_ARN = "eks.amazonaws.com/role-arn"


@dataclass(frozen=True)
class Peer:
    """A pod (labels, namespace and its labels) or, with `ip`, an address outside the cluster."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)
    namespace: str = NAMESPACE
    namespace_labels: dict[str, str] = field(default_factory=dict)
    ip: str | None = None

    def ns_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace, **self.namespace_labels}


def peer_matches(rule_peer: dict[str, Any], peer: Peer, policy_namespace: str) -> bool:
    if "ipBlock" in rule_peer:
        if peer.ip is None:
            return False  # pod traffic is matched by selectors (CNIs differ; never rely on it)
        address = ipaddress.ip_address(peer.ip)
        block = rule_peer["ipBlock"]
        excepted = any(address in ipaddress.ip_network(e) for e in block.get("except", []))
        return address in ipaddress.ip_network(block["cidr"]) and not excepted
    if peer.ip is not None:
        return False
    if "namespaceSelector" in rule_peer:
        if not selects(rule_peer["namespaceSelector"], peer.ns_labels()):
            return False
    elif peer.namespace != policy_namespace:
        return False
    return selects(rule_peer.get("podSelector", {}), peer.labels)


def port_matches(rule_ports: list[dict[str, Any]] | None, port: int, protocol: str) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        assert isinstance(p.get("port", 0), int), f"named port {p}: use numbers here"
        if p.get("protocol", "TCP") != protocol:
            continue
        if "port" not in p or p["port"] <= port <= p.get("endPort", p["port"]):
            return True
    return False


def direction_allows(
    policies: list[dict[str, Any]],
    pod: Peer,
    other: Peer,
    port: int,
    protocol: str,
    direction: str,  # Ingress or Egress
) -> bool:
    if pod.ip is not None:
        return True  # outside the cluster: no policy of ours applies there
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    applying = [
        p
        for p in policies
        if p["metadata"].get("namespace", NAMESPACE) == pod.namespace
        and selects(p["spec"]["podSelector"], pod.labels)
        and direction in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not applying:
        return True
    for policy in applying:
        for rule in policy["spec"].get(key, []):
            peers = rule.get(peers_key)
            peer_ok = not peers or any(
                peer_matches(rp, other, policy["metadata"].get("namespace", NAMESPACE))
                for rp in peers
            )
            if peer_ok and port_matches(rule.get("ports"), port, protocol):
                return True
    return False


def allowed(
    policies: list[dict[str, Any]], src: Peer, dst: Peer, port: int, protocol: str = "TCP"
) -> bool:
    return direction_allows(policies, src, dst, port, protocol, "Egress") and direction_allows(
        policies, dst, src, port, protocol, "Ingress"
    )


# --- The pods of a build, and the rest of the world -----------------------------------------------


def pods(build: str, job: str = "train") -> dict[str, Peer]:
    """One Peer per role (head, worker, submitter) of the build's RayJob metatrainer-JOB, and
    MinIO's pods where the build has them."""
    found: dict[str, Peer] = {}
    for t in TEMPLATES:
        if not t.source.startswith(build + ":"):
            continue
        if t.cluster == f"metatrainer-{job}" and t.role in ("head", "worker", "submitter"):
            found.setdefault(t.role, Peer(f"{job} {t.role}", t.labels()))
        elif t.component in ("minio", "minio-setup"):
            found[t.component] = Peer(t.component, t.labels())
    return found


OUTSIDERS = {
    "same-namespace pod": Peer("stranger", {"app": "other"}),
    "other-namespace pod": Peer("other", {"app.kubernetes.io/part-of": "metatrainer"}, "other"),
    "prometheus": Peer(
        "prometheus",
        {"app.kubernetes.io/name": "prometheus", "app.kubernetes.io/instance": "k8s"},
        MONITORING,
    ),
    "other monitoring pod": Peer("grafana", {"app.kubernetes.io/name": "grafana"}, MONITORING),
    # The labels of the operator's pod as KubeRay's Helm chart and its kustomize install set
    # them (ray-operator/config/manager/manager.yaml: name kuberay).
    "kuberay operator": Peer(
        "operator",
        {
            "app.kubernetes.io/name": "kuberay-operator",
            "app.kubernetes.io/component": "kuberay-operator",
        },
        OPERATOR_NAMESPACE,
    ),  # fmt: skip
    "kuberay operator (kustomize)": Peer(
        "operator-k",
        {"app.kubernetes.io/name": "kuberay", "app.kubernetes.io/component": "kuberay-operator"},
        OPERATOR_NAMESPACE,
    ),
    "allowed namespace": Peer(
        "notebook", {"app": "jupyter"}, "research", {"metatrainer.io/ray-dashboard": "allowed"}
    ),
    "kube-dns": Peer("kube-dns", {"k8s-app": "kube-dns"}, "kube-system"),
    "s3": Peer("s3", ip=S3_PLACEHOLDER),
    "sts": Peer("sts", ip=STS_PLACEHOLDER),
    "internet": Peer("internet", ip=INTERNET),
}


def policies_of(build: str) -> list[dict[str, Any]]:
    return docs_of(build, "NetworkPolicy")


@needs_kubectl
@pytest.mark.parametrize("build", OVERLAY_NAMES)
def test_default_deny_covers_every_pod_both_ways(build):
    deny = [
        p
        for p in policies_of(build)
        if not p["spec"].get("ingress") and not p["spec"].get("egress")
    ]
    assert deny, "no default-deny NetworkPolicy"
    for t in TEMPLATES:
        if t.source.startswith(build + ":"):
            covering = [p for p in deny if selects(p["spec"]["podSelector"], t.labels())]
            types = {ty for p in covering for ty in p["spec"]["policyTypes"]}
            assert types == {"Ingress", "Egress"}, t.source


@needs_kubectl
@pytest.mark.parametrize("build", OVERLAY_NAMES)
def test_documented_flows_are_allowed(build):
    policies, p, o = policies_of(build), pods(build), OUTSIDERS
    s3_port = 9000 if "minio" in p else 443
    s3 = p["minio"] if "minio" in p else o["s3"]
    flows = [(p[role], o["kube-dns"], 53, proto) for role in p for proto in ("UDP", "TCP")] + [
        (p["worker"], p["head"], 6379, "TCP"),  # GCS
        (p["head"], p["worker"], 10002, "TCP"),  # Ray worker processes
        (p["worker"], p["worker"], 29500, "TCP"),  # gloo/NCCL between training workers
        (p["worker"], p["head"], 52365, "TCP"),  # dashboard agent
        (p["submitter"], p["head"], 8265, "TCP"),
        (o["kuberay operator"], p["head"], 8265, "TCP"),
        (o["kuberay operator (kustomize)"], p["head"], 8265, "TCP"),
        (o["allowed namespace"], p["head"], 8265, "TCP"),
        (o["prometheus"], p["head"], 8080, "TCP"),
        (o["prometheus"], p["head"], DASHBOARD_METRICS_PORT, "TCP"),
        (o["prometheus"], p["worker"], 8080, "TCP"),
        (o["prometheus"], p["worker"], 9100, "TCP"),
        (o["prometheus"], p["worker"], 9107, "TCP"),
        (p["head"], s3, s3_port, "TCP"),
        (p["worker"], s3, s3_port, "TCP"),
    ]
    if "minio" in p:
        flows.append((p["minio-setup"], p["minio"], 9000, "TCP"))
    blocked = [
        f"{s.name} -> {d.name}:{port}/{proto}"
        for s, d, port, proto in flows
        if not allowed(policies, s, d, port, proto)
    ]
    assert not blocked, blocked


@needs_kubectl
@pytest.mark.parametrize("build", OVERLAY_NAMES)
def test_everything_else_is_denied(build):
    policies, p, o = policies_of(build), pods(build), OUTSIDERS
    flows = [
        # Ray Client, from anywhere, even another Ray pod.
        *[(src, p["head"], RAY_CLIENT_PORT) for src in (*p.values(), *o.values())],
        # The dashboard/job API only for the submitter, the operator, opted-in namespaces.
        (o["same-namespace pod"], p["head"], 8265),
        (o["other-namespace pod"], p["head"], 8265),
        (o["prometheus"], p["head"], 8265),
        (p["submitter"], p["worker"], 8265),
        # GCS and workers only among Ray pods.
        (p["submitter"], p["head"], 6379),
        (o["same-namespace pod"], p["head"], 6379),
        (o["kuberay operator"], p["head"], 6379),
        (o["allowed namespace"], p["worker"], 10002),
        (o["same-namespace pod"], p["worker"], 9100),
        (o["other-namespace pod"], p["worker"], 8080),
        # Of the namespace monitoring, only Prometheus's pods scrape.
        (o["other monitoring pod"], p["head"], 8080),
        (o["other monitoring pod"], p["head"], DASHBOARD_METRICS_PORT),
        (o["other monitoring pod"], p["worker"], 9100),
        # Nothing leaves for the internet, not even DNS elsewhere; the submitter needs no S3.
        (p["head"], o["internet"], 443),
        (p["worker"], o["internet"], 443),
        (p["worker"], o["internet"], 53),
        (p["submitter"], o["s3"], 443),
        (p["submitter"], p["worker"], 6379),
    ]
    if not irsa_account(build):  # STS only where a ServiceAccount has an IAM role
        flows += [(p["head"], o["sts"], 443), (p["worker"], o["sts"], 443)]
    if "minio" in p:
        flows += [
            (p["worker"], o["s3"], 443),
            (o["same-namespace pod"], p["minio"], 9000),
            (p["submitter"], p["minio"], 9000),
            (p["minio"], o["internet"], 443),
        ]
    leaks = [
        f"{s.name} -> {d.name}:{port}" for s, d, port in flows if allowed(policies, s, d, port)
    ]
    assert not leaks, leaks


@needs_kubectl
@pytest.mark.parametrize("build", OVERLAY_NAMES)
def test_each_ray_cluster_reaches_only_itself(build):
    """The prep cluster's pods and the training cluster's talk among themselves on Ray's ports,
    never to each other's (two RayJobs' clusters share the namespace and its labels)."""
    policies = policies_of(build)
    prep, train = pods(build, "prep"), pods(build, "train")
    blocked, leaks = [], []
    for port in RAY_PORTS:
        for cluster in (prep, train):
            for src, dst in [("worker", "head"), ("head", "worker"), ("worker", "worker")]:
                if not allowed(policies, cluster[src], cluster[dst], port):
                    blocked.append(f"{cluster[src].name} -> {cluster[dst].name}:{port}")
        for a, b in [(prep, train), (train, prep)]:
            for src in ("head", "worker"):
                for dst in ("head", "worker"):
                    if allowed(policies, a[src], b[dst], port):
                        leaks.append(f"{a[src].name} -> {b[dst].name}:{port}")
    assert not blocked, blocked
    assert not leaks, leaks


@needs_kubectl
@pytest.mark.parametrize("t", built(RAY_NODES), ids=template_id)
def test_prometheus_reaches_every_metrics_port(t):
    """Every port a Ray container names for metrics (metrics, dash-metrics on the head, metrics-N
    on a training worker) is open to Prometheus, and to no other pod of its namespace."""
    build = t.source.split(":")[0]
    pod = Peer(template_id(t), t.labels())
    ports = {p["name"]: p["containerPort"] for p in t.ray_container.get("ports", [])}
    metrics = {name: port for name, port in ports.items() if "metrics" in name}
    assert "metrics" in metrics
    if t.role == "head":
        assert metrics["dash-metrics"] == DASHBOARD_METRICS_PORT
    for name, port in metrics.items():
        assert allowed(policies_of(build), OUTSIDERS["prometheus"], pod, port), name
        assert not allowed(policies_of(build), OUTSIDERS["other monitoring pod"], pod, port), name


def irsa_account(build: str) -> str | None:
    """The name of the build's ServiceAccount with an IAM role (IRSA), if it has one."""
    for account in docs_of(build, "ServiceAccount"):
        if ROLE_ARN in account["metadata"].get("annotations", {}):
            return account["metadata"]["name"]
    return None


@needs_kubectl
def test_irsa_pods_reach_sts_and_the_pod_identity_agent():
    """overlays/gpu's IAM role works: the pods of its ServiceAccount reach STS
    (AssumeRoleWithWebIdentity) and the EKS Pod Identity agent; the submitter, which needs no AWS
    credentials, reaches neither."""
    build = "overlays/gpu"
    account = irsa_account(build)
    assert account, "overlays/gpu shows IRSA"
    policies = policies_of(build)
    users = [
        t
        for t in TEMPLATES
        if t.source.startswith(build + ":") and t.spec.get("serviceAccountName") == account
    ]
    assert {t.role for t in users} == {"head", "worker"}
    agents = [Peer("pod identity agent", ip=ip) for ip in POD_IDENTITY_AGENT]
    for t in users:
        pod = Peer(template_id(t), t.labels())
        assert allowed(policies, pod, OUTSIDERS["sts"], 443), template_id(t)
        assert not allowed(policies, pod, OUTSIDERS["sts"], 80), template_id(t)
        for agent in agents:
            assert allowed(policies, pod, agent, 80), (template_id(t), agent.ip)
    submitter = pods(build)["submitter"]
    assert not allowed(policies, submitter, OUTSIDERS["sts"], 443)
    assert not [a.ip for a in agents if allowed(policies, submitter, a, 80)]


@needs_kubectl
@pytest.mark.parametrize("build", OVERLAY_NAMES)
def test_no_policy_opens_a_port_to_everyone(build):
    """Every ingress rule names its peers: an empty `from` would let any pod of any namespace in."""
    for policy in policies_of(build):
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), policy["metadata"]["name"]
        for rule in policy["spec"].get("egress", []):
            assert rule.get("to"), policy["metadata"]["name"]
            for peer in rule["to"]:
                cidr = peer.get("ipBlock", {}).get("cidr", "")
                assert not cidr.endswith("/0"), f"{policy['metadata']['name']}: {cidr}"


def test_evaluator_denies_without_a_rule_and_allows_with_one():
    """The evaluator itself: a pod under a default deny is closed until a rule names its peer."""
    a, b = Peer("a", {"app": "a"}), Peer("b", {"app": "b"})
    deny = {"metadata": {}, "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}}
    assert allowed([], a, b, 80)
    assert not allowed([deny], a, b, 80)
    egress = {
        "metadata": {},
        "spec": {
            "podSelector": {"matchLabels": {"app": "a"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "b"}}}]}],
        },
    }
    ingress = {
        "metadata": {},
        "spec": {
            "podSelector": {"matchLabels": {"app": "b"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"app": "a"}}}],
                    "ports": [{"port": 80, "endPort": 81}],
                }
            ],
        },
    }
    assert not allowed([deny, egress], a, b, 80)
    assert allowed([deny, egress, ingress], a, b, 81)
    assert not allowed([deny, egress, ingress], a, b, 82)
    assert not allowed([deny, egress, ingress], b, a, 80)
    assert not allowed([deny, egress, ingress], a, b, 80, "UDP")
