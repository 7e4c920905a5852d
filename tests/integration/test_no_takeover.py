"""No takeover, on the real API server with the operator running: an object a tenant made under the name a
FineTuneJob's or AdapterDeployment's child would get (a ConfigMap, RoleBinding or Service; also one carrying
lorafleet's labels with another owner) is never changed: the lorafleet object is Degraded (ChildConflict) naming
it and the fix, nothing else is created, and deleting the lorafleet object leaves the tenant's object where it
was (same resourceVersion and content). Once the name is free, the children appear. Names: a 60-character
FineTuneJob gets working children; a name its Service cannot carry is refused at admission with the rule."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from lorafleet import k8s
from lorafleet.resources import finetunejob as ftj_res
from lorafleet_dev.testing import ClusterHandle, wait_until
from tests.integration.operator_fixtures import MODEL_URI, Custom, OperatorProcess, condition
from tests.unit import objects

Obj = dict[str, Any]
TENANT = {"team": "b"}  # the tenant's own labels on its objects


def _manifest(obj: Obj, namespace: str) -> Obj:
    out = copy.deepcopy(obj)
    out["metadata"] = {"name": out["metadata"]["name"], "namespace": namespace}
    return out


def _base_model(namespace: str) -> Obj:
    bm = _manifest(objects.base_model(), namespace)
    bm["spec"]["source"] = {"uri": MODEL_URI}
    return bm


def _fine_tune_job(namespace: str, name: str = "support") -> Obj:
    ftj = _manifest(objects.fine_tune_job(name=name), namespace)
    ftj["spec"]["resources"] = {"gpusPerNode": 1, "cpu": 1, "memory": "1Gi"}
    return ftj


def _adapter_deployment(namespace: str) -> Obj:
    ad = _manifest(objects.adapter_deployment(), namespace)
    ad["spec"] = {**ad["spec"], "adapters": [], "replicas": 1}
    return ad


def _create(cluster: ClusterHandle, body: Obj) -> Obj:
    """Create as the tenant would (kubectl create): a plain POST, no lorafleet field manager."""
    k8s.use_api_client(cluster.api_client)
    res = k8s.resource(body["apiVersion"], body["kind"])
    return k8s._to_dict(k8s.dynamic_client().create(res, body=body, namespace=body["metadata"]["namespace"]))


def _config_map(cluster: ClusterHandle, namespace: str, name: str, **meta: Any) -> Obj:
    return _create(
        cluster,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(TENANT), **meta},
            "data": {"owner": "team-b"},
        },
    )


def _role_binding(cluster: ClusterHandle, namespace: str, name: str) -> Obj:
    return _create(
        cluster,
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(TENANT)},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
            "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": namespace}],
        },
    )


def _service(cluster: ClusterHandle, namespace: str, name: str, **meta: Any) -> Obj:
    labels = meta.pop("labels", TENANT)
    return _create(
        cluster,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels), **meta},
            "spec": {"selector": {"app": "team-b"}, "ports": [{"port": 80, "targetPort": 8080}]},
        },
    )


API_VERSIONS = {"ConfigMap": "v1", "Service": "v1", "RoleBinding": "rbac.authorization.k8s.io/v1"}


def _read(cluster: ClusterHandle, kind: str, namespace: str, name: str) -> Obj | None:
    k8s.use_api_client(cluster.api_client)
    return k8s.get(API_VERSIONS[kind], kind, name, namespace)


def _content(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k != "metadata"} | {
        "labels": obj["metadata"].get("labels"),
        "annotations": obj["metadata"].get("annotations"),
        "ownerReferences": obj["metadata"].get("ownerReferences"),
    }


def _conflict(kind: str, name: str) -> Callable[[Obj, Obj], bool]:
    def check(status: Obj, obj: Obj) -> bool:
        degraded = condition(status, "Degraded") or {}
        return (
            degraded.get("status") == "True"
            and degraded.get("reason") == "ChildConflict"
            and f'{kind} "{name}"' in degraded.get("message", "")
            and status.get("observedGeneration") == obj["metadata"]["generation"]
        )

    return check


CASES = [
    ("FineTuneJob", "support", "ConfigMap", "support-progress"),
    ("FineTuneJob", "support", "RoleBinding", "support-trainer"),
    ("AdapterDeployment", "chat", "Service", "chat"),
]


@pytest.mark.parametrize(("owner_kind", "owner", "kind", "name"), CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_a_tenants_object_under_a_childs_name_is_never_taken_over(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, owner_kind: str, owner: str, kind: str, name: str
) -> None:
    custom = Custom(cluster, namespace)
    make = {"ConfigMap": _config_map, "RoleBinding": _role_binding, "Service": _service}[kind]
    foreign = make(cluster, namespace, name)
    custom.create(_base_model(namespace))
    custom.create(_fine_tune_job(namespace) if owner_kind == "FineTuneJob" else _adapter_deployment(namespace))

    degraded = custom.wait_status(owner_kind, owner, _conflict(kind, name), what=f"{owner_kind} ChildConflict")
    message = condition(degraded["status"], "Degraded")["message"]  # type: ignore[index]
    assert "not created by lorafleet" in message and "delete the other object" in message, message
    assert (condition(degraded["status"], "Ready") or {}).get("status") == "False"
    time.sleep(4)  # a resync pass or two (LORAFLEET_RESYNC_SECONDS=3): still nothing changes
    after = _read(cluster, kind, namespace, name)
    assert after is not None
    assert after["metadata"]["resourceVersion"] == foreign["metadata"]["resourceVersion"]
    assert _content(after) == _content(foreign)
    # Nothing else was created either (a Job would have mounted the tenant's ConfigMap, or run as its binding).
    assert cluster.batch.list_namespaced_job(namespace).items == []
    assert client.AppsV1Api(cluster.api_client).list_namespaced_deployment(namespace).items == []

    custom.delete(owner_kind, owner)
    wait_until(lambda: custom.get(owner_kind, owner) is None, timeout=30, what=f"{owner_kind} deleted")
    time.sleep(3)  # the garbage collector had its chance
    kept = _read(cluster, kind, namespace, name)
    assert kept is not None and kept["metadata"]["resourceVersion"] == foreign["metadata"]["resourceVersion"]


def test_lorafleet_labels_with_another_owner_are_not_enough(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str
) -> None:
    """A tenant labels its Service as the AdapterDeployment's child, controlled by an object of its own."""
    anchor = _config_map(cluster, namespace, "team-b-anchor")
    spoof = {
        "labels": {**TENANT, "app.kubernetes.io/managed-by": "lorafleet", "lorafleet.io/adapterdeployment": "chat"},
    }
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "team-b-anchor", "uid": anchor["metadata"]["uid"]}
    foreign = _service(cluster, namespace, "chat", **spoof, ownerReferences=[{**ref, "controller": True}])
    custom = Custom(cluster, namespace)
    custom.create(_base_model(namespace))
    custom.create(_adapter_deployment(namespace))

    degraded = custom.wait_status("AdapterDeployment", "chat", _conflict("Service", "chat"))
    assert "controlled by ConfigMap/team-b-anchor" in condition(degraded["status"], "Degraded")["message"]  # type: ignore[index]
    after = _read(cluster, "Service", namespace, "chat")
    assert after is not None and after["metadata"]["resourceVersion"] == foreign["metadata"]["resourceVersion"]


def test_children_appear_once_the_name_is_free(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str
) -> None:
    _config_map(cluster, namespace, "support-progress")
    custom = Custom(cluster, namespace)
    custom.create(_base_model(namespace))
    custom.create(_fine_tune_job(namespace))
    custom.wait_status("FineTuneJob", "support", _conflict("ConfigMap", "support-progress"))

    cluster.core.delete_namespaced_config_map("support-progress", namespace)
    custom.wait_status(
        "FineTuneJob",
        "support",
        lambda s, o: (condition(s, "Degraded") or {}).get("status") == "False" and s.get("jobName"),
        what="FineTuneJob past the conflict",
    )
    mine = _read(cluster, "ConfigMap", namespace, "support-progress")
    assert mine is not None and mine["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"


def test_a_60_character_name_gets_working_children(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str
) -> None:
    name = "support-" + "x" * 52
    assert len(name) == 60
    custom = Custom(cluster, namespace)
    custom.create(_base_model(namespace))
    custom.create(_fine_tune_job(namespace, name))
    running = custom.wait_status(
        "FineTuneJob", name, lambda s, o: s.get("phase") == "Running", what="60-character FineTuneJob Running"
    )
    job = ftj_res.names(name).job
    assert running["status"]["jobName"] == job and len(job) <= 63
    pods = cluster.core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
    assert pods and all(len(v) <= 63 for p in pods for v in ((p.metadata and p.metadata.labels) or {}).values())


@pytest.mark.parametrize(
    ("kind", "name", "build"),
    [
        ("AdapterDeployment", "1-chat", lambda ns: _adapter_deployment(ns)),
        ("AdapterDeployment", "chat.v1", lambda ns: _adapter_deployment(ns)),
        ("FineTuneJob", "1-support", lambda ns: _distributed(_fine_tune_job(ns))),
    ],
)
def test_a_name_its_service_cannot_carry_is_refused_at_admission(
    cluster: ClusterHandle, crds: None, namespace: str, kind: str, name: str, build: Callable[[str], Obj]
) -> None:
    body = build(namespace)
    body["metadata"]["name"] = name
    with pytest.raises(ApiException) as refused:
        Custom(cluster, namespace).create(body)
    assert refused.value.status == 422
    assert "metadata.name" in str(refused.value.body) and "must start with a letter" in str(refused.value.body)


def test_a_single_pod_fine_tune_job_may_start_with_a_digit(cluster: ClusterHandle, crds: None, namespace: str) -> None:
    body = _fine_tune_job(namespace)
    body["metadata"]["name"] = "1-support"
    Custom(cluster, namespace).create(body)


def _distributed(ftj: Obj) -> Obj:
    ftj["spec"]["resources"]["nodes"] = 2
    return ftj


def test_a_create_only_apply_creates_a_free_name_and_never_touches_a_held_one(
    cluster: ClusterHandle, namespace: str
) -> None:
    # How a new child is created without reading its name first (controllers.base.execute_children): an apply whose
    # resourceVersion precondition no stored object meets.
    k8s.use_api_client(cluster.api_client)
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "free", "namespace": namespace}}
    created = k8s.apply({**cm, "data": {"a": "1"}}, field_manager="lorafleet-test", create_only=True)
    managers = {(m["manager"], m["operation"]) for m in created["metadata"]["managedFields"]}
    assert managers == {("lorafleet-test", "Apply")}  # the apply owns the fields, as later applies expect
    with pytest.raises(ApiException) as refused:
        k8s.apply({**cm, "data": {"a": "2"}}, field_manager="lorafleet-test", create_only=True)
    assert refused.value.status == 409
    after = _read(cluster, "ConfigMap", namespace, "free") or {}
    assert after["data"] == {"a": "1"}
    assert after["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
