"""Helpers shared by the child-object builders: names, labels, owner references, pod hardening, env.

Everything here is pure: typed owners in, Kubernetes objects (dicts) out.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from lorafleet.api.common import ObjectStore, S3CredentialsRef, Toleration
from lorafleet.api.objects import CustomResource

Obj = dict[str, Any]

MANAGED_BY = "lorafleet"
LABEL_PREFIX = "lorafleet.io"
PART_OF = "app.kubernetes.io/part-of"
COMPONENT = "app.kubernetes.io/component"
INSTANCE = "app.kubernetes.io/instance"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
SPEC_HASH = f"{LABEL_PREFIX}/spec-hash"

OFFLINE_ENV = [{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "TRANSFORMERS_OFFLINE", "value": "1"}]


# Kubernetes limits: a DNS-1123/1035 label (Service names, pod hostnames) and a label value.
DNS_LABEL_MAX = 63
LABEL_VALUE_MAX = 63


def child_name(owner_name: str, suffix: str, limit: int = DNS_LABEL_MAX) -> str:
    """Deterministic child name `<owner>-<suffix>`, shortened with a hash when over the limit."""
    name = f"{owner_name}-{suffix}"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    head = owner_name[: limit - len(suffix) - len(digest) - 2].rstrip("-.")
    return f"{head}-{digest}-{suffix}"


def fit(value: str, limit: int = DNS_LABEL_MAX) -> str:
    """`value` itself when it fits the limit, else its head and a hash of the whole: deterministic, distinct for
    distinct values, and still starting and ending with an alphanumeric (a name's first and last characters are)."""
    if len(value) <= limit:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:10]
    return f"{value[: limit - len(digest) - 1].rstrip('-.')}-{digest}"


def label_value(name: str) -> str:
    """An object's name as a label value (at most 63 characters; names may have up to 253)."""
    return fit(name, LABEL_VALUE_MAX)


def labels(kind: str, name: str, component: str) -> dict[str, str]:
    value = label_value(name)
    return {
        PART_OF: "lorafleet",
        MANAGED_BY_LABEL: MANAGED_BY,
        COMPONENT: component,
        INSTANCE: value,
        f"{LABEL_PREFIX}/{kind.lower()}": value,
    }


def owner_reference(owner: CustomResource) -> Obj:
    """Controller owner reference so the garbage collector removes children with their owner."""
    return {
        "apiVersion": owner.api_version,
        "kind": owner.kind,
        "name": owner.metadata.name,
        "uid": owner.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def object_meta(owner: CustomResource, name: str, component: str, extra_labels: dict[str, str] | None = None) -> Obj:
    return {
        "name": name,
        "namespace": owner.metadata.namespace,
        "labels": {**labels(owner.kind, owner.metadata.name, component), **(extra_labels or {})},
        "ownerReferences": [owner_reference(owner)],
    }


def spec_hash(value: Any) -> str:
    """Short stable hash of a JSON-able value, to detect drift of what we rendered."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pod_security_context() -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context(read_only_root: bool = True) -> Obj:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": read_only_root,
        "capabilities": {"drop": ["ALL"]},
    }


def tolerations(items: list[Toleration]) -> list[Obj]:
    return [t.model_dump(by_alias=True, exclude_none=True) for t in items]


def resource_requirements(cpu: int | str | None, memory: int | str | None, gpus: int) -> Obj:
    """Requests equal limits: training and serving should not be throttled or evicted first."""
    amounts: dict[str, str] = {}
    if cpu is not None:
        amounts["cpu"] = str(cpu)
    if memory is not None:
        amounts["memory"] = str(memory)
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def offline_env(allow_public_download: bool) -> list[Obj]:
    """Hub access is off unless the BaseModel explicitly allows it: data and weights stay on premises."""
    return [] if allow_public_download else [dict(e) for e in OFFLINE_ENV]


def store_env(store: ObjectStore | None, prefix: str = "LORAFLEET_STORE", *, platform: bool = False) -> list[Obj]:
    """Store settings as env; credentials only by secretKeyRef, never by value. A store that names no Secret
    and is not the platform's default store is reached unsigned: the pod's ambient credentials (node or
    workload identity) belong to the platform, not to whoever named the endpoint."""
    if store is None:
        return []
    env: list[Obj] = [
        {"name": f"{prefix}_ENDPOINT", "value": store.endpoint},
        {"name": f"{prefix}_REGION", "value": store.region},
    ]
    if store.insecure_skip_tls_verify:
        env.append({"name": f"{prefix}_INSECURE_SKIP_TLS_VERIFY", "value": "true"})
    if store.server_side_encryption:
        env.append({"name": f"{prefix}_SSE", "value": store.server_side_encryption})
    if not store.checksum_headers:
        env.append({"name": f"{prefix}_CHECKSUM_HEADERS", "value": "false"})
    if store.credentials_secret_ref is not None:
        env.extend(credentials_env(store.credentials_secret_ref))
    elif not platform:
        env.append({"name": f"{prefix}_ANONYMOUS", "value": "true"})
    return env


def credentials_env(ref: S3CredentialsRef) -> list[Obj]:
    return [
        {
            "name": "AWS_ACCESS_KEY_ID",
            "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.access_key_id_key}},
        },
        {
            "name": "AWS_SECRET_ACCESS_KEY",
            "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.secret_access_key_key}},
        },
    ]


def ca_bundle_volume(store: ObjectStore | None, volume: str = "store-ca") -> tuple[list[Obj], list[Obj], list[Obj]]:
    """(volumes, mounts, env) that make a custom CA bundle visible to boto3 (at /etc/lorafleet/<volume>/ca.pem)."""
    if store is None or store.ca_bundle_secret_ref is None:
        return [], [], []
    ref = store.ca_bundle_secret_ref
    path = f"/etc/lorafleet/{volume}"
    secret = {"name": volume, "secret": {"secretName": ref.name, "items": [{"key": ref.key, "path": "ca.pem"}]}}
    mount = {"name": volume, "mountPath": path, "readOnly": True}
    env = [{"name": "AWS_CA_BUNDLE", "value": f"{path}/ca.pem"}]
    return [secret], [mount], env


NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set by the API server on every namespace
DEFAULT_DNS_LABELS = {"k8s-app": "kube-dns"}


def namespace_peer(namespace: str) -> Obj:
    """A NetworkPolicy peer: every pod of one namespace, by the label the API server maintains (immutable)."""
    return {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: namespace}}}


def egress_network_policy(
    owner: CustomResource,
    name: str,
    component: str,
    pod_labels: dict[str, str],
    egress_cidrs: list[str],
    *,
    dns_namespace: str = "kube-system",
    dns_pod_labels: dict[str, str] | None = None,
) -> Obj:
    """Deny all egress from the workload's pods except the cluster DNS and the listed CIDRs (API server, store),
    and all ingress except from the workload's own pods (torchrun rendezvous; serving adds its own policy).

    DNS is the cluster DNS pods in their namespace only: a namespace selector and a pod selector in the same peer
    (both must match), so no tenant can attract port-53 traffic with a pod labelled like kube-dns.
    """
    dns_peer = {
        **namespace_peer(dns_namespace),
        "podSelector": {"matchLabels": dict(dns_pod_labels if dns_pod_labels is not None else DEFAULT_DNS_LABELS)},
    }
    egress: list[Obj] = [
        {"to": [dns_peer], "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
        # Pods of the same workload talk to each other (torchrun rendezvous, NCCL/gloo).
        {"to": [{"podSelector": {"matchLabels": pod_labels}}]},
    ]
    if egress_cidrs:
        egress.append({"to": [{"ipBlock": {"cidr": cidr}} for cidr in egress_cidrs]})
    ingress: list[Obj] = [{"from": [{"podSelector": {"matchLabels": pod_labels}}]}]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_meta(owner, name, component),
        "spec": {
            "podSelector": {"matchLabels": pod_labels},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress,
            "egress": egress,
        },
    }
