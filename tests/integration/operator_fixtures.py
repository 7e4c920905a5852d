"""Fixtures that install the CRDs and run the operator against the test cluster.

The operator runs as a subprocess (`python -m lorafleet.cli operator`), exactly as in its container, so a test
can stop and restart it. It watches the whole cluster; tests work in their own namespaces.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from lorafleet import GROUP, VERSION
from lorafleet.storage import ArtifactStore, VersionFolder
from lorafleet_dev.kwok import GPU_PRODUCT
from lorafleet_dev.operator import OperatorProcess, install_crds
from lorafleet_dev.s3server import S3Server
from lorafleet_dev.testing import ClusterHandle, wait_until
from tests.integration.conftest import SESSION_PREFIX

MODEL_URI = "s3://models/tiny-llama/r1"
ADAPTER_ROOT = "s3://lorafleet"
# The session operator's prices (status.usage.estimatedCost): kwok's GPU nodes are H100s.
PRICING = {"currency": "USD", "gpuHour": {GPU_PRODUCT: 3.6, "default": 1.0}, "cpuHour": 0.36}


@pytest.fixture(scope="session")
def crds(cluster: ClusterHandle) -> None:
    install_crds(cluster)


@pytest.fixture(scope="session")
def stored_model(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A (tiny, fake) base model version in the store: the operator verifies its manifest, nothing loads it."""
    for bucket in ("models", "lorafleet"):
        s3_server.create_bucket(bucket)
    folder = tmp_path_factory.mktemp("model")
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    result = ArtifactStore(s3_server.store_settings()).push(
        folder, VersionFolder.parse(MODEL_URI), kind="model", name="tiny-llama", version="r1"
    )
    return str(result.digest)


@pytest.fixture(scope="session")
def operator(
    cluster: ClusterHandle,
    crds: None,
    s3_server: S3Server,
    stored_model: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    env = {
        **s3_server.env(),
        "LORAFLEET_STORE_URI": ADAPTER_ROOT,
        "LORAFLEET_RESYNC_SECONDS": "3",
        "LORAFLEET_NAMESPACES": json.dumps([f"{SESSION_PREFIX}-*"]),  # this session's namespaces only
        "LORAFLEET_PRICING": json.dumps(PRICING),
    }
    op = OperatorProcess(cluster.kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log", env)
    op.start()
    time.sleep(1)
    assert op.alive(), f"the operator exited at start:\n{op.log_tail()}"
    yield op
    op.stop()


class Custom:
    """Create, read and wait on lorafleet objects in one namespace."""

    def __init__(self, cluster: ClusterHandle, namespace: str) -> None:
        self.api = client.CustomObjectsApi(cluster.api_client)
        self.namespace = namespace

    @staticmethod
    def plural(kind: str) -> str:
        return kind.lower() + "s"

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self.api.create_namespaced_custom_object(  # type: ignore[no-any-return]
            GROUP, VERSION, self.namespace, self.plural(obj["kind"]), obj, field_validation="Strict"
        )

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        try:
            return self.api.get_namespaced_custom_object(  # type: ignore[no-any-return]
                GROUP, VERSION, self.namespace, self.plural(kind), name
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def patch(self, kind: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self.api.patch_namespaced_custom_object(  # type: ignore[no-any-return]
            GROUP, VERSION, self.namespace, self.plural(kind), name, patch
        )

    def delete(self, kind: str, name: str) -> None:
        self.api.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, self.plural(kind), name)

    def wait_status(self, kind: str, name: str, predicate: Any, timeout: float = 60, what: str = "") -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            obj = self.get(kind, name)
            return obj if obj is not None and predicate(obj.get("status") or {}, obj) else None

        return wait_until(probe, timeout=timeout, interval=0.5, what=what or f"{kind}/{name} status")


def condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), None)


# -- leader election (test_leader_election.py, test_reliability.py) ---------------------------------------------

LEASE = "lorafleet-operator"
LEASE_DURATION, RENEW_DEADLINE, RETRY_PERIOD = 4, 3, 1  # seconds: short, so that takeovers are quick to test


def election_env(pod_name: str, namespace: str) -> dict[str, str]:
    """An operator replica's environment with leader election on, named like a pod, its Lease in `namespace`."""
    return {
        "POD_NAME": pod_name,
        "LORAFLEET_LEADER_ELECTION": "true",
        "LORAFLEET_LEADER_ELECTION_LEASE_DURATION": str(LEASE_DURATION),
        "LORAFLEET_LEADER_ELECTION_RENEW_DEADLINE": str(RENEW_DEADLINE),
        "LORAFLEET_LEADER_ELECTION_RETRY_PERIOD": str(RETRY_PERIOD),
        "LORAFLEET_OPERATOR_NAMESPACE": namespace,
    }


def lease_holder(cluster: ClusterHandle, namespace: str) -> str | None:
    """Who holds the operator's Lease in `namespace` (None: no Lease, or released)."""
    try:
        lease = client.CoordinationV1Api(cluster.api_client).read_namespaced_lease(LEASE, namespace)
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    return lease.spec.holder_identity if lease.spec else None
