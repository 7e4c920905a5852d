"""Tenant A attacks tenant B (issue 15, point 8), on the real API server, MinIO, the operator and the serving gateway.

Two teams, each a namespace with ServiceAccounts that hold only what a team gets (the Role TEAM_EDIT: lorafleet
objects, ConfigMaps, Secrets and Services read/write, pods and their logs read-only); every attack is made AS
team A's ServiceAccount (impersonated with the admin kubeconfig: `Impersonate-User`), so the API server's own
RBAC applies. Invariant: each row is refused or harmless, and the refusal is readable: an HTTP status with the
API server's message, or a condition (reason and message) on the attacker's object. A row the code does not
defend yet is `xfail(strict=True)` with "open:" and is listed as open in docs/security.md.

What stands in for a tenant's reach beyond RBAC: a trainer report is written by a pod the test makes with the
Job's labels (the trainer runs `spec.image`, the tenant's own code), and a forged status.artifact is written with
the admin client (it is what a report once put there)."""

from __future__ import annotations

import contextlib
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from lorafleet import GROUP, VERSION
from lorafleet.resources import adapterdeployment as ad_res
from lorafleet.resources import finetunejob as ftj_res
from lorafleet.storage import ArtifactStore, VersionFolder
from lorafleet_dev.s3server import S3Server
from lorafleet_dev.testing import ClusterHandle, wait_until
from lorafleet_dev.vllm_local import SidecarServer
from tests.integration.conftest import SESSION_PREFIX
from tests.integration.operator_fixtures import ADAPTER_ROOT, MODEL_URI, Custom, OperatorProcess, condition
from tests.integration.test_gateway_guard import CAP, _post, sidecar, upstream  # noqa: F401 (fixtures)
from tests.integration.test_no_takeover import _base_model, _conflict, _content
from tests.integration.test_safe_deletion import _artifact_report, _events, _fake_trainer_report, _push, _rejected
from tests.integration.test_validation import FTJ, _set
from tests.unit import objects

Obj = dict[str, Any]
TEAM_EDIT = [
    {
        "apiGroups": [GROUP],
        "resources": ["basemodels", "finetunejobs", "adapterdeployments"],
        "verbs": ["create", "get", "list", "watch", "update", "patch", "delete"],
    },
    {
        "apiGroups": [""],
        "resources": ["configmaps", "secrets", "services"],
        "verbs": ["create", "get", "list", "watch", "update", "patch", "delete"],
    },
    {"apiGroups": [""], "resources": ["pods", "pods/log", "events"], "verbs": ["get", "list", "watch"]},
]


@dataclass
class Team:
    namespace: str
    admin: ClusterHandle  # the platform team (the test's own hands)
    as_team: ClusterHandle  # the team's ServiceAccount "team", impersonated
    as_intruder: ClusterHandle  # another member's ServiceAccount in the same namespace ("intruder", same Role)

    @property
    def custom(self) -> Custom:
        return Custom(self.as_team, self.namespace)


@dataclass
class World:
    a: Team
    b: Team
    s3_server: S3Server
    tmp_path: Path
    request: pytest.FixtureRequest


def _impersonating(cluster: ClusterHandle, namespace: str, account: str) -> ClusterHandle:
    api = client.ApiClient(cluster.api_client.configuration)
    api.set_default_header("Impersonate-User", f"system:serviceaccount:{namespace}:{account}")
    return ClusterHandle(cluster.kubeconfig, api, local=cluster.local)


def _team(cluster: ClusterHandle, letter: str) -> Team:
    namespace = f"{SESSION_PREFIX}-team-{letter}-{uuid.uuid4().hex[:6]}"
    core, rbac = cluster.core, client.RbacAuthorizationV1Api(cluster.api_client)
    meta = client.V1ObjectMeta
    core.create_namespace(client.V1Namespace(metadata=meta(name=namespace, labels={"lorafleet.io/test": "true"})))
    rbac.create_namespaced_role(namespace, client.V1Role(metadata=meta(name="team-edit"), rules=TEAM_EDIT))
    for account in ("team", "intruder"):
        core.create_namespaced_service_account(namespace, client.V1ServiceAccount(metadata=meta(name=account)))
        binding = client.V1RoleBinding(
            metadata=meta(name=f"{account}-edit"),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="team-edit"),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name=account, namespace=namespace)],
        )
        rbac.create_namespaced_role_binding(namespace, binding)
    wait_until(
        lambda: any(sa.metadata.name == "default" for sa in core.list_namespaced_service_account(namespace).items),
        timeout=30,
        what=f"ServiceAccount default in {namespace}",
    )
    return Team(
        namespace, cluster, _impersonating(cluster, namespace, "team"), _impersonating(cluster, namespace, "intruder")
    )


@pytest.fixture(scope="module")
def teams(cluster: ClusterHandle, operator: OperatorProcess) -> Iterator[tuple[Team, Team]]:
    a, b = _team(cluster, "a"), _team(cluster, "b")
    try:
        a.custom.create(_base_model(a.namespace))  # as team A: its own base model, Ready from the default store
        yield a, b
    finally:
        for team in (a, b):
            team.as_team.api_client.close()
            team.as_intruder.api_client.close()
            cluster.core.delete_namespace(team.namespace, propagation_policy="Background")


@pytest.fixture
def world(teams: tuple[Team, Team], s3_server: S3Server, tmp_path: Path, request: pytest.FixtureRequest) -> World:
    return World(teams[0], teams[1], s3_server, tmp_path, request)


def _refused(call: Callable[[], object], status: int, *words: str) -> str:
    """The call fails with `status` and a body naming `words`; returns the body."""
    with pytest.raises(ApiException) as raised:
        call()
    body = str(raised.value.body)
    assert raised.value.status == status, body
    for word in words:
        assert word in body, f"{word!r} not in {body}"
    return body


def _unique() -> str:
    return f"a{uuid.uuid4().hex[:10]}"


def _b_adapter(w: World) -> tuple[ArtifactStore, str, str]:
    """Team B's adapter version in the default store, under B's root (its lineage names a B job's UID)."""
    store = ArtifactStore(w.s3_server.store_settings())
    name = _unique()
    uri = f"{ADAPTER_ROOT}/{w.b.namespace}/adapters/{name}/v1"
    pushed = _push(store, w.tmp_path, uri, name, f"uid-of-{w.b.namespace}-job")
    return store, uri, str(pushed.digest)


def _fine_tune_job(namespace: str, name: str, adapter: str) -> Obj:
    ftj = objects.fine_tune_job(name=name)
    ftj["metadata"] = {"name": name, "namespace": namespace}
    ftj["spec"]["resources"] = {
        "gpusPerNode": 1, "cpu": 1, "memory": "1Gi", "podAnnotations": {"lorafleet.io/kwok-duration": "2s"},
    }  # fmt: skip
    ftj["spec"]["output"] = {"adapterName": adapter, "version": "v1", "deletionPolicy": "Delete"}
    return ftj


def _succeeded(custom: Custom, name: str) -> Obj:
    return custom.wait_status("FineTuneJob", name, lambda s, _o: s.get("phase") == "Succeeded", what=f"{name} done")


# -- RBAC: a team's account reaches only its own namespace ----------------------------------------------------------


def read_b_secret(w: World) -> None:
    w.b.admin.core.create_namespaced_secret(
        w.b.namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="b-store"), string_data={"k": "b-private"})
    )
    _refused(
        lambda: w.a.as_team.core.read_namespaced_secret("b-store", w.b.namespace),
        403,
        'cannot get resource \\"secrets\\"',
        w.b.namespace,
    )


def list_b_config_maps(w: World) -> None:
    _refused(
        lambda: w.a.as_team.core.list_namespaced_config_map(w.b.namespace),
        403,
        'cannot list resource \\"configmaps\\"',
        w.b.namespace,
    )


def create_in_b_namespace(w: World) -> None:
    body = _fine_tune_job(w.b.namespace, "planted", _unique())
    _refused(lambda: Custom(w.a.as_team, w.b.namespace).create(body), 403, "finetunejobs", w.b.namespace)


def grant_itself_a_role_binding(w: World) -> None:
    binding = client.V1RoleBinding(
        metadata=client.V1ObjectMeta(name="escalate"),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole", name="admin"),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name="team", namespace=w.a.namespace)],
    )
    rbac = client.RbacAuthorizationV1Api(w.a.as_team.api_client)
    _refused(lambda: rbac.create_namespaced_role_binding(w.a.namespace, binding), 403, "rolebindings")


def forge_own_status(w: World) -> None:
    name = "forger"
    w.a.custom.create(_fine_tune_job(w.a.namespace, name, _unique()))
    forged = {
        "status": {
            "artifact": {"uri": f"{ADAPTER_ROOT}/{w.a.namespace}/adapters/x/v1", "digest": "sha256:" + "ab" * 32}
        }
    }
    api = w.a.custom.api
    _refused(
        lambda: api.patch_namespaced_custom_object_status(GROUP, VERSION, w.a.namespace, "finetunejobs", name, forged),
        403,
        "finetunejobs/status",
    )


# -- No takeover: names in one's own namespace ----------------------------------------------------------------------


def _service(team: Team, name: str) -> Obj:
    read = team.admin.core.read_namespaced_service(name, team.namespace)
    return team.admin.api_client.sanitize_for_serialization(read)  # type: ignore[no-any-return]


def squat_a_child_service(w: World) -> None:
    """An intruder in A's namespace creates the Service an AdapterDeployment a colleague will create needs."""
    squat = client.V1Service(
        metadata=client.V1ObjectMeta(name="chat", labels={"team": "intruder"}),
        spec=client.V1ServiceSpec(selector={"app": "intruder"}, ports=[client.V1ServicePort(port=80)]),
    )
    w.a.as_intruder.core.create_namespaced_service(w.a.namespace, squat)
    before = w.a.admin.api_client.sanitize_for_serialization(
        w.a.admin.core.read_namespaced_service("chat", w.a.namespace)
    )
    ad = objects.adapter_deployment()
    ad["metadata"] = {"name": "chat", "namespace": w.a.namespace}
    ad["spec"] = {**ad["spec"], "adapters": [], "replicas": 1}
    w.a.custom.create(ad)
    degraded = w.a.custom.wait_status("AdapterDeployment", "chat", _conflict("Service", "chat"), what="ChildConflict")
    assert "delete the other object" in condition(degraded["status"], "Degraded")["message"]  # type: ignore[index]
    after = w.a.admin.api_client.sanitize_for_serialization(
        w.a.admin.core.read_namespaced_service("chat", w.a.namespace)
    )
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert _content(after) == _content(before)


def operator_overwrites_a_role_binding(w: World) -> None:
    """A may not write RoleBindings; a FineTuneJob whose trainer binding has the name of the platform's one must not
    make the operator (which may) rewrite it."""
    name = "binder"
    rb_name = ftj_res.names(name).service_account  # the trainer's RoleBinding shares its ServiceAccount's name
    rbac = client.RbacAuthorizationV1Api(w.a.admin.api_client)
    platform = rbac.create_namespaced_role_binding(
        w.a.namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name=rb_name, labels={"owner": "platform"}),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole", name="view"),
            subjects=[client.RbacV1Subject(kind="Group", name="auditors")],
        ),
    )
    w.a.custom.create(_fine_tune_job(w.a.namespace, name, _unique()))
    w.a.custom.wait_status("FineTuneJob", name, _conflict("RoleBinding", rb_name), what="ChildConflict")
    after = rbac.read_namespaced_role_binding(rb_name, w.a.namespace)
    assert after.metadata.resource_version == platform.metadata.resource_version
    assert [s.name for s in after.subjects] == ["auditors"]


# -- Untrusted reports, safe deletion ---------------------------------------------------------------------------------


def report_claims_b_adapter(w: World) -> None:
    store, theirs, digest = _b_adapter(w)
    w.a.custom.create(_fine_tune_job(w.a.namespace, "support", _unique()))
    _succeeded(w.a.custom, "support")
    _fake_trainer_report(w.a.admin, w.a.namespace, _artifact_report(theirs, digest))
    ftj = w.a.custom.wait_status("FineTuneJob", "support", _rejected, what="ArtifactRejected")
    assert "artifact" not in ftj["status"]
    assert theirs in condition(ftj["status"], "Degraded")["message"]  # type: ignore[index]
    w.a.custom.delete("FineTuneJob", "support")
    wait_until(lambda: w.a.custom.get("FineTuneJob", "support") is None, timeout=60, what="support deleted")
    store.read_manifest(VersionFolder.parse(theirs))  # B's adapter is still there


def delete_policy_on_forged_b_uri(w: World) -> None:
    store, theirs, digest = _b_adapter(w)
    name = "wiper"
    w.a.custom.create(_fine_tune_job(w.a.namespace, name, _unique()))
    _succeeded(w.a.custom, name)
    artifact = {"uri": theirs, "digest": digest, "sizeBytes": 64}
    _forge_status(w, name, artifact)  # as a report once could
    w.a.custom.delete("FineTuneJob", name)
    wait_until(lambda: w.a.custom.get("FineTuneJob", name) is None, timeout=60, what=f"{name} deleted")
    store.read_manifest(VersionFolder.parse(theirs))  # B's adapter survives
    assert theirs in _events(w.a.admin, w.a.namespace)["AdapterNotDeleted"]


def _forge_status(w: World, name: str, artifact: Obj) -> None:
    client.CustomObjectsApi(w.a.admin.api_client).patch_namespaced_custom_object_status(
        GROUP, VERSION, w.a.namespace, "finetunejobs", name, {"status": {"artifact": artifact}}
    )


# -- Stores: a tenant's endpoint never gets a credential --------------------------------------------------------------


def store_endpoint_exfiltration(w: World) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.5)
    secret = client.V1Secret(
        metadata=client.V1ObjectMeta(name="any-secret"),
        string_data={"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": f"exfiltrate-{uuid.uuid4().hex}"},
    )
    w.a.as_team.core.create_namespaced_secret(w.a.namespace, secret)
    bm = _base_model(w.a.namespace)
    bm["metadata"]["name"] = "exfil"
    store = {
        "endpoint": f"http://127.0.0.1:{listener.getsockname()[1]}",
        "credentialsSecretRef": {"name": "any-secret"},
    }
    bm["spec"]["source"]["store"] = store
    try:
        w.a.custom.create(bm)
        refused = w.a.custom.wait_status(
            "BaseModel",
            "exfil",
            lambda s, _o: (condition(s, "Ready") or {}).get("reason") == "StoreNotAllowed",
            what="StoreNotAllowed",
        )
        assert "allowedEndpoints" in condition(refused["status"], "Ready")["message"]  # type: ignore[index]
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody ever connected
    finally:
        listener.close()


def name_b_store(w: World) -> None:
    """A names team B's ArtifactStore (and so B's Secret): looked up in A's namespace only."""
    store = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ArtifactStore",
        "metadata": {"name": "b-store", "namespace": w.b.namespace},
        "spec": {"endpoint": w.s3_server.endpoint, "bucket": "models", "credentialsSecretRef": {"name": "b-keys"}},
    }
    Custom(w.b.admin, w.b.namespace).create(store)
    bm = _base_model(w.a.namespace)
    bm["metadata"]["name"] = "borrowed"
    bm["spec"]["source"] = {"uri": MODEL_URI, "storeRef": {"kind": "ArtifactStore", "name": "b-store"}}
    w.a.custom.create(bm)
    refused = w.a.custom.wait_status(
        "BaseModel", "borrowed", lambda s, _o: (condition(s, "Ready") or {}).get("reason") == "StoreNotFound"
    )
    message = condition(refused["status"], "Ready")["message"]  # type: ignore[index]
    assert f'ArtifactStore "b-store" not found in namespace "{w.a.namespace}"' in message, message


def serve_b_prefix_through_cluster_store(w: World) -> None:
    """Through a ClusterArtifactStore both teams may use, A names an adapter under B's prefix: StoreNotAllowed."""
    api = client.CustomObjectsApi(w.a.admin.api_client)
    name = f"shared-{uuid.uuid4().hex[:6]}"
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ClusterArtifactStore",
        "metadata": {"name": name},
        "spec": {
            "endpoint": w.s3_server.endpoint,
            "bucket": "models",
            "prefix": "cas",
            "credentialsSecretRef": {"name": "platform-keys"},
            "allowedNamespaces": {"names": [w.a.namespace, w.b.namespace]},
        },
    }
    api.create_cluster_custom_object(GROUP, VERSION, "clusterartifactstores", body)
    try:
        ref = {"kind": "ClusterArtifactStore", "name": name}
        theirs = f"s3://models/cas/{w.b.namespace}/adapters/x/v1"
        ad = objects.adapter_deployment(adapters=[{"name": "x", "artifact": {"uri": theirs, "storeRef": ref}}])
        ad["metadata"] = {"name": "prefix-thief", "namespace": w.a.namespace}
        ad["spec"]["replicas"] = 1
        w.a.custom.create(ad)
        refused = w.a.custom.wait_status(
            "AdapterDeployment",
            "prefix-thief",
            lambda s, _o: any(c.get("reason") == "StoreNotAllowed" for c in s.get("conditions") or []),
            what="StoreNotAllowed",
        )
        messages = " ".join(c.get("message", "") for c in refused["status"]["conditions"])
        assert f"s3://models/cas/{w.a.namespace}/" in messages, messages
        deployments = w.a.admin.apps.list_namespaced_deployment(w.a.namespace).items
        assert ad_res.names("prefix-thief").deployment not in [d.metadata.name for d in deployments]  # not rendered
    finally:
        api.delete_cluster_custom_object(GROUP, VERSION, "clusterartifactstores", name)


@contextlib.contextmanager
def _minting_store(w: World, *namespaces: str) -> Iterator[str]:
    """A ClusterArtifactStore with spec.sts (the keys that mint stay in the operator's namespace) allowing
    `namespaces`; yields its name and removes it afterwards."""
    api = client.CustomObjectsApi(w.a.admin.api_client)
    name = f"minting-{uuid.uuid4().hex[:6]}"
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ClusterArtifactStore",
        "metadata": {"name": name},
        "spec": {
            "endpoint": w.s3_server.endpoint,
            "bucket": "models",
            "prefix": "sts",
            "credentialsSecretRef": {"name": "platform-keys"},
            "allowedNamespaces": {"names": list(namespaces)},
            "sts": {"enabled": True},
        },
    }
    api.create_cluster_custom_object(GROUP, VERSION, "clusterartifactstores", body)
    try:
        yield name
    finally:
        api.delete_cluster_custom_object(GROUP, VERSION, "clusterartifactstores", name)


def _store_not_allowed(status: Obj, _obj: Obj) -> bool:
    return (condition(status, "Ready") or {}).get("reason") == "StoreNotAllowed"


def base_model_in_minting_store_not_allowed(w: World) -> None:
    """A's BaseModel names a minting ClusterArtifactStore that allows only B: StoreNotAllowed naming A's namespace
    and allowedNamespaces; the store is neither read nor minted for."""
    with _minting_store(w, w.b.namespace) as store:
        bm = _base_model(w.a.namespace)
        bm["metadata"]["name"] = "not-allowed"
        uri = f"s3://models/sts/{w.a.namespace}/models/x/v1"
        bm["spec"]["source"] = {"uri": uri, "storeRef": {"kind": "ClusterArtifactStore", "name": store}}
        w.a.custom.create(bm)
        refused = w.a.custom.wait_status("BaseModel", "not-allowed", _store_not_allowed, what="StoreNotAllowed")
    message = condition(refused["status"], "Ready")["message"]  # type: ignore[index]
    assert f'does not allow namespace "{w.a.namespace}"' in message and "allowedNamespaces" in message, message
    assert "digest" not in refused["status"]  # nothing was read


def fine_tune_on_b_weights_in_minting_store(w: World) -> None:
    """A's FineTuneJob, its output in a minting ClusterArtifactStore both teams may use, names a BaseModel whose
    weights lie in B's location of that store: the BaseModel is StoreNotAllowed naming A's location, the job waits
    on it and nothing is minted or rendered (had it been, the keys minted for A would reach A's location only)."""
    with _minting_store(w, w.a.namespace, w.b.namespace) as store:
        ref = {"kind": "ClusterArtifactStore", "name": store}
        theirs = f"s3://models/sts/{w.b.namespace}/models/weights/v1"
        _push(ArtifactStore(w.s3_server.store_settings()), w.tmp_path, theirs, "weights", "uid-of-b")
        bm = _base_model(w.a.namespace)
        bm["metadata"]["name"] = "b-weights"
        bm["spec"]["source"] = {"uri": theirs, "storeRef": ref}
        w.a.custom.create(bm)
        name = "on-b-weights"
        ftj = _fine_tune_job(w.a.namespace, name, _unique())
        ftj["spec"]["baseModelRef"] = {"name": "b-weights"}
        ftj["spec"]["output"] = {"adapterName": _unique(), "version": "v1", "storeRef": ref}
        w.a.custom.create(ftj)
        refused = w.a.custom.wait_status("BaseModel", "b-weights", _store_not_allowed, what="StoreNotAllowed")
        message = condition(refused["status"], "Ready")["message"]  # type: ignore[index]
        assert theirs in message and f"s3://models/sts/{w.a.namespace}/" in message, message

        def waits(status: Obj, _obj: Obj) -> bool:
            ready = condition(status, "Ready") or {}
            return ready.get("reason") == "BaseModelNotReady" and theirs in ready.get("message", "")

        w.a.custom.wait_status("FineTuneJob", name, waits, what="BaseModelNotReady naming B's location")
        time.sleep(2)  # a later pass must not render or mint either
        names = ftj_res.names(name)
        assert names.job not in [j.metadata.name for j in w.a.admin.batch.list_namespaced_job(w.a.namespace).items]
        minted = f"metadata.name={names.credentials}"
        assert not w.a.admin.core.list_namespaced_secret(w.a.namespace, field_selector=minted).items


# -- Bad input: refused at admission, naming the field -------------------------------------------------------------


def pvc_path_escape(w: World) -> None:
    body = _set(FTJ, "spec.dataset.uri", "pvc://claim/../x")
    _refused(lambda: w.a.custom.create(body), 422, "spec.dataset.uri")


def memory_lots(w: World) -> None:
    body = _set(_set(FTJ, "metadata.name", "lots"), "spec.resources.memory", "lots")
    _refused(lambda: w.a.custom.create(body), 422, "spec.resources.memory")


# -- Serving ----------------------------------------------------------------------------------------------------------


def serve_b_adapter(w: World) -> None:
    """A's AdapterDeployment names B's adapter URI in the default store (no storeRef): StoreNotAllowed naming A's
    root, and it never reaches A's replicas' desired set."""
    _store, theirs, digest = _b_adapter(w)
    ad = objects.adapter_deployment(adapters=[{"name": "stolen", "artifact": {"uri": theirs, "digest": digest}}])
    ad["metadata"] = {"name": "thief", "namespace": w.a.namespace}
    ad["spec"]["replicas"] = 1
    w.a.custom.create(ad)
    refused = w.a.custom.wait_status(
        "AdapterDeployment",
        "thief",
        lambda s, _o: any(c.get("reason") == "StoreNotAllowed" for c in s.get("conditions") or []),
        what="StoreNotAllowed",
    )
    messages = " ".join(c.get("message", "") for c in refused["status"]["conditions"])
    assert f"{ADAPTER_ROOT}/{w.a.namespace}/" in messages and theirs in messages, messages
    time.sleep(2)  # a later pass must not render it either
    try:
        desired = w.a.admin.core.read_namespaced_config_map(ad_res.names("thief").adapters, w.a.namespace)
    except client.ApiException as exc:
        assert exc.status == 404  # not rendered at all
    else:
        assert theirs not in str(desired.data), "B's adapter is in A's desired set: A's replicas would pull it"


def serve_b_adapter_via_inline_store(w: World) -> None:
    """A's AdapterDeployment names B's adapter with an inline store at the default store's endpoint (no Secret):
    the sidecar would read that endpoint with the default store's keys, so the default store's rule holds:
    StoreNotAllowed naming A's root, nothing rendered."""
    _store, theirs, digest = _b_adapter(w)
    inline = {"endpoint": w.s3_server.endpoint}
    ad = objects.adapter_deployment(
        adapters=[{"name": "stolen", "artifact": {"uri": theirs, "digest": digest, "store": inline}}]
    )
    ad["metadata"] = {"name": "inline-thief", "namespace": w.a.namespace}
    ad["spec"]["replicas"] = 1
    w.a.custom.create(ad)
    refused = w.a.custom.wait_status(
        "AdapterDeployment",
        "inline-thief",
        lambda s, _o: any(c.get("reason") == "StoreNotAllowed" for c in s.get("conditions") or []),
        what="StoreNotAllowed",
    )
    messages = " ".join(c.get("message", "") for c in refused["status"]["conditions"])
    assert f"{ADAPTER_ROOT}/{w.a.namespace}/" in messages and theirs in messages, messages
    deployments = w.a.admin.apps.list_namespaced_deployment(w.a.namespace).items
    assert ad_res.names("inline-thief").deployment not in [d.metadata.name for d in deployments]  # not rendered


def read_b_adapter_as_base_model(w: World) -> None:
    """A's BaseModel (shared read-only in the default store) names B's adapter folder: StoreNotAllowed, not read."""
    _store, theirs, _digest = _b_adapter(w)
    bm = _base_model(w.a.namespace)
    bm["metadata"]["name"] = "borrowed-weights"
    bm["spec"]["source"] = {"uri": theirs}
    w.a.custom.create(bm)
    refused = w.a.custom.wait_status(
        "BaseModel",
        "borrowed-weights",
        lambda s, _o: (condition(s, "Ready") or {}).get("reason") == "StoreNotAllowed",
        what="StoreNotAllowed",
    )
    message = condition(refused["status"], "Ready")["message"]  # type: ignore[index]
    assert theirs in message and f"{ADAPTER_ROOT}/{w.a.namespace}/" in message, message
    assert "digest" not in refused["status"]  # nothing was read


def gateway_without_key(w: World) -> None:
    server: SidecarServer = w.request.getfixturevalue("sidecar")
    status, body = _post(server.url, {"model": "secret-bot", "prompt": "hi"})
    assert status == 401 and "Authorization: Bearer" in body["error"]["message"], body


def gateway_oversized_body(w: World) -> None:
    server: SidecarServer = w.request.getfixturevalue("sidecar")
    status, body = _post(server.url, {"model": "base", "prompt": "x" * CAP})
    assert status == 413 and f"{CAP} bytes" in body["error"]["message"], body


ATTACKS = [
    pytest.param(read_b_secret, id="read-b-secret"),
    pytest.param(list_b_config_maps, id="list-b-configmaps"),
    pytest.param(create_in_b_namespace, id="create-in-b-namespace"),
    pytest.param(grant_itself_a_role_binding, id="grant-itself-a-rolebinding"),
    pytest.param(forge_own_status, id="forge-finetunejob-status"),
    pytest.param(squat_a_child_service, id="squat-child-service"),
    pytest.param(operator_overwrites_a_role_binding, id="operator-overwrites-rolebinding"),
    pytest.param(report_claims_b_adapter, id="report-claims-b-adapter"),
    pytest.param(delete_policy_on_forged_b_uri, id="delete-forged-b-uri"),
    pytest.param(store_endpoint_exfiltration, id="store-endpoint-exfiltration"),
    pytest.param(name_b_store, id="name-b-artifactstore"),
    pytest.param(serve_b_prefix_through_cluster_store, id="serve-b-prefix-via-clusterartifactstore"),
    pytest.param(base_model_in_minting_store_not_allowed, id="base-model-in-minting-store-not-allowed"),
    pytest.param(fine_tune_on_b_weights_in_minting_store, id="fine-tune-on-b-weights-in-minting-store"),
    pytest.param(pvc_path_escape, id="pvc-path-escape"),
    pytest.param(memory_lots, id="memory-lots"),
    pytest.param(serve_b_adapter, id="serve-b-adapter"),
    pytest.param(serve_b_adapter_via_inline_store, id="serve-b-adapter-via-inline-store"),
    pytest.param(read_b_adapter_as_base_model, id="read-b-adapter-as-base-model"),
    pytest.param(gateway_without_key, id="gateway-without-key"),
    pytest.param(gateway_oversized_body, id="gateway-oversized-body"),
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_is_refused_or_harmless(world: World, attack: Callable[[World], None]) -> None:
    attack(world)
