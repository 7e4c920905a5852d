"""The operator against a real API server, controller-manager and kwok nodes: FineTuneJobs become Jobs that
run on GPU nodes and report their outcome; AdapterDeployments become Deployments and Services whose readiness
shows in status; children are garbage-collected with their owner and restored when deleted; a restarted
operator converges without duplicating anything. Status always carries observedGeneration."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from lorafleet import k8s
from lorafleet.config import OperatorSettings
from lorafleet.controllers import finetunejob as ftj_controller
from lorafleet.resources import finetunejob as ftj_res
from lorafleet.storage import ArtifactStore, ObjectNotFound, VersionFolder
from lorafleet_dev.s3server import S3Server
from lorafleet_dev.testing import ClusterHandle, wait_until
from tests.integration.operator_fixtures import ADAPTER_ROOT, MODEL_URI, Custom, OperatorProcess, condition
from tests.unit import objects

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"


def _manifest(obj: dict[str, Any], namespace: str) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    out["metadata"] = {"name": out["metadata"]["name"], "namespace": namespace}
    return out


def _base_model(namespace: str, **source: Any) -> dict[str, Any]:
    bm = _manifest(objects.base_model(), namespace)
    bm["spec"]["source"] = {"uri": MODEL_URI, **source}
    return bm


def _fine_tune_job(namespace: str, name: str = "support", **resources: Any) -> dict[str, Any]:
    ftj = _manifest(objects.fine_tune_job(name=name), namespace)
    ftj["spec"]["resources"] = {"gpusPerNode": 1, "cpu": 1, "memory": "1Gi", **resources}
    return ftj


def _phase(expected: str) -> Any:
    return lambda status, obj: (
        status.get("phase") == expected and status.get("observedGeneration") == obj["metadata"]["generation"]
    )


def test_finetunejob_waits_for_its_base_model_then_trains_on_a_gpu_node(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str
) -> None:
    custom = Custom(cluster, namespace)
    custom.create(_fine_tune_job(namespace, podAnnotations={"lorafleet.io/kwok-duration": "4s"}))

    waiting = custom.wait_status(
        "FineTuneJob", "support", lambda s, o: (condition(s, "Ready") or {}).get("reason") == "BaseModelNotFound"
    )
    assert waiting["status"]["phase"] == "Pending"
    assert "tiny-llama" in condition(waiting["status"], "Ready")["message"]  # type: ignore[index]
    assert cluster.batch.list_namespaced_job(namespace).items == []

    custom.create(_base_model(namespace))
    custom.wait_status("BaseModel", "tiny-llama", _phase("Ready"))

    running = custom.wait_status("FineTuneJob", "support", _phase("Running"), what="FineTuneJob Running")
    assert running["status"]["jobName"] == "support-train"
    assert running["status"]["startTime"]
    # Running follows the Job's startTime, which the Job controller sets when it creates the pod: the scheduler
    # may not have placed it yet.
    pods = wait_until(
        lambda: [
            p
            for p in cluster.core.list_namespaced_pod(namespace, label_selector="job-name=support-train").items
            if p.spec.node_name
        ],
        timeout=30,
        what="the training pod scheduled",
    )
    node = cluster.core.read_node(pods[0].spec.node_name)
    assert GPU_PRODUCT_LABEL in node.metadata.labels, "the training pod must land on a GPU node"

    done = custom.wait_status("FineTuneJob", "support", _phase("Succeeded"), what="FineTuneJob Succeeded")
    status = done["status"]
    assert status["completionTime"] >= status["startTime"]
    assert condition(status, "Ready")["status"] == "True"  # type: ignore[index]
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])

    def reasons() -> set[str]:
        events = cluster.core.list_namespaced_event(namespace, field_selector="involvedObject.name=support").items
        return {e.reason for e in events if e.involved_object.kind == "FineTuneJob"}

    # One Event per transition, posted from handlers and from the resync loop alike.
    wait_until(lambda: {"BaseModelNotFound", "Succeeded"} <= reasons(), timeout=30, what="transition Events")


def test_failing_job_fails_the_finetunejob_with_the_job_reason(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str
) -> None:
    custom = Custom(cluster, namespace)
    custom.create(_base_model(namespace))
    ftj = _fine_tune_job(namespace, podAnnotations={"lorafleet.io/kwok-fail": "true"})
    ftj["spec"]["backoffLimit"] = 0
    custom.create(ftj)
    failed = custom.wait_status("FineTuneJob", "support", _phase("Failed"), what="FineTuneJob Failed")
    degraded = condition(failed["status"], "Degraded")
    assert degraded is not None and degraded["status"] == "True"
    assert degraded["reason"] == "BackoffLimitExceeded", degraded


def test_deleted_job_is_restored_and_children_are_garbage_collected(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str
) -> None:
    custom = Custom(cluster, namespace)
    custom.create(_base_model(namespace))
    custom.create(_fine_tune_job(namespace, podAnnotations={"lorafleet.io/kwok-duration": "600s"}))
    custom.wait_status("FineTuneJob", "support", _phase("Running"))
    first = cluster.batch.read_namespaced_job("support-train", namespace)

    cluster.batch.delete_namespaced_job("support-train", namespace, propagation_policy="Background")

    def recreated() -> bool:
        try:
            return bool(
                cluster.batch.read_namespaced_job("support-train", namespace).metadata.uid != first.metadata.uid
            )
        except client.ApiException as e:
            if e.status == 404:
                return False
            raise

    wait_until(recreated, timeout=30, what="the deleted Job to be restored")

    custom.delete("FineTuneJob", "support")

    def collected() -> bool:
        jobs = cluster.batch.list_namespaced_job(namespace).items
        maps = cluster.core.list_namespaced_config_map(namespace, label_selector="lorafleet.io/finetunejob").items
        return not jobs and not maps

    wait_until(collected, timeout=60, what="the garbage collector to delete the Job and ConfigMap")


def test_adapterdeployment_becomes_ready_and_follows_replicas(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str
) -> None:
    custom = Custom(cluster, namespace)
    custom.create(_base_model(namespace))
    ad = _manifest(objects.adapter_deployment(), namespace)
    ad["spec"].update(adapters=[], replicas=1)
    custom.create(ad)

    ready = custom.wait_status("AdapterDeployment", "chat", _phase("Ready"), what="AdapterDeployment Ready")
    assert ready["status"]["readyReplicas"] == 1
    assert ready["status"]["endpoint"] == f"http://chat.{namespace}.svc:8000/v1"
    assert cluster.apps.read_namespaced_deployment("chat-vllm", namespace).spec.replicas == 1
    service = cluster.core.read_namespaced_service("chat", namespace)
    assert service.spec.ports[0].target_port == "http"

    custom.patch("AdapterDeployment", "chat", {"spec": {"replicas": 2}})
    scaled = custom.wait_status(
        "AdapterDeployment",
        "chat",
        lambda s, o: s.get("readyReplicas") == 2 and s.get("observedGeneration") == 2 and s.get("phase") == "Ready",
        what="two ready replicas",
    )
    assert scaled["metadata"]["generation"] == 2
    pdb = client.PolicyV1Api(cluster.api_client).read_namespaced_pod_disruption_budget("chat-pdb", namespace)
    assert pdb.spec.max_unavailable == 1

    cluster.apps.delete_namespaced_deployment("chat-vllm", namespace)
    wait_until(lambda: cluster.apps.list_namespaced_deployment(namespace).items, timeout=30, what="Deployment restored")


def test_adapter_waits_for_its_finetunejob(cluster: ClusterHandle, operator: OperatorProcess, namespace: str) -> None:
    custom = Custom(cluster, namespace)
    custom.create(_base_model(namespace))
    ad = _manifest(objects.adapter_deployment(), namespace)
    ad["spec"].update(replicas=1, adapters=[{"name": "support-bot", "fineTuneJobRef": {"name": "support"}}])
    custom.create(ad)
    status = custom.wait_status(
        "AdapterDeployment", "chat", lambda s, o: (s.get("adapters") or [{}])[0].get("reason") == "FineTuneJobNotFound"
    )["status"]
    assert status["adapters"][0]["state"] == "Pending"


def test_restarted_operator_converges_without_duplicates(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, s3_server: S3Server
) -> None:
    """The operator dies after creating a Job and before writing status: on restart, one Job, status converges."""
    custom = Custom(cluster, namespace)
    operator.stop(kill=True)
    try:
        custom.create(_base_model(namespace))
        ftj = custom.create(_fine_tune_job(namespace, podAnnotations={"lorafleet.io/kwok-duration": "600s"}))
        base = custom.get("BaseModel", "tiny-llama")
        assert base is not None
        base["status"] = {"phase": "Ready"}  # what the dead operator had not written yet either
        # What the dead operator had done: the children exist, the status was never written.
        settings = OperatorSettings(store_endpoint=s3_server.endpoint, store_uri=ADAPTER_ROOT)
        children, error = ftj_controller.plan(objects.as_fine_tune_job(ftj), objects.as_base_model(base), settings)
        assert error is None
        k8s.use_api_client(cluster.api_client)
        for child in children:
            k8s.apply(child, field_manager=settings.field_manager)
        assert custom.get("FineTuneJob", "support").get("status") is None  # type: ignore[union-attr]
    finally:
        operator.start()

    custom.wait_status("FineTuneJob", "support", _phase("Running"), what="status after restart")
    jobs = cluster.batch.list_namespaced_job(namespace).items
    assert [j.metadata.name for j in jobs] == [ftj_res.names("support").job]
    assert jobs[0].metadata.uid == cluster.batch.read_namespaced_job("support-train", namespace).metadata.uid


def test_base_model_records_the_verified_digest_and_refuses_a_wrong_pin(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, stored_model: str
) -> None:
    custom = Custom(cluster, namespace)
    custom.create(_base_model(namespace))
    ready = custom.wait_status("BaseModel", "tiny-llama", _phase("Ready"))["status"]
    assert ready["digest"] == stored_model
    assert ready["sizeBytes"] > 1024
    assert ready["resolvedRevision"] == "r1"

    wrong = _base_model(namespace, digest="sha256:" + "0" * 64)
    wrong["metadata"]["name"] = "pinned-wrong"
    custom.create(wrong)
    failed = custom.wait_status("BaseModel", "pinned-wrong", _phase("Failed"))["status"]
    assert condition(failed, "Ready")["reason"] == "DigestMismatch"  # type: ignore[index]

    missing = _base_model(namespace)
    missing["metadata"]["name"] = "not-pushed"
    missing["spec"]["source"]["uri"] = "s3://models/not-pushed/r1"
    custom.create(missing)
    pending = custom.wait_status(
        "BaseModel", "not-pushed", lambda s, o: (condition(s, "Ready") or {}).get("reason") == "ManifestNotFound"
    )["status"]
    assert pending["phase"] == "Pending"


def test_delete_policy_removes_the_adapter_from_the_store(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, s3_server: S3Server, tmp_path: Path
) -> None:
    store = ArtifactStore(s3_server.store_settings())
    folder = VersionFolder.parse(f"{ADAPTER_ROOT}/{namespace}/adapters/{namespace}/v1")  # the folder the spec names

    custom = Custom(cluster, namespace)
    custom.create(_base_model(namespace))
    ftj = _fine_tune_job(namespace, podAnnotations={"lorafleet.io/kwok-duration": "600s"})
    ftj["spec"]["output"].update(adapterName=namespace, deletionPolicy="Delete")
    uid = custom.create(ftj)["metadata"]["uid"]
    # What the trainer publishes: its lineage names this FineTuneJob, which deletion checks again.
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\1" * 64)
    lineage = {"job": {"namespace": namespace, "name": "support", "uid": uid}}
    pushed = store.push(tmp_path, folder, kind="adapter", name=namespace, version="v1", hyperparameters=lineage)
    custom.wait_status("FineTuneJob", "support", _phase("Running"))
    # What the trainer's verified report records; kwok pods run no trainer, so the test writes it.
    artifact = {"uri": folder.uri, "digest": pushed.digest, "sizeBytes": pushed.manifest.total_size}
    custom.api.patch_namespaced_custom_object_status(
        "lorafleet.io", "v1alpha1", namespace, "finetunejobs", "support", {"status": {"artifact": artifact}}
    )
    assert custom.get("FineTuneJob", "support")["metadata"]["finalizers"] == ["lorafleet.io/finalizer"]  # type: ignore[index]

    custom.delete("FineTuneJob", "support")
    wait_until(lambda: custom.get("FineTuneJob", "support") is None, timeout=60, what="FineTuneJob deleted")
    with pytest.raises(ObjectNotFound):
        store.read_manifest(folder, explain=False)


def test_retained_adapter_has_no_finalizer(cluster: ClusterHandle, operator: OperatorProcess, namespace: str) -> None:
    custom = Custom(cluster, namespace)
    custom.create(_base_model(namespace))
    custom.create(_fine_tune_job(namespace, podAnnotations={"lorafleet.io/kwok-duration": "600s"}))
    running = custom.wait_status("FineTuneJob", "support", _phase("Running"))
    assert not running["metadata"].get("finalizers")


def test_max_lora_rank_is_sized_from_the_stored_adapter(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, s3_server: S3Server, tmp_path: Path
) -> None:
    store = ArtifactStore(s3_server.store_settings())
    folder = VersionFolder.parse(f"{ADAPTER_ROOT}/{namespace}/adapters/{namespace}-sql/v3")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\2" * 64)
    pushed = store.push(
        tmp_path, folder, kind="adapter", name=f"{namespace}-sql", version="v3", hyperparameters={"lora": {"r": 64}}
    )
    custom = Custom(cluster, namespace)
    custom.create(_base_model(namespace))
    ad = _manifest(objects.adapter_deployment(), namespace)
    ad["spec"].update(replicas=1, adapters=[{"name": "sql", "artifact": {"uri": folder.uri, "digest": pushed.digest}}])
    custom.create(ad)

    def args() -> list[str] | None:
        try:
            deployment = cluster.apps.read_namespaced_deployment("chat-vllm", namespace)
        except client.ApiException:
            return None
        return list(deployment.spec.template.spec.containers[0].args)

    assert "--max-lora-rank=64" in wait_until(args, timeout=30, what="the vLLM Deployment")
