"""Fixtures for end-to-end tests on a real node (docs/dev/node.md).

* ``node`` (session): the local cluster (the ``cluster`` fixture of tests/integration) plus a real node
  (``lorafleet_dev.node``: containerd, kubelet, kube-proxy, CoreDNS), started if needed and stopped at the
  end unless ``hack/node up`` started it or ``LORAFLEET_KEEP_NODE=1``. If it cannot start, the tests FAIL;
  ``LORAFLEET_SKIP_E2E=1`` skips them instead. Needs root (the node runs containers).
* ``cluster`` and ``namespace``: the fixtures of tests/integration/conftest.py.

Every test in this directory is marked ``e2e``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from lorafleet_dev.testing import ClusterHandle, wait_until
from tests.integration.conftest import cluster, namespace  # noqa: F401  (fixtures used by the e2e tests)

HERE = Path(__file__).parent
SKIP = os.environ.get("LORAFLEET_SKIP_E2E") == "1"
_build_errors: list[str] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.e2e)
            if SKIP:
                item.add_marker(pytest.mark.skip(reason="LORAFLEET_SKIP_E2E=1"))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build every binary before any test runs, so a cold build (minutes) is not cut by pytest-timeout."""
    if SKIP or not any(HERE in item.path.parents for item in session.items):
        return
    from lorafleet_dev.node import LocalNode

    capture = session.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(
            "\ne2e: building the node's binaries and lorafleet's images with buildah (cached: seconds when nothing "
            "changed; a first run takes 20 to 30 minutes)",
            file=sys.stderr,
            flush=True,
        )
        try:
            LocalNode().build()
            # lorafleet's images (minutes on a fresh machine); the node fixture imports them into containerd.
            from lorafleet_dev import images
            from lorafleet_dev.loop import LOOP_IMAGES

            for name in LOOP_IMAGES:
                images.build(name)
        except Exception as e:  # reported by the node fixture, as a failure
            _build_errors.append(str(e))


@dataclass
class NodeHandle:
    """What the ``node`` fixture returns."""

    name: str
    ip: str
    cluster: ClusterHandle
    kubectl: Path
    busybox: str  # image reference of the local busybox image

    def pod(
        self,
        name: str,
        command: list[str],
        *,
        labels: dict[str, str] | None = None,
        restart: str = "Never",
        ports: list[int] | None = None,
    ) -> dict[str, Any]:
        """A busybox pod pinned to the real node (image never pulled)."""
        from lorafleet_dev.node import NODE_POOL, NODE_POOL_LABEL, TAINT_KEY

        container: dict[str, Any] = {
            "name": "main",
            "image": self.busybox,
            "imagePullPolicy": "Never",
            "command": command,
        }
        if ports:
            container["ports"] = [{"containerPort": p} for p in ports]
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {
                "restartPolicy": restart,
                "terminationGracePeriodSeconds": 1,
                "nodeSelector": {NODE_POOL_LABEL: NODE_POOL},
                "tolerations": [{"key": TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
                "containers": [container],
            },
        }

    def create_pod(self, ns: str, pod: dict[str, Any]) -> None:
        self.cluster.core.create_namespaced_pod(ns, pod)

    def phase(self, ns: str, name: str) -> str:
        return str(self.cluster.core.read_namespaced_pod(name, ns).status.phase)

    def wait_phase(self, ns: str, name: str, phases: tuple[str, ...], timeout: float = 90) -> str:
        def probe() -> str | None:
            pod: client.V1Pod = self.cluster.core.read_namespaced_pod(name, ns)
            if pod.status.phase in phases:
                return str(pod.status.phase)
            for cs in pod.status.container_statuses or []:
                waiting = cs.state.waiting
                if waiting and waiting.reason in ("ErrImageNeverPull", "CreateContainerError", "InvalidImageName"):
                    raise AssertionError(f"pod {ns}/{name}: {waiting.reason}: {waiting.message}")
            return None

        return wait_until(probe, timeout=timeout, interval=0.5, what=f"pod {ns}/{name} in {phases}")

    def logs(self, ns: str, name: str) -> str:
        return str(self.cluster.core.read_namespaced_pod_log(name, ns))

    def run(self, ns: str, name: str, script: str, timeout: float = 90) -> tuple[str, str]:
        """Run a shell script in a new pod on the node; returns (final phase, logs)."""
        self.create_pod(ns, self.pod(name, ["sh", "-c", script]))
        phase = self.wait_phase(ns, name, ("Succeeded", "Failed"), timeout)
        return phase, self.logs(ns, name)

    def kubectl_run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.kubectl), f"--kubeconfig={self.cluster.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )


@pytest.fixture(scope="session")
def node(cluster: ClusterHandle) -> Iterator[NodeHandle]:  # noqa: F811  (the imported fixture)
    if not cluster.local:
        pytest.fail("the e2e tests run on the local cluster's real node (LORAFLEET_CLUSTER=external is not supported)")
    from lorafleet_dev.cluster import LocalCluster
    from lorafleet_dev.node import BUSYBOX_IMAGE, NODE_IP, NODE_NAME, LocalNode

    local = LocalNode(LocalCluster())
    try:
        if _build_errors:
            raise RuntimeError(_build_errors[0])
        started = local.up()
        from lorafleet_dev.loop import ensure_images

        ensure_images()  # imports what containerd does not hold yet; pods never pull
    except Exception as e:  # not root, packages missing, a component that did not start
        pytest.fail(
            f"could not start the real node: {e}\n"
            "Run `sudo hack/node up` to see why (docs/dev/node.md), or set LORAFLEET_SKIP_E2E=1 to skip the e2e tests.",
            pytrace=False,
        )
    try:
        yield NodeHandle(NODE_NAME, NODE_IP, cluster, local.builder.path("kubectl"), BUSYBOX_IMAGE)
    finally:
        if started and os.environ.get("LORAFLEET_KEEP_NODE") != "1":
            local.down()
