"""Download and check one adapter version from the artifact store (runs in a worker thread of the sidecar)."""

from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import replace
from pathlib import Path

from lorafleet.contracts.serving import DesiredAdapter, DesiredAdapterSet
from lorafleet.serving.checks import Reason, Refusal, check_adapter_config, check_manifest, read_adapter_config
from lorafleet.serving.syncer import Prepared
from lorafleet.storage import (
    ArtifactStore,
    BadCredentials,
    BucketNotFound,
    ChecksumMismatch,
    IncompleteVersion,
    ObjectNotFound,
    StoreError,
    StoreSettings,
    StoreUnavailable,
    VersionFolder,
)
from lorafleet.storage.sts_files import FileCredentials

log = logging.getLogger("lorafleet.serving.fetch")


def version_dir(adapters_dir: Path, name: str, digest: str) -> Path:
    """One folder per adapter version: vLLM reports it as the adapter's root, which identifies the digest."""
    return adapters_dir / name / digest.removeprefix("sha256:")


class StoreFetcher:
    """The sidecar's prepare function: manifest checks, verified pull, adapter_config checks.

    Stores are built from the environment (the operator renders the default store's settings and credentials
    into the sidecar). The default store's credentials go to the default store's endpoint only: an adapter
    naming another endpoint is read there unsigned (its own Secret is not the sidecar's to hold).

    With `credentials_dir` (the operator's minted, read-only keys as a Secret volume, Helm artifactStore.sts),
    the keys are read from there before each adapter, so keys the operator renewed are used once the kubelet has
    swapped the files, long before the first ones expire.
    """

    def __init__(self, env: dict[str, str] | None = None, credentials_dir: Path | None = None) -> None:
        self._base = StoreSettings.from_env(env)
        self._files = FileCredentials(credentials_dir) if credentials_dir is not None else None
        self._stores: dict[str, ArtifactStore] = {}
        self._lock = threading.Lock()  # adapters are prepared in parallel worker threads

    def _settings(self) -> StoreSettings:
        if self._files is None:
            return self._base
        keys = self._files.current()
        return replace(
            self._base,
            access_key_id=keys.access_key_id,
            secret_access_key=keys.secret_access_key,
            session_token=keys.session_token,
            anonymous=False,
        )

    def store_for(self, want: DesiredAdapter) -> ArtifactStore:
        settings = self._settings()
        if want.store is not None:
            endpoint = want.store.endpoint.rstrip("/")
            foreign = endpoint != (settings.endpoint or "").rstrip("/")
            settings = replace(
                settings,
                endpoint=endpoint,
                region=want.store.region,
                insecure_skip_tls_verify=want.store.insecure_skip_tls_verify,
                sse=want.store.server_side_encryption,
                checksum_headers=want.store.checksum_headers,
            )
            if foreign:
                settings = replace(
                    settings, access_key_id=None, secret_access_key=None, session_token=None, anonymous=True
                )
        key = f"{settings.endpoint}|{settings.region}|{settings.insecure_skip_tls_verify}|{settings.anonymous}"
        with self._lock:
            cached = self._stores.get(key)
            if cached is None or cached.settings != settings:  # renewed keys: a new client, the old one goes
                cached = self._stores[key] = ArtifactStore(settings)
            return cached

    def __call__(self, want: DesiredAdapter, desired: DesiredAdapterSet, adapters_dir: Path) -> Prepared | Refusal:
        name, uri = want.name, want.uri
        try:
            folder = VersionFolder.parse(uri)
        except ValueError as e:
            return Refusal(Reason.NOT_FOUND, f"adapter {name!r}: {e}")
        try:
            store = self.store_for(want)
            manifest, digest, _ = store.read_manifest(folder)
        except (ObjectNotFound, IncompleteVersion, BucketNotFound) as e:
            return Refusal(Reason.NOT_FOUND, f"adapter {name!r}: {e}")
        except (StoreUnavailable, BadCredentials) as e:
            return Refusal(Reason.STORE_UNAVAILABLE, f"adapter {name!r}: {e}")
        except StoreError as e:
            return Refusal(Reason.DOWNLOAD_FAILED, f"adapter {name!r}: {e}")

        refusal = check_manifest(name, uri, want.digest, manifest.to_json_obj(), digest, desired)
        if refusal is not None:
            return refusal

        dest = version_dir(adapters_dir, name, digest)
        try:
            result = store.pull(folder, dest, digest=digest)
        except ChecksumMismatch as e:
            shutil.rmtree(dest, ignore_errors=True)
            return Refusal(Reason.CHECKSUM_MISMATCH, f"adapter {name!r}: {e}")
        except (ObjectNotFound, IncompleteVersion, BucketNotFound) as e:
            return Refusal(Reason.NOT_FOUND, f"adapter {name!r}: {e}")
        except (StoreUnavailable, BadCredentials) as e:
            return Refusal(Reason.STORE_UNAVAILABLE, f"adapter {name!r}: {e}")
        except (StoreError, OSError) as e:
            return Refusal(Reason.DOWNLOAD_FAILED, f"adapter {name!r}: {e}")
        log.info(
            "pulled %s %s into %s (%d bytes downloaded, %d reused)",
            name,
            digest,
            dest,
            result.downloaded_bytes,
            result.reused_bytes,
        )

        config, refusal = read_adapter_config(name, dest)
        if refusal is None and config is not None:
            refusal = check_adapter_config(name, config, desired.max_lora_rank, desired.target_modules)
        if refusal is not None:
            shutil.rmtree(dest, ignore_errors=True)
            return refusal
        return Prepared(digest=digest, path=dest)
