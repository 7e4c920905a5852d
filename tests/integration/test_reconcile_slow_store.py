"""A store endpoint that accepts connections and never answers delays only the objects that use it: their check
gives up within the operator's bounds (connect 3 s, read 10 s, 2 attempts) and becomes a StoreUnavailable
condition, while other objects keep reconciling at their normal pace on the other queue workers."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lorafleet_dev.testing import ClusterHandle
from tests.integration.operator_fixtures import MODEL_URI, Custom, OperatorProcess, condition
from tests.unit import objects


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A TCP port that completes the handshake (the kernel's backlog) and never sends a byte."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()


def _base_model(namespace: str, name: str, **source: Any) -> dict[str, Any]:
    bm = objects.base_model()
    bm["metadata"] = {"name": name, "namespace": namespace}
    bm["spec"] = {**bm["spec"], "source": {"uri": MODEL_URI, **source}}
    return bm


def test_a_hanging_store_delays_only_its_own_objects(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, silent_endpoint: str
) -> None:
    custom = Custom(cluster, namespace)
    custom.create(_base_model(namespace, "hung", store={"endpoint": silent_endpoint}))
    time.sleep(0.5)  # its check is under way

    started = time.monotonic()
    custom.create(_base_model(namespace, "tiny-llama"))
    ftj = objects.fine_tune_job(name="support")
    ftj["metadata"] = {"name": "support", "namespace": namespace}
    ftj["spec"]["resources"] = {
        "gpusPerNode": 1,
        "cpu": 1,
        "memory": "1Gi",
        "podAnnotations": {"lorafleet.io/kwok-duration": "600s"},
    }
    custom.create(ftj)
    custom.wait_status("BaseModel", "tiny-llama", lambda s, o: s.get("phase") == "Ready", timeout=15)
    custom.wait_status("FineTuneJob", "support", lambda s, o: s.get("phase") == "Running", timeout=30)
    others = time.monotonic() - started
    hung = custom.get("BaseModel", "hung")
    assert hung is not None
    assert (hung.get("status") or {}).get("phase") != "Ready"

    unavailable = custom.wait_status(
        "BaseModel",
        "hung",
        lambda s, o: (condition(s, "Ready") or {}).get("reason") == "StoreUnavailable",
        timeout=90,
        what="the hanging store reported as StoreUnavailable",
    )
    assert unavailable["status"]["phase"] == "Pending"
    assert others < 30, f"other objects took {others:.1f} s while a store hung"
