"""Minted store credentials for a workload (Helm artifactStore.sts, or a ClusterArtifactStore's spec.sts): a child
Secret of its owner, in the owner's namespace, holding keys from STS AssumeRole whose session policy reaches only
what the owner's plan granted (storage.sts_policy.Grant). The keys that mint stay in the operator's namespace: the
operator's environment for the default store, the ClusterArtifactStore's Secret read there (never from a tenant's
namespace, where anyone with Secret access could plant one of that name).

The Secret is read by name (the operator may get Secrets, never list or watch them) and minted again when it is
missing, when the grant changed, or when less than a third of its lifetime is left; the owner is queued again
for that moment. A Secret of that name the owner does not control is never overwritten (ChildConflict).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta

from kubernetes.client.exceptions import ApiException

from lorafleet import k8s
from lorafleet.api.objects import CustomResource
from lorafleet.controllers.artifacts import (
    SecretForbidden,
    minting_store_settings,
    read_secret,
)
from lorafleet.controllers.base import SETTINGS, Obj, log, now
from lorafleet.resources.common import object_meta
from lorafleet.resources.conditions import Reason
from lorafleet.resources.store_refs import MintingStore, ResolvedStore
from lorafleet.resources.stores import RenderError
from lorafleet.storage.errors import StoreError
from lorafleet.storage.scrub import remember
from lorafleet.storage.settings import StoreSettings
from lorafleet.storage.sts import DEFAULT_ROLE_ARN, mint
from lorafleet.storage.sts_policy import Grant, session_policy

EXPIRES = "lorafleet.io/credentials-expire-at"
GRANT = "lorafleet.io/credentials-grant"  # a hash of the session policy: a changed grant mints again
# Renewed when less than this share of the lifetime is left: the pods that start then still get hours.
RENEW_SHARE = 1 / 3


@dataclass(frozen=True)
class MintSource:
    """Where and with which keys credentials are minted, and for how long."""

    settings: StoreSettings
    duration_seconds: int
    role_arn: str


def platform_source() -> MintSource:
    """The default store: the operator's environment and Helm artifactStore.sts."""
    return MintSource(
        StoreSettings.from_env(), SETTINGS.store_sts_duration_seconds, SETTINGS.store_sts_role_arn or DEFAULT_ROLE_ARN
    )


def cluster_store_source(resolved: ResolvedStore) -> MintSource:
    """A ClusterArtifactStore with spec.sts, as resolved (`minting_source`)."""
    assert isinstance(resolved.store, MintingStore), "only a minting store mints"
    return minting_source(resolved.store)


def minting_source(store: MintingStore) -> MintSource:
    """A ClusterArtifactStore with spec.sts: its keys (and CA bundle) read from the operator's namespace
    (controllers.artifacts.minting_store_settings). RenderError (StoreNotConfigured, StoreNotAllowed) when they
    cannot be."""
    try:
        settings = minting_store_settings(store)
    except SecretForbidden as exc:
        raise RenderError(Reason.STORE_NOT_ALLOWED, f'ClusterArtifactStore "{store.store_name}": {exc}') from None
    except StoreError as exc:  # PlatformKeysMissing, a missing key
        raise RenderError(Reason.STORE_NOT_CONFIGURED, str(exc)) from None
    return MintSource(settings, store.sts.duration_seconds, store.sts.role_arn or SETTINGS.store_sts_role_arn)


def grant_hash(grant: Grant) -> str:
    return hashlib.sha256(json.dumps(session_policy(grant), sort_keys=True).encode()).hexdigest()[:16]


def _controlled_by(obj: Obj, uid: str) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid and r.get("controller") for r in refs)


def _expiry(secret: Obj) -> datetime | None:
    value = ((secret.get("metadata") or {}).get("annotations") or {}).get(EXPIRES)
    try:
        return datetime.fromisoformat(value) if value else None
    except ValueError:
        return None


def renew_at(expires: datetime, duration_seconds: int) -> datetime:
    return expires - timedelta(seconds=duration_seconds * RENEW_SHARE)


def ensure(owner: CustomResource, name: str, component: str, grant: Grant, source: MintSource | None = None) -> float:
    """The owner's credentials Secret exists and is fresh; returns the seconds until it must be renewed.
    `source`: who mints (default: the platform's store). RenderError (ChildConflict, StoreUnavailable) when it
    cannot be."""
    try:
        existing = read_secret(owner.namespace, name)
    except SecretForbidden as exc:
        raise RenderError(Reason.STORE_NOT_ALLOWED, f"store credentials for this workload not minted: {exc}") from None
    if existing is not None and not _controlled_by(existing, owner.metadata.uid):
        raise RenderError(
            Reason.CHILD_CONFLICT,
            f'Secret "{name}" exists and is not controlled by {owner.kind} "{owner.name}": the operator writes the '
            "store credentials it mints there; rename or delete that Secret",
        )
    source = source or platform_source()
    when, wanted = now(), grant_hash(grant)
    duration = source.duration_seconds
    if existing is not None:
        expires = _expiry(existing)
        same = ((existing.get("metadata") or {}).get("annotations") or {}).get(GRANT) == wanted
        if same and expires is not None and renew_at(expires, duration) > when:
            return (renew_at(expires, duration) - when).total_seconds()
    try:
        minted = mint(
            source.settings,
            grant,
            duration_seconds=duration,
            namespace=owner.namespace,
            name=owner.name,
            role_arn=source.role_arn,
        )
    except StoreError as exc:
        raise RenderError(Reason.STORE_UNAVAILABLE, f"store credentials for this workload not minted: {exc}") from exc
    data = {k: base64.b64encode(v.encode()).decode() for k, v in minted.secret_data().items()}
    remember(*data.values())  # an API error echoing the body must not carry them either
    meta = object_meta(owner, name, component)
    meta["annotations"] = {EXPIRES: minted.expiration.isoformat(), GRANT: wanted}
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque", "data": data}
    # Forced only over our own Secret: a new one is applied without force (someone else's is never taken over).
    try:
        k8s.apply(secret, field_manager=SETTINGS.field_manager, force=existing is not None)
    except ApiException as exc:
        if exc.status != 403:
            raise
        raise RenderError(Reason.STORE_NOT_ALLOWED, mint_forbidden_message(owner.namespace, name)) from None
    log.info("minted store credentials %s/%s until %s", owner.namespace, name, minted.expiration.isoformat())
    return max((renew_at(minted.expiration, duration) - when).total_seconds(), 60.0)


def mint_forbidden_message(namespace: str, name: str) -> str:
    """A 403 on writing a minted Secret: the chart grants those writes only with rbac.mintSecrets (on by default
    with artifactStore.sts.enabled, not for a ClusterArtifactStore's spec.sts alone) and only where
    rbac.secretNamespaces lists."""
    return (
        f'store credentials for this workload not minted: the operator may not write Secret "{name}" in namespace '
        f'"{namespace}": the platform team sets the Helm value rbac.mintSecrets: true (on by default only with '
        f'artifactStore.sts.enabled) and lists "{namespace}" in rbac.secretNamespaces (["*"]: every namespace)'
    )


def remove(owner: CustomResource, name: str) -> None:
    """Delete the owner's credentials Secret once its workload is done (they expire anyway; this ends them now)."""
    try:
        existing = read_secret(owner.namespace, name)
        if existing is not None and _controlled_by(existing, owner.metadata.uid):
            k8s.delete("v1", "Secret", name, owner.namespace)
    except (SecretForbidden, ApiException) as exc:
        if isinstance(exc, ApiException) and exc.status != 403:
            raise
        # Never minted where the operator may not write Secrets (ensure refused); minted keys expire anyway.
        log.info("store credentials %s/%s not removed: %s", owner.namespace, name, exc)
