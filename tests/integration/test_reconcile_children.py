"""Execute only the difference, on the real API server: once an object has converged, a reconcile pass writes
nothing (no apply, no delete, no status patch, no Event) and the resync leaves every resourceVersion as it was;
an owned child that is no longer desired (the PodDisruptionBudget after replicas go to 1) is deleted."""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes import client

from lorafleet import k8s
from lorafleet.config import OperatorSettings
from lorafleet.controllers import adapterdeployment as ad_controller
from lorafleet.controllers import base as controller_base
from lorafleet.resources.children import HASH_ANNOTATION
from lorafleet_dev.s3server import S3Server
from lorafleet_dev.testing import ClusterHandle, wait_until
from tests.integration.operator_fixtures import ADAPTER_ROOT, MODEL_URI, Custom, OperatorProcess
from tests.unit import objects

RESYNC_SECONDS = 3  # operator_fixtures.operator


def _manifest(obj: dict[str, Any], namespace: str) -> dict[str, Any]:
    return {**obj, "metadata": {"name": obj["metadata"]["name"], "namespace": namespace}}


def _ready_deployment(custom: Custom, namespace: str, replicas: int) -> dict[str, Any]:
    bm = _manifest(objects.base_model(), namespace)
    bm["spec"] = {**bm["spec"], "source": {"uri": MODEL_URI}}
    custom.create(bm)
    ad = _manifest(objects.adapter_deployment(), namespace)
    ad["spec"] = {**ad["spec"], "adapters": [], "replicas": replicas}
    custom.create(ad)
    return custom.wait_status(
        "AdapterDeployment",
        "chat",
        lambda s, o: (
            s.get("phase") == "Ready"
            and s.get("readyReplicas") == replicas
            and s.get("observedGeneration") == o["metadata"]["generation"]
        ),
        what="AdapterDeployment Ready",
    )


def _children_versions(cluster: ClusterHandle, namespace: str) -> dict[str, str]:
    policy = client.PolicyV1Api(cluster.api_client)
    networking = client.NetworkingV1Api(cluster.api_client)
    found = {
        "ConfigMap": cluster.core.read_namespaced_config_map("chat-adapters", namespace),
        "Service": cluster.core.read_namespaced_service("chat", namespace),
        "PodDisruptionBudget": policy.read_namespaced_pod_disruption_budget("chat-pdb", namespace),
        "NetworkPolicy": networking.read_namespaced_network_policy("chat-egress", namespace),
    }
    for kind, obj in found.items():
        assert HASH_ANNOTATION in (obj.metadata.annotations or {}), kind
    return {kind: obj.metadata.resource_version for kind, obj in found.items()}


def test_converged_objects_cost_no_writes(
    cluster: ClusterHandle,
    operator: OperatorProcess,
    namespace: str,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    custom = Custom(cluster, namespace)
    ready = _ready_deployment(custom, namespace, replicas=2)
    children = _children_versions(cluster, namespace)

    time.sleep(3 * RESYNC_SECONDS + 1)  # several resync passes and child events
    again = custom.get("AdapterDeployment", "chat")
    assert again is not None
    assert again["metadata"]["resourceVersion"] == ready["metadata"]["resourceVersion"], "status rewritten"
    assert _children_versions(cluster, namespace) == children

    # One more pass in this process, with the operator's settings, counting every write it makes.
    for name, value in {**s3_server.env(), "LORAFLEET_STORE_URI": ADAPTER_ROOT}.items():
        monkeypatch.setenv(name, value)
    settings = OperatorSettings()
    monkeypatch.setattr(controller_base, "SETTINGS", settings)
    monkeypatch.setattr(ad_controller, "SETTINGS", settings)
    k8s.use_api_client(cluster.api_client)
    writes: list[str] = []
    for name in ("apply", "delete", "patch_status"):
        real = getattr(k8s, name)

        def counted(*args: Any, _name: str = name, _real: Any = real, **kwargs: Any) -> Any:
            writes.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(k8s, name, counted)
    written = controller_base.reconcile_and_write(ad_controller.RECONCILER, again)
    assert written is False
    assert writes == []


def test_a_child_no_longer_desired_is_pruned(cluster: ClusterHandle, operator: OperatorProcess, namespace: str) -> None:
    custom = Custom(cluster, namespace)
    _ready_deployment(custom, namespace, replicas=2)
    policy = client.PolicyV1Api(cluster.api_client)
    assert policy.read_namespaced_pod_disruption_budget("chat-pdb", namespace).spec.max_unavailable == 1

    custom.patch("AdapterDeployment", "chat", {"spec": {"replicas": 1}})

    def pruned() -> bool:
        return not policy.list_namespaced_pod_disruption_budget(namespace).items

    wait_until(pruned, timeout=30, what="the PodDisruptionBudget to be pruned")
    # Deleted before the changed Deployment is applied (the same pass); everything else is still there.
    wait_until(
        lambda: cluster.apps.read_namespaced_deployment("chat-vllm", namespace).spec.replicas == 1,
        timeout=30,
        what="the Deployment scaled to 1",
    )
    assert cluster.core.read_namespaced_service("chat", namespace)


def test_finished_job_costs_nothing_and_each_transition_posts_one_event(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str
) -> None:
    """Handlers, Job events and the resync all trigger the same FineTuneJob: one queue serialises them, status is
    written with the resourceVersion it was computed from, so no transition's Event is posted twice; once it has
    finished, nothing about it is written again (kwok runs no trainer, so no artifact is recorded and the resync
    still visits it for an hour: those passes write nothing; the skip itself is unit-tested)."""
    custom = Custom(cluster, namespace)
    bm = _manifest(objects.base_model(), namespace)
    bm["spec"] = {**bm["spec"], "source": {"uri": MODEL_URI}}
    custom.create(bm)
    custom.wait_status("BaseModel", "tiny-llama", lambda s, o: s.get("phase") == "Ready")
    ftj = _manifest(objects.fine_tune_job(name="support"), namespace)
    ftj["spec"]["resources"] = {
        "gpusPerNode": 1,
        "cpu": 1,
        "memory": "1Gi",
        "podAnnotations": {"lorafleet.io/kwok-duration": "2s"},
    }
    custom.create(ftj)
    done = custom.wait_status(
        "FineTuneJob", "support", lambda s, o: s.get("phase") == "Succeeded", what="FineTuneJob Succeeded"
    )
    job = cluster.batch.read_namespaced_job("support-train", namespace)

    time.sleep(3 * RESYNC_SECONDS + 1)
    after = custom.get("FineTuneJob", "support")
    assert after is not None
    assert after["metadata"]["resourceVersion"] == done["metadata"]["resourceVersion"]
    assert cluster.batch.read_namespaced_job("support-train", namespace).metadata.resource_version == (
        job.metadata.resource_version
    )
    events = [
        e
        for e in cluster.core.list_namespaced_event(namespace, field_selector="involvedObject.name=support").items
        if e.involved_object.kind == "FineTuneJob" and e.reporting_component == "lorafleet-operator"
    ]
    messages = [(e.reason, e.message) for e in events]
    assert len(messages) == len(set(messages)), f"an Event was posted twice: {sorted(messages)}"
    assert {"Succeeded"} <= {e.reason for e in events}
