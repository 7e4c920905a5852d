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
import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from lorafleet.trainer.config import TrainerConfig
from lorafleet.trainer.errors import (
    ADAPTER_VERSION_EXISTS,
    DATASET_NOT_FOUND,
    STORE_UNAVAILABLE,
    UPLOAD_FAILED,
    TrainerError,
)
from lorafleet.uris import parse

MANIFEST = "manifest.json"
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
    out = config.output
    return f"{out.uri.rstrip('/')}/adapters/{out.adapter_name}/{out.version}"


def pvc_path(uri: str) -> Path:
    location = parse(uri)
    return Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT)) / location.authority / location.path


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
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


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
        if not path.is_file():
            raise TrainerError(DATASET_NOT_FOUND, f"dataset {uri} does not exist")
        return DatasetFile(path, uri, sha256_file(path))

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
        manifest = folder_manifest(local_dir, lineage)
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
    """The S3 artifact store through lorafleet.storage.

    NOT DONE: lorafleet.storage (issue 4) has no public push/pull API yet; every method raises
    StoreUnavailable saying so. Wire it to storage's ArtifactStore once that is committed.
    """

    def __init__(self, config: TrainerConfig) -> None:
        self.config = config

    def _missing(self) -> TrainerError:
        return TrainerError(
            STORE_UNAVAILABLE,
            "the S3 artifact store is not wired into the trainer yet (lorafleet.storage pending); "
            f"set {LOCAL_STORE_ENV} to use a local folder",
        )

    def fetch_dataset(self, uri: str, work_dir: Path) -> DatasetFile:
        if parse(uri).scheme == "pvc":
            path = pvc_path(uri)
            if not path.is_file():
                raise TrainerError(DATASET_NOT_FOUND, f"dataset {uri} does not exist (looked at {path})")
            return DatasetFile(path, uri, sha256_file(path))
        raise self._missing()

    def latest_checkpoint(self) -> int | None:
        raise self._missing()

    def download_checkpoint(self, step: int, dest: Path) -> Path:
        raise self._missing()

    def save_checkpoint(self, step: int, local_dir: Path) -> str:
        raise self._missing()

    def prune_checkpoints(self, keep: int) -> None:
        raise self._missing()

    def existing_adapter(self) -> PublishedArtifact | None:
        raise self._missing()

    def publish_adapter(self, local_dir: Path, lineage: dict[str, Any]) -> PublishedArtifact:
        raise self._missing()


def _matches(folder: Path, manifest: dict[str, Any]) -> bool:
    files: list[dict[str, Any]] = folder_manifest(folder)["files"]
    return bool(files == manifest["files"])


def _write_last(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
