"""A watch-fed cache on the real API server: its first list holds exactly the labelled objects, every later create,
change and delete reaches the store and `on_change` within seconds, objects without the label never do, and a
watch from a resourceVersion the server no longer has ends in a relist (410 Gone), not in a stuck cache."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import pytest
from kubernetes import client

from lorafleet import k8s
from lorafleet.controllers.caches import metadata_and_status
from lorafleet.controllers.informer import Change, Informer, Store, WatchTarget, _Gone
from lorafleet_dev.testing import ClusterHandle, wait_until

LABEL = {"lorafleet.io/informer-test": "yes"}


def _config_map(name: str, namespace: str, labelled: bool = True, value: str = "1") -> client.V1ConfigMap:
    return client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=name, namespace=namespace, labels=LABEL if labelled else None),
        data={"v": value},
    )


@pytest.fixture
def informer(cluster: ClusterHandle, namespace: str) -> Iterator[tuple[Informer, queue.Queue[Change]]]:
    k8s.use_api_client(cluster.api_client)
    cluster.core.create_namespaced_config_map(namespace, _config_map("before", namespace))
    cluster.core.create_namespaced_config_map(namespace, _config_map("unlabelled", namespace, labelled=False))
    changes: queue.Queue[Change] = queue.Queue()
    path = k8s.resource("v1", "ConfigMap").path(namespace=namespace)  # type: ignore[no-untyped-call]
    target = WatchTarget(path, "lorafleet.io/informer-test=yes")
    inf = Informer(target, cluster.api_client, Store(metadata_and_status), changes.put, name="test-informer")
    inf.start()
    assert inf.synced.wait(30)
    yield inf, changes
    inf.stop()


def _next(changes: queue.Queue[Change], timeout: float = 15) -> tuple[str, str]:
    type_, obj = changes.get(timeout=timeout)
    return type_, obj["metadata"]["name"]


def test_list_then_watch_follows_labelled_objects_only(
    cluster: ClusterHandle, namespace: str, informer: tuple[Informer, queue.Queue[Change]]
) -> None:
    inf, changes = informer
    assert [o["metadata"]["name"] for o in inf.store.select(namespace)] == ["before"]
    listed = inf.store.get(namespace, "before") or {}
    assert (listed.get("apiVersion"), listed.get("kind")) == ("v1", "ConfigMap")  # list items lack them
    assert "data" not in (inf.store.get(namespace, "before") or {})  # kept as metadata only
    assert changes.empty()  # the first list is the starting point, not a change

    core = cluster.core
    core.create_namespaced_config_map(namespace, _config_map("later", namespace))
    assert _next(changes) == ("ADDED", "later")
    core.patch_namespaced_config_map("later", namespace, {"metadata": {"annotations": {"x": "y"}}})
    assert _next(changes) == ("MODIFIED", "later")
    assert (inf.store.get(namespace, "later") or {})["metadata"]["annotations"] == {"x": "y"}
    core.patch_namespaced_config_map("unlabelled", namespace, {"data": {"v": "2"}})
    core.delete_namespaced_config_map("later", namespace)
    assert _next(changes) == ("DELETED", "later")
    assert inf.store.get(namespace, "later") is None
    assert changes.empty()  # the unlabelled ConfigMap never showed up
    assert inf.alive()


def test_a_watch_from_a_version_the_server_no_longer_has_asks_for_a_relist(
    cluster: ClusterHandle, namespace: str, informer: tuple[Informer, queue.Queue[Change]]
) -> None:
    inf, _ = informer
    # "1" is older than any API server's watch window (the local harness starts its API server on an etcd that is
    # past revision 100: lorafleet_dev.cluster.MIN_ETCD_REVISION).
    with pytest.raises(_Gone):
        inf._watch("1")
    # And the running informer still follows the namespace.
    cluster.core.create_namespaced_config_map(namespace, _config_map("after", namespace))
    wait_until(lambda: inf.store.get(namespace, "after") is not None, timeout=15, what="the cache to see 'after'")
