"""What a serving replica's minted store credentials may reach (pure; Helm artifactStore.sts).

The adapter-sync sidecar and the base-model fetch of an AdapterDeployment get read-only keys, minted by the
operator with the platform's keys (controllers.credentials) into a Secret the AdapterDeployment controls: they
read the namespace's root of the default store (`<artifactStore.uri>/<namespace>/`, where its adapters are) and
the BaseModel's weights when those are in the default store; nothing is writable. The sidecar reads the keys from
a Secret volume, which the kubelet refreshes in place, so renewed keys reach a running replica
(storage.sts_files).

A ClusterArtifactStore with spec.sts mints for the replicas whose adapters are in it (`minting_store`): read-only
keys for that namespace's location in that store (and the BaseModel's weights when they are there too), minted
with the store's keys from the operator's namespace; the sidecar holds those keys for that store's endpoint only.
One store per AdapterDeployment then: the sidecar holds one key set.
"""

from __future__ import annotations

from collections.abc import Mapping

from lorafleet.api.basemodel import BaseModelSpec
from lorafleet.api.common import ObjectStore, S3CredentialsRef
from lorafleet.api.objects import AdapterDeploymentObject, FineTuneJobObject
from lorafleet.config import OperatorSettings
from lorafleet.resources.common import Obj, child_name
from lorafleet.resources.conditions import Reason
from lorafleet.resources.status.adapterdeployment import all_versions
from lorafleet.resources.store_refs import (
    MintingStore,
    default_location,
    require_shared_readable,
    same_minting_store,
)
from lorafleet.resources.stores import RenderError, default_store
from lorafleet.storage.sts_policy import SECRET_KEYS, Grant
from lorafleet.uris import parse

VOLUME = "store-credentials"
MOUNT = "/etc/lorafleet/store-credentials"


def secret_name(ad_name: str) -> str:
    """Not `<name>-store`: a FineTuneJob of the same name writes its own minted Secret there."""
    return child_name(ad_name, "serving-store")


def serving_grant(ad: AdapterDeploymentObject, base: BaseModelSpec, settings: OperatorSettings) -> Grant | None:
    """Read-only: this namespace's root of the default store and the base model's weights when they are in the
    default store (never another namespace's root: StoreNotAllowed). None without artifactStore.sts."""
    if not settings.store_sts or not settings.store_endpoint or not settings.store_uri:
        return None
    read_only = [default_location(ad.namespace, settings, "spec.adapters").root]
    if parse(base.source.uri).scheme == "s3" and platform_source(base, settings):
        require_shared_readable(base.source.uri, ad.namespace, settings, "BaseModel spec.source.uri")
        read_only.append(base.source.uri.rstrip("/"))
    return Grant(read_write=(), read_only=tuple(dict.fromkeys(read_only)))


def minting_store(ad: AdapterDeploymentObject, jobs: Mapping[str, FineTuneJobObject | None]) -> MintingStore | None:
    """The ClusterArtifactStore with spec.sts that this AdapterDeployment's adapters are in (their bound stores:
    an artifact's, a FineTuneJob's output), None when none is. RenderError (StoreNotAllowed) when adapters are in
    such a store and elsewhere too: the sidecar holds one key set, for one store's endpoint."""
    stores: list[tuple[str, ObjectStore | None]] = []
    for version in all_versions(ad):
        if version.artifact is not None:
            stores.append((f"adapter {version.key!r}", version.artifact.store))
        elif version.fine_tune_job_ref is not None:
            job = jobs.get(version.fine_tune_job_ref.name)
            if job is not None:
                stores.append((f"adapter {version.key!r}", job.spec.output.store))
    minting = next((store for _, store in stores if isinstance(store, MintingStore)), None)
    if minting is None:
        return None
    for what, store in stores:
        if not isinstance(store, MintingStore) or store.store_name != minting.store_name:
            raise RenderError(
                Reason.STORE_NOT_ALLOWED,
                f'{what} is not in ClusterArtifactStore "{minting.store_name}", whose spec.sts mints this '
                "AdapterDeployment's read-only store credentials for its other adapters: the serving sidecar holds "
                "one store's keys; serve adapters of other stores from another AdapterDeployment",
            )
    return minting


def cluster_serving_grant(store: MintingStore, base: BaseModelSpec) -> Grant:
    """Read-only: the namespace's location in a minting ClusterArtifactStore, and the base model's weights when
    they are in that store too (bound through storeRef, hence inside that location already)."""
    read_only = [store.root]
    source = base.source
    if parse(source.uri).scheme == "s3" and same_minting_store(source.store, store):
        read_only.append(source.uri.rstrip("/"))
    return Grant(read_write=(), read_only=tuple(dict.fromkeys(read_only)))


def platform_source(base: BaseModelSpec, settings: OperatorSettings) -> bool:
    """The base model's weights are in the default store (no store named, or storeRef ClusterArtifactStore
    "default", bound to an equal inline store)."""
    return base.source.store is None or base.source.store == default_store(settings)


def minted_store(store: ObjectStore, secret: str) -> ObjectStore:
    """The default store as a replica reaches it: no Secret of the platform's, the minted one instead."""
    return store.model_copy(update={"credentials_secret_ref": S3CredentialsRef(name=secret)})


def session_token_env(secret: str) -> Obj:
    return {"name": SECRET_KEYS[2], "valueFrom": {"secretKeyRef": {"name": secret, "key": SECRET_KEYS[2]}}}


def sidecar_volume(secret: str) -> tuple[Obj, Obj, list[str]]:
    """(volume, mount, args): the keys as files, refreshed in place by the kubelet."""
    volume = {"name": VOLUME, "secret": {"secretName": secret, "defaultMode": 0o440}}
    mount = {"name": VOLUME, "mountPath": MOUNT, "readOnly": True}
    return volume, mount, [f"--store-credentials-dir={MOUNT}"]
