"""The operator's reads and deletes in the artifact store: verifying a BaseModel's or an adapter's manifest and
removing an adapter version whose FineTuneJob asked for it (deletionPolicy: Delete).

Credentials come from the Secret the spec references, or the operator's own environment for its default store;
they are never logged or written anywhere.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import tempfile

from lorafleet import k8s
from lorafleet.api.common import ObjectStore
from lorafleet.resources.conditions import Reason
from lorafleet.resources.status import ArtifactCheck
from lorafleet.storage import (
    ArtifactStore,
    BadCredentials,
    IncompleteVersion,
    ObjectNotFound,
    StoreError,
    StoreSettings,
    VersionFolder,
)

__all__ = ["SecretMissing", "StoreError", "check_version", "delete_version", "store_for"]


class SecretMissing(Exception):
    """A Secret the spec references does not exist (yet)."""


def _secret_value(namespace: str, name: str, key: str) -> str:
    secret = k8s.get("v1", "Secret", name, namespace)
    if secret is None:
        raise SecretMissing(name)
    raw = (secret.get("data") or {}).get(key)
    if raw is None:
        raise StoreError(f'Secret "{name}" has no key "{key}"')
    return base64.b64decode(raw).decode()


def _ca_file(pem: str) -> str:
    """botocore wants a CA bundle path: one file per distinct bundle, written once."""
    path = os.path.join(tempfile.gettempdir(), f"lorafleet-ca-{hashlib.sha256(pem.encode()).hexdigest()[:16]}.pem")
    if not os.path.exists(path):
        with open(path, "w") as handle:
            handle.write(pem)
    return path


@functools.lru_cache(maxsize=64)
def _store(settings: StoreSettings) -> ArtifactStore:
    # boto3 clients are expensive to build and thread-safe: one per distinct endpoint and credentials.
    return ArtifactStore(settings)


def store_for(spec_store: ObjectStore | None, namespace: str) -> ArtifactStore:
    """The store a spec points at, or the operator's default store (from its environment)."""
    if spec_store is None:
        return _store(StoreSettings.from_env())
    access_key = secret_key = ca = None
    if spec_store.credentials_secret_ref is not None:
        ref = spec_store.credentials_secret_ref
        access_key = _secret_value(namespace, ref.name, ref.access_key_id_key)
        secret_key = _secret_value(namespace, ref.name, ref.secret_access_key_key)
    if spec_store.ca_bundle_secret_ref is not None:
        ref_ca = spec_store.ca_bundle_secret_ref
        ca = _ca_file(_secret_value(namespace, ref_ca.name, ref_ca.key))
    return _store(StoreSettings.from_object_store(spec_store, access_key, secret_key, ca))


def check_version(spec_store: ObjectStore | None, namespace: str, uri: str, expected: str | None) -> ArtifactCheck:
    """Read a version's manifest; a problem is a (reason, message) the status shows, never an exception."""
    try:
        store = store_for(spec_store, namespace)
        manifest, digest, _ = store.read_manifest(VersionFolder.parse(uri))
    except SecretMissing as exc:
        return ArtifactCheck(problem=(Reason.SECRET_NOT_FOUND, f'Secret "{exc}" referenced by the store not found'))
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
    )


def delete_version(spec_store: ObjectStore | None, namespace: str, uri: str) -> int:
    """Remove a version (manifest first, so it stops being served before its files go); returns objects removed."""
    return store_for(spec_store, namespace).delete_version(VersionFolder.parse(uri))
