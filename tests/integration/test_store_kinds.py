"""Store kinds on the real API server and MinIO: a tenant names stores (storeRef), never another team's. An
ArtifactStore resolves in the object's own namespace only (team A naming team B's is StoreNotFound); a
ClusterArtifactStore refuses namespaces it does not allow (StoreNotAllowed naming the store and the namespace);
within one, each namespace may only name URIs under <prefix>/<namespace>/, so team B cannot serve team A's
adapters. Every refusal is a condition a user can read, and the store is not read."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from lorafleet import GROUP, VERSION
from lorafleet.storage import ArtifactStore, VersionFolder
from lorafleet_dev.s3server import S3Server
from lorafleet_dev.testing import ClusterHandle
from tests.integration.conftest import SESSION_PREFIX
from tests.integration.operator_fixtures import MODEL_URI, Custom, OperatorProcess, condition
from tests.unit import objects

pytestmark = pytest.mark.integration


@pytest.fixture
def team_b(cluster: ClusterHandle) -> Iterator[str]:
    """A second tenant namespace the session's operator watches."""
    name = f"{SESSION_PREFIX}-team-b-{uuid.uuid4().hex[:6]}"
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    cluster.core.delete_namespace(name)


@pytest.fixture
def cluster_store(cluster: ClusterHandle, s3_server: S3Server, namespace: str) -> Iterator[str]:
    """A ClusterArtifactStore over the models bucket, prefix `cas`, allowing only `namespace`."""
    api = client.CustomObjectsApi(cluster.api_client)
    name = f"shared-{uuid.uuid4().hex[:6]}"
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ClusterArtifactStore",
        "metadata": {"name": name},
        "spec": {
            "endpoint": s3_server.endpoint,
            "bucket": "models",
            "prefix": "cas",
            "credentialsSecretRef": {"name": "platform-keys"},
            "allowedNamespaces": {"names": [namespace]},
        },
    }
    api.create_cluster_custom_object(GROUP, VERSION, "clusterartifactstores", body, field_validation="Strict")
    yield name
    api.delete_cluster_custom_object(GROUP, VERSION, "clusterartifactstores", name)


def _keys(cluster: ClusterHandle, s3_server: S3Server, namespace: str, name: str) -> None:
    settings = s3_server.store_settings()
    data = {
        "AWS_ACCESS_KEY_ID": str(settings.access_key_id),
        "AWS_SECRET_ACCESS_KEY": str(settings.secret_access_key),
    }
    body = client.V1Secret(metadata=client.V1ObjectMeta(name=name), string_data=data)
    cluster.core.create_namespaced_secret(namespace, body)


def _base_model(namespace: str, name: str, uri: str, store_ref: dict[str, str]) -> dict[str, Any]:
    bm: dict[str, Any] = objects.base_model()
    bm["metadata"] = {"name": name, "namespace": namespace}
    bm["spec"] = {**bm["spec"], "source": {"uri": uri, "storeRef": store_ref}}
    return bm


def _ready(custom: Custom, kind: str, name: str, reason: str) -> dict[str, Any]:
    obj = custom.wait_status(
        kind,
        name,
        lambda s, o: (condition(s, "Ready") or {}).get("reason") == reason,
        timeout=60,
        what=f"{kind}/{name} Ready reason {reason}",
    )
    return condition(obj["status"], "Ready") or {}


def test_team_a_cannot_use_team_b_namespaced_store(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, team_b: str, s3_server: S3Server
) -> None:
    store = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ArtifactStore",
        "metadata": {"name": "team-b-store"},
        "spec": {"endpoint": s3_server.endpoint, "bucket": "models", "credentialsSecretRef": {"name": "b-keys"}},
    }
    Custom(cluster, team_b).create(store)
    _keys(cluster, s3_server, team_b, "b-keys")
    ref = {"kind": "ArtifactStore", "name": "team-b-store"}
    # Team B's own BaseModel reads the store with team B's Secret.
    Custom(cluster, team_b).create(_base_model(team_b, "m", MODEL_URI, ref))
    owned = _ready(Custom(cluster, team_b), "BaseModel", "m", "Verified")
    assert MODEL_URI in owned["message"], owned
    # Team A names the same store: it is looked up in team A's namespace, where it does not exist.
    Custom(cluster, namespace).create(_base_model(namespace, "m", MODEL_URI, ref))
    refused = _ready(Custom(cluster, namespace), "BaseModel", "m", "StoreNotFound")
    assert f'ArtifactStore "team-b-store" not found in namespace "{namespace}"' in refused["message"], refused


def test_a_cluster_store_refuses_namespaces_it_does_not_allow_and_other_namespaces_prefixes(
    cluster: ClusterHandle,
    operator: OperatorProcess,
    namespace: str,
    team_b: str,
    s3_server: S3Server,
    cluster_store: str,
    tmp_path: Path,
) -> None:
    ref = {"kind": "ClusterArtifactStore", "name": cluster_store}
    # Team A (allowed): its model lives under the store's prefix for team A and is verified. Without minted
    # credentials, the store's Secret is copied by name into the namespace (as for the default store).
    ours = f"s3://models/cas/{namespace}/models/tiny/r1"
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    ArtifactStore(s3_server.store_settings()).push(
        tmp_path, VersionFolder.parse(ours), kind="model", name="tiny", version="r1"
    )
    _keys(cluster, s3_server, namespace, "platform-keys")
    a = Custom(cluster, namespace)
    a.create(_base_model(namespace, "ours", ours, ref))
    assert ours in _ready(a, "BaseModel", "ours", "Verified")["message"]
    # Team A naming a URI outside its prefix (team B's, or the bucket's root) is refused.
    theirs = f"s3://models/cas/{team_b}/models/tiny/r1"
    a.create(_base_model(namespace, "theirs", theirs, ref))
    outside = _ready(a, "BaseModel", "theirs", "StoreNotAllowed")["message"]
    assert f'outside ClusterArtifactStore "{cluster_store}"\'s location' in outside, outside
    assert f"s3://models/cas/{namespace}/" in outside
    # Team B (not allowed) is refused by name, whatever URI it names, and nothing is read.
    b = Custom(cluster, team_b)
    b.create(_base_model(team_b, "m", ours, ref))
    refused = _ready(b, "BaseModel", "m", "StoreNotAllowed")["message"]
    assert f'ClusterArtifactStore "{cluster_store}" does not allow namespace "{team_b}"' in refused, refused
    # Team B's AdapterDeployment naming team A's adapter location through the store is refused as well.
    ad: dict[str, Any] = objects.adapter_deployment()
    ad["metadata"] = {"name": "steal", "namespace": team_b}
    ad["spec"]["baseModelRef"] = {"name": "m"}
    ad["spec"]["adapters"] = [
        {"name": "x", "artifact": {"uri": f"s3://models/cas/{namespace}/adapters/x/v1", "storeRef": ref}}
    ]
    b.create(ad)
    status = b.wait_status(
        "AdapterDeployment",
        "steal",
        lambda s, o: any(c.get("reason") == "StoreNotAllowed" for c in s.get("conditions") or []),
        timeout=60,
        what="the AdapterDeployment refused with StoreNotAllowed",
    )
    messages = " ".join(c.get("message", "") for c in status["status"]["conditions"])
    assert f'does not allow namespace "{team_b}"' in messages, messages
    assert not cluster.apps.list_namespaced_deployment(team_b).items  # nothing rendered


def test_crds_refuse_a_store_ref_beside_an_inline_store(
    cluster: ClusterHandle, crds: None, namespace: str, s3_server: S3Server
) -> None:
    bm = _base_model(namespace, "both", MODEL_URI, {"kind": "ClusterArtifactStore", "name": "default"})
    bm["spec"]["source"]["store"] = {"endpoint": s3_server.endpoint}
    with pytest.raises(client.ApiException) as err:
        Custom(cluster, namespace).create(bm)
    assert err.value.status == 422 and "source.storeRef names the store: remove source.store" in str(err.value.body)
