"""The operator's reads and deletes in the artifact store: verifying a BaseModel's or an adapter's manifest and
removing an adapter version whose FineTuneJob asked for it (deletionPolicy: Delete).

Credentials come from the Secret the spec references, or the operator's own environment for its default store;
for a ClusterArtifactStore with spec.sts (bound as resources.store_refs.MintingStore), from that store's Secret in
the operator's namespace: its workloads' minted Secrets are theirs (and gone once a FineTuneJob has finished), and
a Secret of the tenant's namespace is never sent to the platform's store. They are never logged or written anywhere.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from kubernetes.client.exceptions import ApiException

from lorafleet import k8s
from lorafleet.api.common import ObjectStore
from lorafleet.config import OperatorSettings
from lorafleet.resources.adapter_guard import lineage_problem, lineage_uid
from lorafleet.resources.conditions import Reason
from lorafleet.resources.status import ArtifactCheck
from lorafleet.resources.store_refs import MintingStore
from lorafleet.resources.stores import credentials_refusal
from lorafleet.storage import (
    ArtifactStore,
    BadCredentials,
    IncompleteVersion,
    ObjectNotFound,
    StoreError,
    StoreSettings,
    VersionFolder,
)

__all__ = [
    "MANIFESTS",
    "Deletion",
    "ManifestCache",
    "PlatformKeysMissing",
    "SecretForbidden",
    "SecretMissing",
    "StoreError",
    "ca_file",
    "check_version",
    "delete_if_owned",
    "delete_version",
    "minting_store_settings",
    "read_secret",
    "secret_value",
    "store_for",
]

SESSION_TOKEN_KEY = "AWS_SESSION_TOKEN"  # storage.sts_policy.SECRET_KEYS[2]

# The operator's own checks (a manifest, a few KiB) are bounded: a store that accepts connections and never
# answers costs at most CHECK_ATTEMPTS x (connect + read) seconds to the object that uses it, and its failure is
# remembered for FAILED_TTL seconds, so the next passes of that object do not wait again.
CHECK_CONNECT_TIMEOUT = 3.0
CHECK_READ_TIMEOUT = 10.0
CHECK_ATTEMPTS = 2


class SecretMissing(Exception):
    """A Secret the spec references does not exist (yet)."""


class SecretForbidden(StoreError):
    """The operator's RBAC does not reach Secrets in this namespace (Helm rbac.secretNamespaces)."""


def secret_forbidden_message(namespace: str, name: str, verb: str) -> str:
    return (
        f'the operator may not {verb} Secret "{name}" in namespace "{namespace}": its RBAC reaches Secrets only in '
        f'its own namespace and those the platform team lists; add "{namespace}" to the Helm value '
        'rbac.secretNamespaces (["*"]: every namespace)'
    )


def read_secret(namespace: str, name: str) -> dict[str, Any] | None:
    """A Secret by name, None when missing; SecretForbidden when the chart's RBAC does not reach its namespace."""
    try:
        return k8s.get("v1", "Secret", name, namespace)
    except ApiException as exc:
        if exc.status == 403:
            raise SecretForbidden(secret_forbidden_message(namespace, name, "read")) from None
        raise


class StoreNotAllowed(StoreError):
    """A spec's store names a Secret at an endpoint the platform does not allow: the Secret is never read."""


@functools.cache
def _operator_settings() -> OperatorSettings:
    return OperatorSettings()


def secret_value(namespace: str, name: str, key: str) -> str:
    secret = read_secret(namespace, name)
    if secret is None:
        raise SecretMissing(name)
    raw = (secret.get("data") or {}).get(key)
    if raw is None:
        raise StoreError(f'Secret "{name}" has no key "{key}"')
    return base64.b64decode(raw).decode()


def ca_file(pem: str) -> str:
    """botocore wants a CA bundle path: one file per distinct bundle, written once."""
    path = os.path.join(tempfile.gettempdir(), f"lorafleet-ca-{hashlib.sha256(pem.encode()).hexdigest()[:16]}.pem")
    if not os.path.exists(path):
        with open(path, "w") as handle:
            handle.write(pem)
    return path


@functools.lru_cache(maxsize=64)
def _store(settings: StoreSettings) -> ArtifactStore:
    # boto3 clients are expensive to build and thread-safe: one per distinct endpoint and credentials.
    return ArtifactStore(
        dataclasses.replace(
            settings,
            connect_timeout=CHECK_CONNECT_TIMEOUT,
            read_timeout=CHECK_READ_TIMEOUT,
            max_attempts=CHECK_ATTEMPTS,
        )
    )


class PlatformKeysMissing(StoreError):
    """A minting ClusterArtifactStore's own Secret is missing from the operator's namespace (the platform team's
    to fix: waiting may help, unlike a tenant's Secret gone with its namespace)."""


def minting_store_settings(store: MintingStore) -> StoreSettings:
    """A ClusterArtifactStore with spec.sts reached with its own keys and CA bundle, read from the operator's
    namespace only (a Secret of that name in a tenant's namespace is never read). PlatformKeysMissing, or
    StoreError (SecretForbidden, a missing key)."""
    namespace = _operator_settings().operator_namespace
    ref, ca_ref = store.platform_credentials, store.platform_ca
    try:
        access_key = secret_value(namespace, ref.name, ref.access_key_id_key)
        secret_key = secret_value(namespace, ref.name, ref.secret_access_key_key)
        ca = ca_file(secret_value(namespace, ca_ref.name, ca_ref.key)) if ca_ref is not None else None
    except SecretMissing as exc:
        raise PlatformKeysMissing(
            f'ClusterArtifactStore "{store.store_name}": Secret "{exc}" not found in the operator\'s namespace '
            f'"{namespace}"; the platform team creates it there (workloads of a store with spec.sts.enabled never '
            "read it)"
        ) from None
    except StoreError as exc:
        raise StoreError(f'ClusterArtifactStore "{store.store_name}": {exc}') from None
    return StoreSettings.from_object_store(store, access_key, secret_key, ca)


def store_for(spec_store: ObjectStore | None, namespace: str) -> ArtifactStore:
    """The store a spec points at, or the operator's default store (from its environment)."""
    if spec_store is None:
        return _store(StoreSettings.from_env())
    refusal = credentials_refusal(spec_store, _operator_settings(), "the store")
    if refusal is not None:
        raise StoreNotAllowed(refusal)
    if isinstance(spec_store, MintingStore):  # bound by the controller only; the URIs were checked against its root
        return _store(minting_store_settings(spec_store))
    access_key = secret_key = ca = token = None
    if spec_store.credentials_secret_ref is not None:
        ref = spec_store.credentials_secret_ref
        access_key = secret_value(namespace, ref.name, ref.access_key_id_key)
        secret_key = secret_value(namespace, ref.name, ref.secret_access_key_key)
        token = _session_token(namespace, ref.name)
    if spec_store.ca_bundle_secret_ref is not None:
        ref_ca = spec_store.ca_bundle_secret_ref
        ca = ca_file(secret_value(namespace, ref_ca.name, ref_ca.key))
    settings = StoreSettings.from_object_store(spec_store, access_key, secret_key, ca)
    return _store(dataclasses.replace(settings, session_token=token) if token else settings)


def _session_token(namespace: str, name: str) -> str | None:
    """Minted credentials (controllers.credentials) carry a session token beside the key pair."""
    raw = ((read_secret(namespace, name) or {}).get("data") or {}).get(SESSION_TOKEN_KEY)
    return base64.b64decode(raw).decode() if raw else None


def check_version(spec_store: ObjectStore | None, namespace: str, uri: str, expected: str | None) -> ArtifactCheck:
    """Read a version's manifest; a problem is a (reason, message) the status shows, never an exception."""
    try:
        store = store_for(spec_store, namespace)
        manifest, digest, _ = store.read_manifest(VersionFolder.parse(uri))
    except SecretMissing as exc:
        return ArtifactCheck(problem=(Reason.SECRET_NOT_FOUND, f'Secret "{exc}" referenced by the store not found'))
    except (StoreNotAllowed, SecretForbidden) as exc:
        return ArtifactCheck(problem=(Reason.STORE_NOT_ALLOWED, str(exc)))
    except PlatformKeysMissing as exc:
        return ArtifactCheck(problem=(Reason.STORE_NOT_CONFIGURED, str(exc)))
    except (IncompleteVersion, ObjectNotFound) as exc:
        return ArtifactCheck(problem=(Reason.MANIFEST_NOT_FOUND, str(exc)))
    except BadCredentials as exc:
        return ArtifactCheck(problem=(Reason.STORE_UNAVAILABLE, f"the store refused the credentials: {exc}"))
    except (StoreError, ValueError) as exc:
        return ArtifactCheck(problem=(Reason.STORE_UNAVAILABLE, str(exc)))
    if expected and expected != digest:
        return ArtifactCheck(
            problem=(
                Reason.DIGEST_MISMATCH,
                f"{uri} has digest {digest}, but the spec pins {expected}: the stored version differs from the "
                "one the spec names; fix the digest or the uri",
            )
        )
    rank = (manifest.hyperparameters.get("lora") or {}).get("r")
    return ArtifactCheck(
        digest=digest,
        size_bytes=manifest.total_size,
        revision=manifest.version,
        rank=rank if isinstance(rank, int) else None,
        job_uid=lineage_uid(manifest.hyperparameters),
        evaluation=manifest.evaluation,
    )


def delete_version(spec_store: ObjectStore | None, namespace: str, uri: str) -> int:
    """Remove a version (manifest first, so it stops being served before its files go); returns objects removed."""
    return store_for(spec_store, namespace).delete_version(VersionFolder.parse(uri))


@dataclasses.dataclass(frozen=True)
class Deletion:
    """What deleting a FineTuneJob's version found: no manifest, a manifest another job wrote (left in place),
    or its own (removed)."""

    found: bool
    owner_uid: str | None = None
    removed: int = 0


def delete_if_owned(spec_store: ObjectStore | None, namespace: str, uri: str, uid: str) -> Deletion:
    """Delete the version at `uri` only when its manifest's lineage names `uid`, read fresh from the store now
    (not from the cache). SecretMissing and StoreError propagate: the caller decides to wait or give up."""
    store = store_for(spec_store, namespace)
    folder = VersionFolder.parse(uri)
    try:
        manifest, _, _ = store.read_manifest(folder)
    except (IncompleteVersion, ObjectNotFound):
        return Deletion(found=False)  # nothing committed there: nothing this job could prove it wrote
    except ValueError:
        return Deletion(found=True)  # a manifest that does not parse proves no ownership: left in place
    owner = lineage_uid(manifest.hyperparameters)
    if lineage_problem(uri, uid, owner) is not None:
        return Deletion(found=True, owner_uid=owner)
    return Deletion(found=True, owner_uid=owner, removed=store.delete_version(folder))


Check = Callable[[ObjectStore | None, str, str, str | None], ArtifactCheck]


class ManifestCache:
    """What the store said about a version folder, keyed by store, namespace, URI and expected digest.

    A verified version pinned by digest never changes: kept until evicted. A verified unpinned one is read again
    after `ttl` seconds (someone may push another version under the same URI); a problem after `failed_ttl`
    seconds, so a fixed store or a manifest that appears is seen soon, and a hanging store is not waited on at
    every pass. Thread-safe; the store is read outside the lock (two passes may read the same key at once).
    """

    def __init__(
        self,
        check: Check | None = None,
        *,
        ttl: float = 600.0,
        failed_ttl: float = 30.0,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._check = check
        self._ttl, self._failed_ttl, self._max = ttl, failed_ttl, max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str, str, str], tuple[ArtifactCheck, float]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(
        spec_store: ObjectStore | None, namespace: str, uri: str, expected: str | None
    ) -> tuple[str, str, str, str]:
        store = spec_store.model_dump_json() if spec_store is not None else ""
        return (store, namespace, uri, expected or "")

    def _fresh(self, check: ArtifactCheck, expected: str | None, at: float) -> bool:
        age = self._clock() - at
        if check.problem is not None:
            return age < self._failed_ttl
        if expected and check.digest == expected:
            return True
        return age < self._ttl

    def get(self, spec_store: ObjectStore | None, namespace: str, uri: str, expected: str | None) -> ArtifactCheck:
        key = self._key(spec_store, namespace, uri, expected)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and self._fresh(entry[0], expected, entry[1]):
                self._entries.move_to_end(key)
                return entry[0]
        check = (self._check or check_version)(spec_store, namespace, uri, expected)
        with self._lock:
            self._entries[key] = (check, self._clock())
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return check

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


MANIFESTS = ManifestCache()
