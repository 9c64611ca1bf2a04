"""deploy/: the NetworkPolicies of every overlay, evaluated: a default deny, and then exactly the
flows deploy/base/networkpolicy.yaml documents (DNS, Ray among Ray pods but never Ray Client,
the job submitter and the KubeRay operator to the dashboard, Prometheus to the metrics ports, the
Ray pods to S3), and nothing else: not another pod of the namespace, not another namespace, not
the internet.

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
    TEMPLATES,
    docs_of,
    needs_kubectl,
    selects,
)

MONITORING = "monitoring"
OPERATOR_NAMESPACE = "kuberay-system"
S3_PLACEHOLDER = "198.51.100.7"  # inside the overlays' placeholder S3 range
INTERNET = "93.184.216.34"
RAY_CLIENT_PORT = 10001


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


def pods(build: str) -> dict[str, Peer]:
    """One Peer per role of the build's train job (and MinIO's pods where the build has them)."""
    found: dict[str, Peer] = {}
    for t in TEMPLATES:
        if not t.source.startswith(build + ":"):
            continue
        if t.component in ("train", "ray-job-submitter") and "metatrainer-train" in t.source:
            found.setdefault(t.role, Peer(t.role, t.labels()))
        elif t.component in ("minio", "minio-setup"):
            found[t.component] = Peer(t.component, t.labels())
    return found


OUTSIDERS = {
    "same-namespace pod": Peer("stranger", {"app": "other"}),
    "other-namespace pod": Peer("other", {"app.kubernetes.io/part-of": "metatrainer"}, "other"),
    "prometheus": Peer("prometheus", {"app.kubernetes.io/name": "prometheus"}, MONITORING),
    "kuberay operator": Peer(
        "operator", {"app.kubernetes.io/name": "kuberay-operator"}, OPERATOR_NAMESPACE
    ),
    "allowed namespace": Peer(
        "notebook", {"app": "jupyter"}, "research", {"metatrainer.io/ray-dashboard": "allowed"}
    ),
    "kube-dns": Peer("kube-dns", {"k8s-app": "kube-dns"}, "kube-system"),
    "s3": Peer("s3", ip=S3_PLACEHOLDER),
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
        (o["allowed namespace"], p["head"], 8265, "TCP"),
        (o["prometheus"], p["head"], 8080, "TCP"),
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
        # Nothing leaves for the internet, not even DNS elsewhere; the submitter needs no S3.
        (p["head"], o["internet"], 443),
        (p["worker"], o["internet"], 443),
        (p["worker"], o["internet"], 53),
        (p["submitter"], o["s3"], 443),
        (p["submitter"], p["worker"], 6379),
    ]
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
