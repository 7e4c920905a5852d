"""Where the trainer's inputs come from and its outputs go: the dataset, checkpoints and the final adapter.

The trainer talks only to the small ArtifactSink interface below. Two implementations:

* LocalSink: a folder stands in for the object store (``s3://bucket/key`` is ``<root>/bucket/key``). Used by
  the tests and by ``LORAFLEET_LOCAL_STORE=/some/dir`` for local runs. It follows the store's rules: files first,
  ``manifest.json`` (sha256 and size of every file, plus lineage) last, so a folder without a manifest is
  incomplete; a published version is never overwritten.
* S3Sink: the artifact store (lorafleet.storage). See the class for its state.

``pvc://claim/path`` datasets are read from the claim's mount, ``<LORAFLEET_PVC_ROOT or /mnt/pvc>/claim/path``.
Free of torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from lorafleet import __version__
from lorafleet.contracts.exits import ADAPTER_VERSION_EXISTS, DATASET_NOT_FOUND, STORE_UNAVAILABLE, UPLOAD_FAILED
from lorafleet.contracts.trainer import TrainerConfig
from lorafleet.trainer.errors import TrainerError
from lorafleet.uris import parse

MANIFEST = "manifest.json"
log = logging.getLogger("lorafleet.trainer")
CHECKPOINT_PREFIX = "checkpoint-"
LOCAL_STORE_ENV = "LORAFLEET_LOCAL_STORE"
PVC_ROOT_ENV = "LORAFLEET_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"


@dataclass(frozen=True)
class DatasetFile:
    """A dataset file on local disk, with its origin and digest (for the lineage manifest)."""

    path: Path
    uri: str
    sha256: str
    etag: str | None = None
    version_id: str | None = None


@dataclass(frozen=True)
class PublishedArtifact:
    """The stored adapter version, as the FineTuneJob status records it."""

    uri: str
    digest: str  # "sha256:<hex>" of the manifest
    size_bytes: int
    lineage: dict[str, Any]

    def status(self) -> dict[str, Any]:
        return {"uri": self.uri, "digest": self.digest, "sizeBytes": self.size_bytes}


class ArtifactSink(Protocol):
    """What the trainer needs from the artifact store."""

    def fetch_dataset(self, uri: str, work_dir: Path) -> DatasetFile:
        """The dataset file on local disk (downloaded into work_dir when remote)."""
        ...

    def latest_checkpoint(self) -> int | None:
        """Step of the newest complete checkpoint of this job, or None."""
        ...

    def download_checkpoint(self, step: int, dest: Path) -> Path:
        """Download that checkpoint into dest/checkpoint-<step> (idempotent); returns the folder."""
        ...

    def save_checkpoint(self, step: int, local_dir: Path) -> str:
        """Store a checkpoint folder (files first, manifest last); returns its URI."""
        ...

    def prune_checkpoints(self, keep: int) -> None:
        """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than those."""
        ...

    def existing_adapter(self) -> PublishedArtifact | None:
        """The adapter version this job publishes, when it already exists (complete)."""
        ...

    def publish_adapter(self, local_dir: Path, lineage: dict[str, Any]) -> PublishedArtifact:
        """Store the final adapter folder with its lineage manifest; an existing version is never overwritten."""
        ...


def adapter_uri(config: TrainerConfig) -> str:
    return config.output.adapter_uri


def pvc_path(uri: str) -> Path:
    location = parse(uri)
    return Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT)) / location.authority / location.path


def dataset_file(path: Path, uri: str, **origin: Any) -> DatasetFile:
    """A dataset on local disk with its digest: the file's sha256, or for a folder (a saved Hugging Face dataset)
    the sha256 of its canonical manifest (every file's path, sha256 and size)."""
    digest = hashlib.sha256(manifest_bytes(folder_manifest(path))).hexdigest() if path.is_dir() else sha256_file(path)
    return DatasetFile(path, uri, digest, **origin)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def folder_manifest(folder: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """sha256 and size of every file under folder (sorted, manifest.json excluded), total size, and extra."""
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        relative = path.relative_to(folder).as_posix()
        files.append({"path": relative, "sha256": sha256_file(path), "size": path.stat().st_size})
    return {"files": files, "totalSize": sum(f["size"] for f in files), **(extra or {})}


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """Canonical JSON, as lorafleet.storage writes it: the digest is sha256 of exactly these bytes."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def sink_for(config: TrainerConfig) -> ArtifactSink:
    """LocalSink when LORAFLEET_LOCAL_STORE is set, else the S3 artifact store."""
    root = os.environ.get(LOCAL_STORE_ENV)
    if root:
        return LocalSink(config, Path(root))
    return S3Sink(config)


class LocalSink:
    """A folder standing in for the object store: s3://bucket/key is <root>/bucket/key."""

    def __init__(self, config: TrainerConfig, root: Path) -> None:
        self.config = config
        self.root = root

    def _path(self, uri: str) -> Path:
        location = parse(uri)
        if location.scheme != "s3":
            raise ValueError(f"LocalSink maps s3:// URIs only, not {uri}")
        return self.root / location.authority / location.path

    def fetch_dataset(self, uri: str, work_dir: Path) -> DatasetFile:
        path = pvc_path(uri) if parse(uri).scheme == "pvc" else self._path(uri)
        if not path.exists():
            raise TrainerError(DATASET_NOT_FOUND, f"dataset {uri} does not exist")
        return dataset_file(path, uri)

    # -- checkpoints -----------------------------------------------------------------------------------------------

    def _checkpoints(self) -> Path:
        return self._path(self.config.output.checkpoint_uri)

    def _complete_steps(self) -> list[int]:
        folder = self._checkpoints()
        if not folder.is_dir():
            return []
        steps = []
        for child in folder.iterdir():
            match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", child.name)
            if match and (child / MANIFEST).is_file():
                steps.append(int(match.group(1)))
        return sorted(steps)

    def latest_checkpoint(self) -> int | None:
        steps = self._complete_steps()
        return steps[-1] if steps else None

    def download_checkpoint(self, step: int, dest: Path) -> Path:
        source = self._checkpoints() / f"{CHECKPOINT_PREFIX}{step}"
        target = dest / f"{CHECKPOINT_PREFIX}{step}"
        manifest = json.loads((source / MANIFEST).read_text())
        if target.is_dir() and _matches(target, manifest):
            return target
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns(MANIFEST))
        if not _matches(target, manifest):
            raise TrainerError(UPLOAD_FAILED, f"checkpoint {step} in {source} does not match its manifest")
        return target

    def save_checkpoint(self, step: int, local_dir: Path) -> str:
        target = self._checkpoints() / f"{CHECKPOINT_PREFIX}{step}"
        try:
            if (target / MANIFEST).is_file():
                return self._uri(target)
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(local_dir, target)
            manifest = folder_manifest(target, {"step": step, "createdAt": _now()})
            _write_last(target / MANIFEST, manifest_bytes(manifest))
        except OSError as e:
            raise TrainerError(UPLOAD_FAILED, f"could not store checkpoint {step} in {target}: {e}") from e
        return self._uri(target)

    def prune_checkpoints(self, keep: int) -> None:
        steps = self._complete_steps()
        if len(steps) <= keep:
            return
        oldest_kept = steps[-keep] if keep else None
        for child in self._checkpoints().iterdir():
            match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", child.name)
            if match and (oldest_kept is None or int(match.group(1)) < oldest_kept):
                shutil.rmtree(child, ignore_errors=True)

    # -- adapter ---------------------------------------------------------------------------------------------------

    def existing_adapter(self) -> PublishedArtifact | None:
        target = self._path(adapter_uri(self.config))
        if not (target / MANIFEST).is_file():
            return None
        raw = (target / MANIFEST).read_bytes()
        manifest = json.loads(raw)
        return PublishedArtifact(
            adapter_uri(self.config), "sha256:" + hashlib.sha256(raw).hexdigest(), manifest["totalSize"], manifest
        )

    def publish_adapter(self, local_dir: Path, lineage: dict[str, Any]) -> PublishedArtifact:
        uri = adapter_uri(self.config)
        target = self._path(uri)
        out = self.config.output
        manifest = folder_manifest(
            local_dir,
            {
                "schemaVersion": 1,
                "kind": "adapter",
                "name": out.adapter_name,
                "version": out.version,
                **lineage,
                "lorafleetVersion": __version__,
                "createdAt": _now(),
            },
        )
        existing = self.existing_adapter()
        if existing is not None:
            if existing.lineage["files"] == manifest["files"]:
                return existing  # an identical re-upload is a no-op
            raise TrainerError(
                ADAPTER_VERSION_EXISTS,
                f"adapter version {uri} already exists with different content; versions "
                "are never overwritten: set a new output.version",
            )
        try:
            shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier upload
            shutil.copytree(local_dir, target)
            raw = manifest_bytes(manifest)
            _write_last(target / MANIFEST, raw)
        except OSError as e:
            raise TrainerError(UPLOAD_FAILED, f"could not store the adapter in {target}: {e}") from e
        return PublishedArtifact(uri, "sha256:" + hashlib.sha256(raw).hexdigest(), manifest["totalSize"], manifest)

    def _uri(self, path: Path) -> str:
        relative = path.relative_to(self.root).as_posix()
        return f"s3://{relative}"


class S3Sink:
    """The S3 artifact store through lorafleet.storage.ArtifactStore (settings from the LORAFLEET_STORE_* and
    AWS_* variables the operator sets). Checkpoints are versions named checkpoint-<step> under the job's
    checkpoint URI; unlike adapters they are scratch: a checkpoint of the same step with other bytes (a retry
    that resumed from an older one) replaces the old one."""

    def __init__(self, config: TrainerConfig, store: Any | None = None) -> None:
        self.config = config
        self._store = store

    @property
    def store(self) -> Any:
        if self._store is None:
            from lorafleet.storage import ArtifactStore

            try:
                self._store = ArtifactStore.from_env()
            except Exception as e:  # StoreError: bad settings in the environment
                raise _store_error(e, "configure the artifact store") from e
        return self._store

    def fetch_dataset(self, uri: str, work_dir: Path) -> DatasetFile:
        location = parse(uri)
        if location.scheme == "pvc":
            path = pvc_path(uri)
            if not path.exists():
                raise TrainerError(DATASET_NOT_FOUND, f"dataset {uri} does not exist (looked at {path})")
            return dataset_file(path, uri)
        from botocore.exceptions import BotoCoreError, ClientError

        from lorafleet.storage import BucketNotFound, ObjectNotFound
        from lorafleet.storage.client import translate

        store = self.store
        bucket, key = location.authority, location.path
        target = work_dir / Path(key).name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            head = None if key.endswith("/") else _head(store.client, bucket, key)
            # No such object: a folder (a saved Hugging Face dataset) when objects lie under it.
            if head is None and _download_folder(store.client, bucket, key.rstrip("/") + "/", target):
                return dataset_file(target, uri)
            if head is None:
                head = store.client.head_object(Bucket=bucket, Key=key)  # raises the store's NotFound
            store.client.download_file(bucket, key, str(target))
        except (ClientError, BotoCoreError, OSError) as e:
            error = e if isinstance(e, OSError) else translate(e, store.settings, bucket, key, "download the dataset")
            if isinstance(error, ObjectNotFound | BucketNotFound):
                raise TrainerError(DATASET_NOT_FOUND, f"dataset {uri} does not exist: {error}") from e
            raise _store_error(error, f"download the dataset {uri}") from e
        etag = str(head.get("ETag", "")).strip('"') or None
        return DatasetFile(target, uri, sha256_file(target), etag=etag, version_id=head.get("VersionId"))

    # -- checkpoints -----------------------------------------------------------------------------------------------

    def _root(self) -> Any:
        from lorafleet.storage import Location

        return Location.parse(self.config.output.checkpoint_uri)

    def _folder(self, step: int) -> Any:
        from lorafleet.storage import VersionFolder

        return VersionFolder(self._root().child(f"{CHECKPOINT_PREFIX}{step}"))

    def _complete(self) -> dict[int, Any]:
        try:
            versions = self.store.list_versions(self._root())
        except Exception as e:
            raise _store_error(e, "list the checkpoints") from e
        steps = {}
        for version in versions:
            match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", version.folder.uri.rsplit("/", 1)[-1])
            if match:
                steps[int(match.group(1))] = version.folder
        return steps

    def latest_checkpoint(self) -> int | None:
        steps = self._complete()
        return max(steps) if steps else None

    def download_checkpoint(self, step: int, dest: Path) -> Path:
        target = dest / f"{CHECKPOINT_PREFIX}{step}"
        try:
            self.store.pull(self._folder(step), target)
        except Exception as e:
            raise _store_error(e, f"download checkpoint {step}") from e
        return target

    def save_checkpoint(self, step: int, local_dir: Path) -> str:
        from lorafleet.storage import VersionExists

        folder = self._folder(step)
        push = {"kind": "adapter", "name": self.config.output.adapter_name, "version": f"{CHECKPOINT_PREFIX}{step}"}
        try:
            try:
                self.store.push(local_dir, folder, metrics={"step": step}, **push)
            except VersionExists:
                self.store.delete_version(folder)
                self.store.push(local_dir, folder, metrics={"step": step}, **push)
        except Exception as e:
            raise _store_error(e, f"store checkpoint {step}", UPLOAD_FAILED) from e
        return str(folder.uri)

    def prune_checkpoints(self, keep: int) -> None:
        steps = sorted(self._complete())
        for step in steps[: max(len(steps) - keep, 0)]:
            try:
                self.store.delete_version(self._folder(step))
            except Exception as e:  # pruning is housekeeping: gc catches up
                log.warning("could not delete checkpoint %s: %s", step, e)

    # -- adapter ---------------------------------------------------------------------------------------------------

    def _adapter_folder(self) -> Any:
        from lorafleet.storage import version_folder

        out = self.config.output
        return version_folder(out.uri, "adapter", out.adapter_name, out.version)

    def existing_adapter(self) -> PublishedArtifact | None:
        from lorafleet.storage import IncompleteVersion, ObjectNotFound

        folder = self._adapter_folder()
        try:
            manifest, digest, _ = self.store.read_manifest(folder)
        except (ObjectNotFound, IncompleteVersion):
            return None
        except Exception as e:
            raise _store_error(e, "read the adapter's manifest") from e
        return PublishedArtifact(str(folder.uri), digest, manifest.total_size, manifest.to_json_obj())

    def publish_adapter(self, local_dir: Path, lineage: dict[str, Any]) -> PublishedArtifact:
        from lorafleet.storage import BaseModelRef, DatasetRef, VersionExists

        folder = self._adapter_folder()
        out = self.config.output
        try:
            result = self.store.push(
                local_dir,
                folder,
                kind="adapter",
                name=out.adapter_name,
                version=out.version,
                base_model=BaseModelRef.model_validate(lineage["baseModel"]),
                dataset=DatasetRef.model_validate(lineage["dataset"]),
                hyperparameters=lineage["hyperparameters"],
                metrics=lineage["metrics"],
                trainer_image=lineage.get("trainerImage"),
                evaluation=lineage.get("evaluation"),
            )
        except VersionExists as e:
            raise TrainerError(ADAPTER_VERSION_EXISTS, f"{e}; set a new output.version") from e
        except Exception as e:
            raise _store_error(e, "upload the adapter", UPLOAD_FAILED) from e
        manifest = result.manifest
        return PublishedArtifact(str(folder.uri), result.digest, manifest.total_size, manifest.to_json_obj())


def _store_error(e: Exception, action: str, reason: str = STORE_UNAVAILABLE) -> TrainerError:
    """A TrainerError (retried: exit 1) for a storage error."""
    if isinstance(e, TrainerError):
        return e
    return TrainerError(reason, f"could not {action}: {e}")


def _matches(folder: Path, manifest: dict[str, Any]) -> bool:
    files: list[dict[str, Any]] = folder_manifest(folder)["files"]
    return bool(files == manifest["files"])


def _write_last(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# A saved dataset is a handful of files (state.json, dataset_info.json, Arrow shards); more is not one.
MAX_DATASET_FOLDER_FILES = 10_000


def _head(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    """The object's metadata, or None when there is no such object."""
    from botocore.exceptions import ClientError

    try:
        return dict(client.head_object(Bucket=bucket, Key=key))
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def _download_folder(client: Any, bucket: str, prefix: str, target: Path) -> bool:
    """Every object under prefix into target (same relative paths); False when there is none."""
    keys = [
        obj["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for obj in page.get("Contents", [])
        if not obj["Key"].endswith("/")
    ]
    if len(keys) > MAX_DATASET_FOLDER_FILES:
        raise TrainerError(
            DATASET_NOT_FOUND, f"s3://{bucket}/{prefix} holds over {MAX_DATASET_FOLDER_FILES} files: not a dataset"
        )
    for key in keys:
        relative = Path(key[len(prefix) :])
        if relative.is_absolute() or ".." in relative.parts:
            continue  # a key that would land outside the folder
        local = target / relative
        local.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(local))
    return bool(keys)
