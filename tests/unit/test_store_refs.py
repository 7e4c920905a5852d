"""A storeRef resolves only to a store the object's namespace may use, at an endpoint the platform allows, and
every URI it yields lies under that namespace's own root of the store (resources.store_refs, pure). A store a
tenant writes (inline `store`, or its ArtifactStore) never names the platform's Secret, and an inline adapter store
at the default store's endpoint (read by the sidecar with the default store's keys) is held to this namespace's
root."""

from __future__ import annotations

from typing import Any

import pytest

from lorafleet.api.adapterdeployment import ArtifactRef
from lorafleet.api.common import ObjectStore
from lorafleet.api.finetunejob import AdapterOutput
from lorafleet.api.stores import StoreRef
from lorafleet.config import OperatorSettings
from lorafleet.resources.conditions import Reason
from lorafleet.resources.store_refs import (
    require_inline_served,
    require_own_secret,
    require_within,
    resolve,
    within,
)
from lorafleet.resources.stores import RenderError

SETTINGS = OperatorSettings(
    store_endpoint="http://minio:9000",
    store_uri="s3://lorafleet/prod",
    store_allowed_endpoints=["https://rgw.storage.svc:443"],
)
CLUSTER = StoreRef(kind="ClusterArtifactStore", name="shared")
TEAM = StoreRef(kind="ArtifactStore", name="archive")


def cluster_store(**spec: Any) -> dict[str, Any]:
    base = {
        "endpoint": "http://minio:9000",
        "bucket": "lorafleet",
        "prefix": "teams",
        "credentialsSecretRef": {"name": "platform-keys"},
        "allowedNamespaces": {"names": ["team-a"], "selector": {"matchLabels": {"tenant": "yes"}}},
    }
    return {"kind": "ClusterArtifactStore", "spec": {**base, **spec}}


def test_a_cluster_store_gives_each_namespace_its_own_root() -> None:
    resolved = resolve(CLUSTER, "team-a", cluster_store(), {}, SETTINGS, "spec.output")
    assert resolved.root == "s3://lorafleet/teams/team-a"
    assert resolved.store.endpoint == "http://minio:9000"
    assert resolved.store.credentials_secret_ref is not None
    assert resolved.store.credentials_secret_ref.name == "platform-keys"


def test_a_namespace_allowed_by_its_labels_only() -> None:
    resolved = resolve(CLUSTER, "team-c", cluster_store(), {"tenant": "yes"}, SETTINGS, "spec.output")
    assert resolved.root == "s3://lorafleet/teams/team-c"


@pytest.mark.parametrize(
    ("tenant", "labels"),
    [("team-b", {}), ("team-b", {"tenant": "no"}), ("team-a-x", {})],
)
def test_a_cluster_store_refuses_namespaces_it_does_not_allow(tenant: str, labels: dict[str, str]) -> None:
    with pytest.raises(RenderError) as err:
        resolve(CLUSTER, tenant, cluster_store(), labels, SETTINGS, "spec.output")
    assert err.value.reason == Reason.STORE_NOT_ALLOWED
    assert f'ClusterArtifactStore "shared" does not allow namespace "{tenant}"' in err.value.message


def test_match_expressions() -> None:
    selector = {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["gold"]}]}
    store = cluster_store(allowedNamespaces={"selector": selector})
    assert resolve(CLUSTER, "x", store, {"tier": "gold"}, SETTINGS, "f").root.endswith("/x")
    with pytest.raises(RenderError):
        resolve(CLUSTER, "x", store, {"tier": "silver"}, SETTINGS, "f")


def test_a_store_at_an_endpoint_the_platform_does_not_allow_is_refused() -> None:
    for ref, found in (
        (CLUSTER, cluster_store(endpoint="http://evil:9000")),
        (TEAM, {"spec": {"endpoint": "http://evil:9000", "bucket": "bkt", "credentialsSecretRef": {"name": "k"}}}),
    ):
        with pytest.raises(RenderError) as err:
            resolve(ref, "team-a", found, {}, SETTINGS, "spec.output")
        assert err.value.reason == Reason.STORE_NOT_ALLOWED
        assert "artifactStore.allowedEndpoints" in err.value.message


def test_a_team_store_is_its_own_root_and_missing_stores_are_named() -> None:
    found = {"spec": {"endpoint": "https://rgw.storage.svc:443", "bucket": "archive", "prefix": "a/b"}}
    assert resolve(TEAM, "team-a", found, {}, SETTINGS, "f").root == "s3://archive/a/b"
    with pytest.raises(RenderError) as err:
        resolve(TEAM, "team-a", None, {}, SETTINGS, "spec.output")
    assert err.value.reason == Reason.STORE_NOT_FOUND
    assert 'ArtifactStore "archive" not found in namespace "team-a"' in err.value.message


def test_the_default_store_is_an_implicit_cluster_store_for_every_namespace() -> None:
    ref = StoreRef(kind="ClusterArtifactStore", name="default")
    assert resolve(ref, "anyone", None, {}, SETTINGS, "f").root == "s3://lorafleet/prod/anyone"
    with pytest.raises(RenderError) as err:
        resolve(ref, "anyone", None, {}, OperatorSettings(), "f")
    assert err.value.reason == Reason.STORE_NOT_CONFIGURED


def test_uris_must_lie_under_the_root_by_whole_segments() -> None:
    assert within("s3://lorafleet/teams/team-a/adapters/x/v1", "s3://lorafleet/teams/team-a")
    assert not within("s3://lorafleet/teams/team-ab/adapters/x/v1", "s3://lorafleet/teams/team-a")
    assert not within("s3://lorafleet/teams/team-b/adapters/x/v1", "s3://lorafleet/teams/team-a")
    resolved = resolve(CLUSTER, "team-a", cluster_store(), {}, SETTINGS, "f")
    with pytest.raises(RenderError) as err:
        require_within("s3://lorafleet/teams/team-b/adapters/x/v1", resolved, "spec.adapters[0].artifact.uri")
    assert err.value.reason == Reason.STORE_NOT_ALLOWED
    assert 'outside ClusterArtifactStore "shared"\'s location' in err.value.message


def test_store_ref_excludes_the_inline_store() -> None:
    with pytest.raises(ValueError, match=r"output\.storeRef names the store: remove output\.uri"):
        AdapterOutput.model_validate({"adapterName": "a", "uri": "s3://bkt/p", "storeRef": CLUSTER.model_dump()})
    with pytest.raises(ValueError, match=r"artifact\.storeRef names the store: remove artifact\.store"):
        ArtifactRef.model_validate(
            {"uri": "s3://bkt/p", "store": {"endpoint": "http://x:1"}, "storeRef": CLUSTER.model_dump()}
        )


PLATFORM = SETTINGS.model_copy(update={"store_credentials_secret": "platform-copy"})


def test_a_tenants_store_never_names_the_platforms_secret() -> None:
    inline = ObjectStore(endpoint="http://minio:9000", credentials_secret_ref={"name": "platform-copy"})
    with pytest.raises(RenderError) as info:
        require_own_secret(inline, PLATFORM, "spec.output.store")
    assert info.value.reason == Reason.STORE_NOT_ALLOWED
    assert 'spec.output.store.credentialsSecretRef names Secret "platform-copy"' in info.value.message
    assert "artifactStore.credentialsSecret" in info.value.message and "storeRef" in info.value.message
    require_own_secret(inline.model_copy(update={"credentials_secret_ref": None}), PLATFORM, "spec.output.store")
    own = ObjectStore(endpoint="http://minio:9000", credentials_secret_ref={"name": "team-keys"})
    require_own_secret(own, PLATFORM, "spec.output.store")  # its own Secret: accepted

    team = {"kind": "ArtifactStore", "spec": {"endpoint": "http://minio:9000", "bucket": "lorafleet",
                                              "credentialsSecretRef": {"name": "platform-copy"}}}  # fmt: skip
    with pytest.raises(RenderError) as via_ref:
        resolve(TEAM, "team-a", team, {}, PLATFORM, "spec.output")
    assert 'ArtifactStore "archive" spec.credentialsSecretRef names Secret "platform-copy"' in via_ref.value.message


def test_an_inline_adapter_store_at_the_default_endpoint_keeps_to_the_namespaces_root() -> None:
    inline = ObjectStore(endpoint="http://minio:9000/")
    field = "spec.adapters[0].artifact.store"
    require_inline_served(inline, "s3://lorafleet/prod/team-a/adapters/x/v1", "team-a", SETTINGS, field)
    with pytest.raises(RenderError) as info:
        require_inline_served(inline, "s3://lorafleet/prod/team-b/adapters/x/v1", "team-a", SETTINGS, field)
    assert info.value.reason == Reason.STORE_NOT_ALLOWED and "s3://lorafleet/prod/team-a/" in info.value.message
    elsewhere = ObjectStore(endpoint="https://rgw.storage.svc:443")  # read unsigned there: any URI
    require_inline_served(elsewhere, "s3://lorafleet/prod/team-b/adapters/x/v1", "team-a", SETTINGS, field)
