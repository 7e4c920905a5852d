"""Liveness fails when the work queue stops moving, and only then: the real operator process, against the real API
server, with a stall threshold (LORAFLEET_STALL_SECONDS) of 2 s, below the store check's read timeout (10 s, 2
attempts). A BaseModel whose store endpoint accepts connections and never answers keeps a worker in its reconcile
with nothing else finishing: /healthz answers 500 (kopf's answer when the "queue" probe raises PermanentError),
and 200 again once the store refuses connections, so that reconciles finish (with an error, which is progress).
A standby replica (leader election, the Lease held by someone else) answers 200 whatever the threshold.

The namespaces stay outside the glob the session's integration operator watches (<prefix>-*): only the operators
started here see their objects.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from lorafleet_dev.operator import OperatorProcess
from lorafleet_dev.s3server import S3Server
from lorafleet_dev.testing import ClusterHandle, wait_until
from tests.integration.operator_fixtures import ADAPTER_ROOT, MODEL_URI, Custom
from tests.unit import objects

STALL_SECONDS = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def healthz(port: int) -> tuple[int | None, str]:
    """(status, body) of GET /healthz; (None, why) when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError as e:
        return None, str(e)


class Operator:
    """An operator process of this test's own, watching one namespace, with a known health port."""

    def __init__(self, cluster: ClusterHandle, namespace: str, log: Path, **env: str) -> None:
        self.health_port = _free_port()
        self.process = OperatorProcess(
            cluster.kubeconfig,
            log,
            {
                "LORAFLEET_NAMESPACES": json.dumps([namespace]),
                "LORAFLEET_OPERATOR_NAMESPACE": namespace,
                "LORAFLEET_HEALTH_PORT": str(self.health_port),
                "LORAFLEET_STALL_SECONDS": str(STALL_SECONDS),
                "LORAFLEET_RESYNC_SECONDS": "600",
                **env,
            },
        )

    def __enter__(self) -> Operator:
        self.process.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.process.stop()

    def health(self) -> tuple[int | None, str]:
        return healthz(self.health_port)

    def wait_health(self, status: int, timeout: float, what: str) -> str:
        def probe() -> str | None:
            assert self.process.alive(), f"the operator exited:\n{self.process.log_tail()}"
            code, body = self.health()
            return body if code == status else None

        try:
            return wait_until(probe, timeout=timeout, interval=0.5, what=what)
        except Exception as e:
            raise AssertionError(f"{e}; last /healthz {self.health()}\n{self.process.log_tail()}") from e


@pytest.fixture
def silent_server() -> Iterator[socket.socket]:
    """A TCP port that completes the handshake (the kernel's backlog) and never sends a byte."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    try:
        yield server
    finally:
        server.close()


def test_a_stalled_queue_fails_healthz_until_reconciles_finish_again(
    cluster: ClusterHandle,
    crds: None,
    s3_server: S3Server,
    private_namespace: str,
    silent_server: socket.socket,
    tmp_path: Path,
) -> None:
    env = {**s3_server.env(), "LORAFLEET_STORE_URI": ADAPTER_ROOT}
    with Operator(cluster, private_namespace, tmp_path / "operator.log", **env) as op:
        body = op.wait_health(200, timeout=60, what="/healthz of a healthy operator")
        queue = json.loads(body)["queue"]
        assert set(queue) == {"depth", "active", "overdue", "secondsSinceProgress"}
        assert queue["active"] == queue["overdue"] == 0

        # An idle queue stays live well past the threshold (kopf caches a success for 10 s: ask again after that).
        time.sleep(STALL_SECONDS + 10.5)
        assert op.health()[0] == 200

        endpoint = f"http://127.0.0.1:{silent_server.getsockname()[1]}"
        bm = objects.base_model()
        bm["metadata"] = {"name": "hung", "namespace": private_namespace}
        bm["spec"] = {**bm["spec"], "source": {"uri": MODEL_URI, "store": {"endpoint": endpoint}}}
        Custom(cluster, private_namespace).create(bm)

        # The check hangs for 2 x 10 s; the stall shows once kopf's cached success (10 s) has expired.
        started = time.monotonic()
        failing = op.wait_health(500, timeout=45, what="/healthz failing while the queue is stalled")
        assert time.monotonic() - started >= STALL_SECONDS
        assert "Internal Server Error" in failing
        assert "work queue stalled: no reconcile finished for" in op.process.log_path.read_text(errors="replace")
        assert op.process.alive()  # the kubelet restarts the pod; the operator itself goes on

        # The store now refuses connections (and resets those waiting): each check fails at once, the queue moves.
        silent_server.close()
        op.wait_health(200, timeout=60, what="/healthz passing again once reconciles finish")
        for _ in range(4):  # and it stays live while the BaseModel's failing checks back off
            time.sleep(1)
            assert op.health()[0] == 200


def test_a_standby_stays_live_whatever_the_stall_threshold(
    cluster: ClusterHandle, crds: None, private_namespace: str, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    lease = client.V1Lease(
        metadata=client.V1ObjectMeta(name="lorafleet-operator", namespace=private_namespace),
        spec=client.V1LeaseSpec(
            holder_identity="someone-else", lease_duration_seconds=3600, acquire_time=now, renew_time=now
        ),
    )
    client.CoordinationV1Api(cluster.api_client).create_namespaced_lease(private_namespace, lease)
    election = {
        "POD_NAME": "standby-0",
        "LORAFLEET_LEADER_ELECTION": "true",
        # Long enough that the unrenewed Lease is not taken over during the test.
        "LORAFLEET_LEADER_ELECTION_LEASE_DURATION": "120",
        "LORAFLEET_LEADER_ELECTION_RENEW_DEADLINE": "60",
        "LORAFLEET_LEADER_ELECTION_RETRY_PERIOD": "2",
    }
    with Operator(cluster, private_namespace, tmp_path / "standby.log", **election) as op:
        body = op.wait_health(200, timeout=60, what="/healthz of the standby")
        assert json.loads(body) == {"leader": False}
        deadline = time.monotonic() + 3 * STALL_SECONDS + 2
        while time.monotonic() < deadline:
            assert op.health() == (200, body)
            time.sleep(0.5)
        assert "leading:" not in op.process.log_path.read_text(errors="replace")
