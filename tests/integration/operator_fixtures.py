"""Fixtures that install the CRDs and run the operator against the test cluster.

The operator runs as a subprocess (`python -m lorafleet.cli operator`), exactly as in its container, so a test
can stop and restart it. It watches the whole cluster; tests work in their own namespaces.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from lorafleet import GROUP, VERSION
from lorafleet.dev.testing import ClusterHandle, wait_until

REPO = Path(__file__).resolve().parents[2]
RESYNC_SECONDS = "3"


def install_crds(cluster: ClusterHandle) -> None:
    ext = client.ApiextensionsV1Api(cluster.api_client)
    for path in sorted((REPO / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        ext.patch_custom_resource_definition(
            crd["metadata"]["name"],
            crd,
            field_manager="lorafleet-tests",
            force=True,
            _content_type="application/apply-patch+yaml",
        )

    def established() -> bool:
        for path in (REPO / "crds").glob("*.yaml"):
            name = yaml.safe_load(path.read_text())["metadata"]["name"]
            conditions = ext.read_custom_resource_definition(name).status.conditions or []
            if not any(c.type == "Established" and c.status == "True" for c in conditions):
                return False
        return True

    wait_until(established, timeout=30, what="CRDs Established")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OperatorProcess:
    """The operator as a subprocess, with its log kept for failure reports."""

    def __init__(self, kubeconfig: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "LORAFLEET_RESYNC_SECONDS": RESYNC_SECONDS,
            "LORAFLEET_STORE_ENDPOINT": "http://s3.lorafleet-tests.invalid:9000",
            "LORAFLEET_STORE_URI": "s3://lorafleet",
            "LORAFLEET_LOG_FORMAT": "text",
            "LORAFLEET_METRICS_PORT": str(_free_port()),
            "LORAFLEET_HEALTH_PORT": str(_free_port()),
            **self.extra_env,
        }
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lorafleet.cli", "operator"], env=env, stdout=log, stderr=subprocess.STDOUT
        )

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="session")
def crds(cluster: ClusterHandle) -> None:
    install_crds(cluster)


@pytest.fixture(scope="session")
def operator(cluster: ClusterHandle, crds: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    op = OperatorProcess(cluster.kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log")
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
