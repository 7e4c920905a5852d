"""What a serving replica's minted store credentials may reach (pure; Helm artifactStore.sts).

The adapter-sync sidecar and the base-model fetch of an AdapterDeployment get read-only keys, minted by the
operator with the platform's keys (controllers.credentials) into a Secret the AdapterDeployment controls: they
read the namespace's root of the default store (`<artifactStore.uri>/<namespace>/`, where its adapters are) and
the BaseModel's weights when those are in the default store; nothing is writable. The sidecar reads the keys from
a Secret volume, which the kubelet refreshes in place, so renewed keys reach a running replica
(storage.sts_files).
"""

from __future__ import annotations

from lorafleet.api.basemodel import BaseModelSpec
from lorafleet.api.common import ObjectStore, S3CredentialsRef
from lorafleet.api.objects import AdapterDeploymentObject
from lorafleet.config import OperatorSettings
from lorafleet.resources.common import Obj, child_name
from lorafleet.resources.store_refs import default_location, require_shared_readable
from lorafleet.resources.stores import default_store
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
