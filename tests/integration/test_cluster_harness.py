"""The test cluster is a real control plane: the API server answers, controllers reconcile, the scheduler
binds pods to the kwok nodes (GPU resources included), Job pods succeed or fail on demand, and the garbage
collector deletes dependents."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from lorafleet_dev.kwok import CPU_NODES, FAIL_ANNOTATION, GPU_NODES, GPU_PRODUCT
from lorafleet_dev.testing import ClusterHandle, wait_until

IMAGE = "registry.invalid/lorafleet/never-pulled:0"  # kwok pods never pull images
KWOK = {"type": "kwok"}  # keeps pods off real nodes (kind)


def _require_kwok(cluster: ClusterHandle) -> None:
    names = {n.metadata.name for n in cluster.core.list_node(label_selector="type=kwok").items}
    if not set(GPU_NODES) <= names:
        pytest.skip("no kwok GPU nodes in this cluster (hack/kind-up.sh adds them)")


def _container(gpus: int = 0) -> dict[str, Any]:
    c: dict[str, Any] = {"name": "main", "image": IMAGE}
    if gpus:
        c["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    return c


def _job(name: str, *, gpus: int = 0, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [_container(gpus)],
        "nodeSelector": KWOK | ({"nvidia.com/gpu.present": "true"} if gpus else {}),
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {"metadata": {"annotations": annotations or {}}, "spec": spec},
        },
    }


def _job_condition(cluster: ClusterHandle, ns: str, name: str) -> str | None:
    job = cluster.batch.read_namespaced_job_status(name, ns)
    for c in job.status.conditions or []:
        if c.type in ("Complete", "Failed") and c.status == "True":
            return str(c.type)
    return None


def _pods(cluster: ClusterHandle, ns: str, selector: str) -> list[client.V1Pod]:
    return list(cluster.core.list_namespaced_pod(ns, label_selector=selector).items)


def test_api_server_answers(cluster: ClusterHandle) -> None:
    version = client.VersionApi(cluster.api_client).get_code()
    assert version.git_version.startswith("v1.")
    if cluster.local:
        from lorafleet_dev.build import KUBERNETES_VERSION

        assert version.git_version == KUBERNETES_VERSION
        nodes = {n.metadata.name: n for n in cluster.core.list_node().items}
        assert set(GPU_NODES) | set(CPU_NODES) <= set(nodes)
        gpu = nodes[GPU_NODES[0]]
        assert gpu.status.allocatable["nvidia.com/gpu"] == "8"
        assert gpu.metadata.labels["nvidia.com/gpu.product"] == GPU_PRODUCT
        assert not gpu.spec.taints


def test_deployment_gets_replicaset_and_running_pods(cluster: ClusterHandle, namespace: str) -> None:
    _require_kwok(cluster)
    labels = {"app": "web"}
    cluster.apps.create_namespaced_deployment(
        namespace,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"nodeSelector": KWOK, "containers": [_container()]},
                },
            },
        },
    )
    rs = wait_until(
        lambda: cluster.apps.list_namespaced_replica_set(namespace, label_selector="app=web").items,
        what="ReplicaSet of the Deployment",
    )[0]
    assert rs.metadata.owner_references[0].kind == "Deployment"

    def running() -> list[client.V1Pod] | None:
        pods = _pods(cluster, namespace, "app=web")
        ok = len(pods) == 2 and all(p.status.phase == "Running" for p in pods)
        return pods if ok else None

    pods = wait_until(running, what="2 Running pods")
    kwok_nodes = set(GPU_NODES) | set(CPU_NODES)
    for pod in pods:
        assert pod.metadata.owner_references[0].name == rs.metadata.name
        assert pod.spec.node_name in kwok_nodes
    wait_until(
        lambda: cluster.apps.read_namespaced_deployment_status("web", namespace).status.available_replicas == 2,
        what="Deployment available",
    )

    # Real garbage collection: the ReplicaSet and its pods go with the Deployment.
    cluster.apps.delete_namespaced_deployment("web", namespace, propagation_policy="Background")
    wait_until(
        lambda: (
            not cluster.apps.list_namespaced_replica_set(namespace).items and not _pods(cluster, namespace, "app=web")
        ),
        what="ReplicaSet and pods garbage-collected",
    )


def test_gpu_job_runs_then_completes(cluster: ClusterHandle, namespace: str) -> None:
    _require_kwok(cluster)
    # One GPU, not a whole node: pods of earlier tests (terminating in namespaces being deleted) may still hold
    # some of a node's eight, and this test is about the Job's life, not packing.
    cluster.batch.create_namespaced_job(namespace, _job("train", gpus=1))
    # Job pods stay Running for a while (kwok stage delay) before they succeed.
    pod = wait_until(
        lambda: next((p for p in _pods(cluster, namespace, "job-name=train") if p.status.phase == "Running"), None),
        what="Job pod Running",
    )
    assert pod.spec.node_name in GPU_NODES
    assert pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"
    assert wait_until(lambda: _job_condition(cluster, namespace, "train"), what="Job finished") == "Complete"
    assert _pods(cluster, namespace, "job-name=train")[0].status.phase == "Succeeded"


def test_gpu_requests_beyond_capacity_stay_pending(cluster: ClusterHandle, namespace: str) -> None:
    _require_kwok(cluster)
    cluster.core.create_namespaced_pod(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "too-big"},
            "spec": {"containers": [_container(9)]},
        },
    )

    def unschedulable() -> bool:
        conds = cluster.core.read_namespaced_pod_status("too-big", namespace).status.conditions or []
        return any(c.type == "PodScheduled" and c.reason == "Unschedulable" for c in conds)

    wait_until(unschedulable, what="PodScheduled=False/Unschedulable")


def test_job_with_fail_annotation_fails(cluster: ClusterHandle, namespace: str) -> None:
    _require_kwok(cluster)
    cluster.batch.create_namespaced_job(namespace, _job("doomed", annotations={FAIL_ANNOTATION: "true"}))
    assert wait_until(lambda: _job_condition(cluster, namespace, "doomed"), what="Job finished") == "Failed"
    pod = _pods(cluster, namespace, "job-name=doomed")[0]
    assert pod.status.phase == "Failed"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 1


def test_garbage_collector_deletes_dependents(cluster: ClusterHandle, namespace: str) -> None:
    core = cluster.core
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}, "data": {}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "child", "ownerReferences": [ref]}})
    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")

    def child_gone() -> bool:
        try:
            core.read_namespaced_config_map("child", namespace)
            return False
        except ApiException as e:
            if e.status != 404:
                raise
            return True

    wait_until(child_gone, timeout=60, what="dependent ConfigMap garbage-collected")


def test_a_running_job_pod_deleted_on_a_fake_node_goes_away(cluster: ClusterHandle, namespace: str) -> None:
    # A Job's pod carries the job controller's tracking finalizer until it is terminal; a fake node has no kubelet
    # to make a deleted pod terminal, so without the harness's pod-delete stage it stays Terminating for ever
    # (and namespaces with it).
    _require_kwok(cluster)
    cluster.batch.create_namespaced_job(namespace, _job("long", annotations={"lorafleet.io/kwok-duration": "600s"}))
    pod = wait_until(
        lambda: next((p for p in _pods(cluster, namespace, "job-name=long") if p.status.phase == "Running"), None),
        what="Job pod Running",
    )
    assert "batch.kubernetes.io/job-tracking" in (pod.metadata.finalizers or [])
    cluster.core.delete_namespaced_pod(pod.metadata.name, namespace)
    wait_until(
        lambda: all(p.metadata.name != pod.metadata.name for p in _pods(cluster, namespace, "job-name=long")),
        timeout=60,
        what="the deleted pod to be gone",
    )
