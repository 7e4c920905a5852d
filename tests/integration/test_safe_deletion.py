"""A FineTuneJob's trainer report is untrusted and its deletion cannot hurt others (issue 15, points 2 and 3), on
the real API server and MinIO: a report naming another team's adapter, or a manifest another FineTuneJob wrote, is
not recorded (Degraded=True, ArtifactRejected) and never deleted; deletionPolicy: Delete waits, with a
DeletionBlocked condition naming them, while AdapterDeployments reference the adapter, and deletes it once they
stop; a namespace whose FineTuneJob's store Secret is already gone finishes deleting (no hang in Terminating).

The report comes from a pod the test makes: any pod carrying the Job's labels is read as the trainer, exactly
what a tenant who runs its own image (or creates pods) can do."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from lorafleet.resources import finetunejob as ftj_res
from lorafleet.storage import ArtifactStore, ObjectNotFound, VersionFolder
from lorafleet_dev.s3server import S3Server
from lorafleet_dev.testing import ClusterHandle, wait_until
from tests.integration.operator_fixtures import ADAPTER_ROOT, MODEL_URI, Custom, condition
from tests.unit import objects

pytestmark = pytest.mark.usefixtures("operator")


def _adapter_name() -> str:
    # Adapter folders live in the shared test bucket: one name per test, so tests never see each other's.
    return f"a{uuid.uuid4().hex[:10]}"


def _setup(
    cluster: ClusterHandle, namespace: str, adapter: str, store: dict[str, Any] | None = None
) -> tuple[Custom, dict[str, Any]]:
    """A Ready BaseModel and a FineTuneJob (deletionPolicy: Delete) whose kwok Job succeeds after 2 s; both in
    `store` when given, else the operator's default store."""
    custom = Custom(cluster, namespace)
    bm = objects.base_model()
    bm["metadata"] = {"name": bm["metadata"]["name"], "namespace": namespace}
    bm["spec"]["source"] = {"uri": MODEL_URI, **({"store": store} if store else {})}
    custom.create(bm)
    ftj = objects.fine_tune_job()
    ftj["metadata"] = {"name": "support", "namespace": namespace}
    ftj["spec"]["resources"] = {
        "gpusPerNode": 1, "cpu": 1, "memory": "1Gi", "podAnnotations": {"lorafleet.io/kwok-duration": "2s"},
    }  # fmt: skip
    ftj["spec"]["output"] = {"adapterName": adapter, "version": "v1", "deletionPolicy": "Delete"}
    if store:
        ftj["spec"]["output"]["store"] = store
    return custom, custom.create(ftj)


def _push(store: ArtifactStore, tmp_path: Path, uri: str, name: str, uid: str) -> Any:
    """An adapter version whose lineage names FineTuneJob `uid` (as the trainer writes it)."""
    src = tmp_path / uuid.uuid4().hex
    src.mkdir()
    (src / "adapter_model.safetensors").write_bytes(b"\1" * 64)
    job = {"namespace": "somewhere", "name": "someone", "uid": uid}
    return store.push(
        src, VersionFolder.parse(uri), kind="adapter", name=name, version="v1", hyperparameters={"job": job}
    )


def _fake_trainer_report(cluster: ClusterHandle, namespace: str, report: dict[str, Any]) -> None:
    """A pod labelled as the FineTuneJob's trainer whose termination message is `report`. It never runs (no node
    matches it); its status says the trainer container terminated with that message."""
    job = ftj_res.names("support").job
    labels = {"app.kubernetes.io/managed-by": "lorafleet", "lorafleet.io/finetunejob": "support", "job-name": job}
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="impostor", labels=labels),
        spec=client.V1PodSpec(
            containers=[client.V1Container(name="trainer", image="busybox")],
            node_selector={"lorafleet.io/no-such-node": "true"},
        ),
    )
    cluster.core.create_namespaced_pod(namespace, pod)
    status = {
        "status": {
            "containerStatuses": [
                {
                    "name": "trainer",
                    "image": "busybox",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {
                        "terminated": {
                            "exitCode": 0,
                            "reason": "Completed",
                            "finishedAt": "2099-01-01T00:00:00Z",  # newer than any real report
                            "message": json.dumps(report),
                        }
                    },
                }
            ]
        }
    }
    cluster.core.patch_namespaced_pod_status("impostor", namespace, status)


def _artifact_report(uri: str, digest: str) -> dict[str, Any]:
    return {"version": 1, "artifact": {"uri": uri, "digest": digest, "sizeBytes": 64}}


def _rejected(status: dict[str, Any], _obj: dict[str, Any]) -> bool:
    degraded = condition(status, "Degraded") or {}
    return status.get("phase") == "Succeeded" and degraded.get("reason") == "ArtifactRejected"


def _gone(custom: Custom) -> None:
    wait_until(lambda: custom.get("FineTuneJob", "support") is None, timeout=60, what="FineTuneJob deleted")


def _events(cluster: ClusterHandle, namespace: str) -> dict[str, str]:
    """reason -> message of the FineTuneJob's Events."""
    events = cluster.core.list_namespaced_event(namespace).items
    return {e.reason: e.message for e in events if e.involved_object.kind == "FineTuneJob"}


def test_a_report_naming_another_team_s_adapter_is_not_recorded_nor_deleted(
    cluster: ClusterHandle, namespace: str, s3_server: S3Server, tmp_path: Path
) -> None:
    store = ArtifactStore(s3_server.store_settings())
    theirs = f"{ADAPTER_ROOT}/{namespace}-b/adapters/{_adapter_name()}/v1"  # team B's adapter, under B's root
    pushed = _push(store, tmp_path, theirs, theirs.split("/")[-2], "uid-of-team-b-job")
    custom, _ = _setup(cluster, namespace, _adapter_name())
    custom.wait_status("FineTuneJob", "support", lambda s, _o: s.get("phase") == "Succeeded")

    _fake_trainer_report(cluster, namespace, _artifact_report(theirs, pushed.digest))
    ftj = custom.wait_status("FineTuneJob", "support", _rejected, what="ArtifactRejected")
    assert "artifact" not in ftj["status"]
    assert theirs in condition(ftj["status"], "Degraded")["message"]  # type: ignore[index]

    custom.delete("FineTuneJob", "support")
    _gone(custom)
    store.read_manifest(VersionFolder.parse(theirs))  # still there


def test_a_manifest_written_by_another_finetunejob_is_not_recorded_nor_deleted(
    cluster: ClusterHandle, namespace: str, s3_server: S3Server, tmp_path: Path
) -> None:
    store = ArtifactStore(s3_server.store_settings())
    adapter = _adapter_name()
    ours = f"{ADAPTER_ROOT}/{namespace}/adapters/{adapter}/v1"
    pushed = _push(store, tmp_path, ours, adapter, "uid-of-another-finetunejob")  # squatted before we ran
    custom, created = _setup(cluster, namespace, adapter)
    custom.wait_status("FineTuneJob", "support", lambda s, _o: s.get("phase") == "Succeeded")

    _fake_trainer_report(cluster, namespace, _artifact_report(ours, pushed.digest))
    ftj = custom.wait_status("FineTuneJob", "support", _rejected, what="ArtifactRejected")
    message = condition(ftj["status"], "Degraded")["message"]  # type: ignore[index]
    assert "uid-of-another-finetunejob" in message and created["metadata"]["uid"] in message
    assert "artifact" not in ftj["status"]

    custom.delete("FineTuneJob", "support")
    _gone(custom)
    store.read_manifest(VersionFolder.parse(ours))  # not ours to delete
    assert "uid-of-another-finetunejob" in _events(cluster, namespace)["AdapterNotDeleted"]


def test_an_adapterdeployment_reference_blocks_the_delete_until_it_is_removed(
    cluster: ClusterHandle, namespace: str, s3_server: S3Server, tmp_path: Path
) -> None:
    store = ArtifactStore(s3_server.store_settings())
    adapter = _adapter_name()
    ours = f"{ADAPTER_ROOT}/{namespace}/adapters/{adapter}/v1"
    custom, created = _setup(cluster, namespace, adapter)
    pushed = _push(store, tmp_path, ours, adapter, created["metadata"]["uid"])  # what our trainer publishes
    custom.wait_status("FineTuneJob", "support", lambda s, _o: s.get("phase") == "Succeeded")
    _fake_trainer_report(cluster, namespace, _artifact_report(ours, pushed.digest))
    recorded = custom.wait_status("FineTuneJob", "support", lambda s, _o: bool(s.get("artifact")), what="artifact")
    assert recorded["status"]["artifact"] == {"uri": ours, "digest": pushed.digest, "sizeBytes": 64}

    ad = objects.adapter_deployment(adapters=[{"name": "support-bot", "fineTuneJobRef": {"name": "support"}}])
    ad["metadata"] = {"name": "chat", "namespace": namespace}
    custom.create(ad)
    custom.delete("FineTuneJob", "support")

    def blocked(status: dict[str, Any], obj: dict[str, Any]) -> bool:
        c = condition(status, "DeletionBlocked") or {}
        return c.get("status") == "True" and c.get("reason") == "AdapterInUse" and "chat" in c.get("message", "")

    ftj = custom.wait_status("FineTuneJob", "support", blocked, what="DeletionBlocked")
    assert ftj["metadata"]["finalizers"] == ["lorafleet.io/finalizer"]
    store.read_manifest(VersionFolder.parse(ours))  # still served

    other = {"name": "other", "artifact": {"uri": f"{ADAPTER_ROOT}/{namespace}/adapters/{_adapter_name()}/v1"}}
    custom.patch("AdapterDeployment", "chat", {"spec": {"adapters": [other]}})
    _gone(custom)
    with pytest.raises(ObjectNotFound):
        store.read_manifest(VersionFolder.parse(ours), explain=False)
    assert ours in _events(cluster, namespace)["AdapterDeleted"]


def test_a_namespace_whose_store_secret_is_gone_finishes_deleting(
    cluster: ClusterHandle, namespace: str, s3_server: S3Server
) -> None:
    settings = s3_server.store_settings()
    data = {"AWS_ACCESS_KEY_ID": settings.access_key_id, "AWS_SECRET_ACCESS_KEY": settings.secret_access_key}
    secret = client.V1Secret(
        metadata=client.V1ObjectMeta(name="team-store"),
        data={k: base64.b64encode(str(v).encode()).decode() for k, v in data.items()},
    )
    cluster.core.create_namespaced_secret(namespace, secret)
    store = {"endpoint": s3_server.endpoint, "credentialsSecretRef": {"name": "team-store"}}
    adapter = _adapter_name()
    custom, _ = _setup(cluster, namespace, adapter, store=store)
    ftj = custom.wait_status("FineTuneJob", "support", lambda s, _o: s.get("phase") == "Succeeded")
    assert ftj["metadata"]["finalizers"] == ["lorafleet.io/finalizer"]
    # A recorded artifact: the deletion has something to delete, and needs the Secret for it.
    artifact = {
        "uri": f"{ADAPTER_ROOT}/{namespace}/adapters/{adapter}/v1",
        "digest": "sha256:" + "ab" * 32,
        "sizeBytes": 64,
    }
    custom.api.patch_namespaced_custom_object_status(
        "lorafleet.io", "v1alpha1", namespace, "finetunejobs", "support", {"status": {"artifact": artifact}}
    )

    # As a namespace deletion does: the Secret goes before (or while) the FineTuneJob is finalized.
    cluster.core.delete_namespaced_secret("team-store", namespace)
    cluster.core.delete_namespace(namespace)

    def namespace_gone() -> bool:
        try:
            cluster.core.read_namespace(namespace)
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_until(namespace_gone, timeout=90, what=f"namespace {namespace} deleted")
