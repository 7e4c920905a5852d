"""Fixtures for tests against a real Kubernetes API server (docs/dev/cluster.md).

* ``cluster`` (session): by default uses the local control plane of ``lorafleet_dev.cluster`` (built from
  source on first use, then cached), starting it if needed. At the end it is stopped unless ``hack/cluster up``
  started it, another pytest session still uses it, or ``LORAFLEET_KEEP_CLUSTER=1``.
  With ``LORAFLEET_CLUSTER=external`` it uses ``$KUBECONFIG`` as is.
  If the cluster cannot be started the tests FAIL; ``LORAFLEET_SKIP_INTEGRATION=1`` skips them instead.
* ``namespace``: a fresh namespace per test (with its default ServiceAccount), deleted afterwards.

Every test in this directory is marked ``integration``.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from lorafleet_dev.testing import ClusterHandle, wait_until

HERE = Path(__file__).parent
# Test sessions may share one cluster (it is reused when already up): each session's namespaces carry its own
# prefix, and its operator watches only those (operator_fixtures.py), so two sessions never reconcile each
# other's objects.
SESSION_PREFIX = f"t{uuid.uuid4().hex[:5]}"
SKIP = os.environ.get("LORAFLEET_SKIP_INTEGRATION") == "1"
EXTERNAL = os.environ.get("LORAFLEET_CLUSTER") == "external"
_build_errors: list[str] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)
            if SKIP:
                item.add_marker(pytest.mark.skip(reason="LORAFLEET_SKIP_INTEGRATION=1"))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build missing binaries before any test runs, so a cold build (minutes) is not cut by pytest-timeout."""
    if SKIP or EXTERNAL or not any(HERE in item.path.parents for item in session.items):
        return
    from lorafleet_dev.cluster import LocalCluster

    capture = session.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        try:
            LocalCluster().binaries()
        except Exception as e:  # reported by the cluster fixture, as a failure
            _build_errors.append(str(e))


@pytest.fixture(scope="session")
def cluster() -> Iterator[ClusterHandle]:
    if EXTERNAL:
        paths = os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)
        kubeconfig = Path(paths[0]).expanduser()
        api = config.new_client_from_config()  # honours every path in $KUBECONFIG
        yield ClusterHandle(kubeconfig, api, local=False)
        api.close()
        return

    from lorafleet_dev.cluster import LocalCluster

    local = LocalCluster()  # LORAFLEET_CLUSTER_NAME picks another one (default "lorafleet")
    try:
        if _build_errors:
            raise RuntimeError(_build_errors[0])
        local.acquire()
    except Exception as e:  # a missing Go toolchain, a failed build, a component that did not start
        pytest.fail(
            f"could not start the local Kubernetes cluster: {e}\n"
            "Run `hack/cluster up` to see why, use LORAFLEET_CLUSTER=external with a KUBECONFIG, "
            "or set LORAFLEET_SKIP_INTEGRATION=1 to skip the integration tests.",
            pytrace=False,
        )
    api = config.new_client_from_config(config_file=str(local.kubeconfig))
    try:
        yield ClusterHandle(local.kubeconfig, api, local=True)
    finally:
        api.close()
        # Stops the cluster unless `hack/cluster up` started it or another session still uses it.
        local.release(keep=os.environ.get("LORAFLEET_KEEP_CLUSTER") == "1")


@pytest.fixture
def namespace(cluster: ClusterHandle, request: pytest.FixtureRequest) -> Iterator[str]:
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    # e2e tests run their own operator (a pod or a subprocess): their namespaces stay outside the glob
    # (<prefix>-*) that the session's integration operator watches, or both would reconcile them.
    e2e = "e2e" in Path(str(request.node.path)).parts
    name = f"{SESSION_PREFIX}{'e' if e2e else ''}-{slug}-{uuid.uuid4().hex[:6]}"
    core = cluster.core
    core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"lorafleet.io/test": "true"}))
    )

    def has_default_sa() -> bool:
        try:
            core.read_namespaced_service_account("default", name)
            return True
        except ApiException as e:
            if e.status != 404:
                raise
            return False

    # Pods are rejected until the service-account controller has created "default".
    wait_until(has_default_sa, timeout=30, what=f"ServiceAccount default in {name}")
    yield name
    try:
        core.delete_namespace(name, propagation_policy="Background")
    except ApiException as e:
        if e.status != 404:
            raise


@pytest.fixture
def private_namespace(cluster: ClusterHandle, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace outside the glob the session's operator watches (<prefix>-*): only the operators a test starts
    itself see its objects."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:30].strip("-")
    name = f"{SESSION_PREFIX}l-{slug}-{uuid.uuid4().hex[:6]}"
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    try:
        cluster.core.delete_namespace(name, propagation_policy="Background")
    except ApiException as e:
        if e.status != 404:
            raise


# The credential scan: after each test's body, and at the session's end (leak_scan.py).
from tests.integration.leak_scan import pytest_runtest_call, pytest_sessionfinish  # noqa: E402, F401
