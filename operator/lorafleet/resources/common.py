"""Helpers shared by the child-object builders: names, labels, owner references, pod hardening, env.

Everything here is pure: dicts in, dicts out.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from lorafleet import API_VERSION
from lorafleet.api.common import ObjectStore, S3CredentialsRef, Toleration

Obj = dict[str, Any]

MANAGED_BY = "lorafleet"
LABEL_PREFIX = "lorafleet.io"
PART_OF = "app.kubernetes.io/part-of"
COMPONENT = "app.kubernetes.io/component"
INSTANCE = "app.kubernetes.io/instance"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
SPEC_HASH = f"{LABEL_PREFIX}/spec-hash"

OFFLINE_ENV = [{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "TRANSFORMERS_OFFLINE", "value": "1"}]


def child_name(owner_name: str, suffix: str, limit: int = 63) -> str:
    """Deterministic child name `<owner>-<suffix>`, shortened with a hash when over the limit."""
    name = f"{owner_name}-{suffix}"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    head = owner_name[: limit - len(suffix) - len(digest) - 2].rstrip("-.")
    return f"{head}-{digest}-{suffix}"


def labels(kind: str, name: str, component: str) -> dict[str, str]:
    return {
        PART_OF: "lorafleet",
        MANAGED_BY_LABEL: MANAGED_BY,
        COMPONENT: component,
        INSTANCE: name,
        f"{LABEL_PREFIX}/{kind.lower()}": name,
    }


def owner_reference(owner: Obj) -> Obj:
    """Controller owner reference so the garbage collector removes children with their owner."""
    meta = owner["metadata"]
    return {
        "apiVersion": owner.get("apiVersion", API_VERSION),
        "kind": owner["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def object_meta(owner: Obj, name: str, component: str, extra_labels: dict[str, str] | None = None) -> Obj:
    meta = owner["metadata"]
    return {
        "name": name,
        "namespace": meta["namespace"],
        "labels": {**labels(owner["kind"], meta["name"], component), **(extra_labels or {})},
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


def store_env(store: ObjectStore | None, prefix: str = "LORAFLEET_STORE") -> list[Obj]:
    """Store settings as env; credentials only by secretKeyRef, never by value."""
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


def ca_bundle_volume(store: ObjectStore | None) -> tuple[list[Obj], list[Obj], list[Obj]]:
    """(volumes, mounts, env) that make a custom CA bundle visible to boto3."""
    if store is None or store.ca_bundle_secret_ref is None:
        return [], [], []
    ref = store.ca_bundle_secret_ref
    volume = {"name": "store-ca", "secret": {"secretName": ref.name, "items": [{"key": ref.key, "path": "ca.pem"}]}}
    mount = {"name": "store-ca", "mountPath": "/etc/lorafleet/store-ca", "readOnly": True}
    env = [{"name": "AWS_CA_BUNDLE", "value": "/etc/lorafleet/store-ca/ca.pem"}]
    return [volume], [mount], env


def egress_network_policy(
    owner: Obj,
    name: str,
    component: str,
    pod_labels: dict[str, str],
    egress_cidrs: list[str],
    ingress_ports: list[int] | None = None,
) -> Obj:
    """Deny all egress from the workload's pods except DNS and the listed CIDRs (API server, store).

    Ingress is left open on the given ports only (serving); training pods accept traffic only from
    their own Job (rendezvous).
    """
    egress: list[Obj] = [
        {
            "to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
        },
        # Pods of the same workload talk to each other (torchrun rendezvous, NCCL/gloo).
        {"to": [{"podSelector": {"matchLabels": pod_labels}}]},
    ]
    if egress_cidrs:
        egress.append({"to": [{"ipBlock": {"cidr": cidr}} for cidr in egress_cidrs]})
    ingress: list[Obj] = [{"from": [{"podSelector": {"matchLabels": pod_labels}}]}]
    if ingress_ports:
        ingress.append({"ports": [{"protocol": "TCP", "port": p} for p in ingress_ports]})
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
