"""ArtifactStore: immutable, checksummed adapter and model versions in any S3-compatible store.

This is the front; the work is in its parts (docs/storage.md has the protocol and why it is safe):

- objects.py: the clients and the requests every part shares (retried reads, listing, deletes, the manifest);
- hashing.py: local files and their sha256s (file and per-block);
- push.py: the write protocol (existence check, conditional commit, refusal), upload.py: its file transfer;
- download.py: pull, parallel ranged GETs verified block by block, resumable;
- catalog.py: walk, list, delete, gc, verify.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from lorafleet.storage import catalog, download
from lorafleet.storage.catalog import VersionInfo
from lorafleet.storage.download import PullResult
from lorafleet.storage.hashing import (
    FileHasher,
    LocalFile,
    block_hashes,
    file_entry,
    hash_file,
    scan_folder,
    verify_local,
)
from lorafleet.storage.layout import Location, VersionFolder
from lorafleet.storage.manifest import ArtifactKind, BaseModelRef, DatasetRef, Manifest
from lorafleet.storage.objects import StoreIO
from lorafleet.storage.push import Lineage, PushResult, VersionWriter
from lorafleet.storage.settings import StoreSettings

# The names this module defined before its parts were split out; importers of lorafleet.storage.store keep working.
__all__ = [
    "ArtifactStore",
    "FileHasher",
    "LocalFile",
    "PullResult",
    "PushResult",
    "VersionInfo",
    "block_hashes",
    "file_entry",
    "hash_file",
    "scan_folder",
    "verify_local",
]


class ArtifactStore:
    """Push, pull, verify, list and garbage-collect artifact versions on one S3-compatible endpoint."""

    def __init__(
        self,
        settings: StoreSettings,
        *,
        client: Any | None = None,
        conditional_writes: bool | None = None,
    ) -> None:
        """conditional_writes: None probes the server once per bucket; False forces the weaker fallback."""
        self._io = StoreIO(settings, client)
        self._writer = VersionWriter(self._io, conditional_writes)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ArtifactStore:
        return cls(StoreSettings.from_env(env))

    @property
    def settings(self) -> StoreSettings:
        return self._io.settings

    @property
    def client(self) -> Any:
        """The boto3 client for manifests, listings and deletes."""
        return self._io.client

    @property
    def data_client(self) -> Any:
        """The boto3 client for file bodies, whose integrity lorafleet's own sha256s check (objects.py)."""
        return self._io.data_client

    def read_manifest(self, folder: VersionFolder, *, explain: bool = True) -> tuple[Manifest, str, bytes]:
        """(manifest, digest, raw bytes). IncompleteVersion when files exist without a manifest (with explain;
        without, ObjectNotFound either way, and one request less)."""
        return self._io.read_manifest(folder, explain=explain)

    def supports_conditional_writes(self, folder: VersionFolder) -> bool:
        """Whether the server honours If-None-Match: * on PUT; probed once per bucket."""
        return self._writer.supports_conditional_writes(folder)

    def push(
        self,
        src: Path,
        folder: VersionFolder,
        *,
        kind: ArtifactKind,
        name: str,
        version: str,
        base_model: BaseModelRef | None = None,
        dataset: DatasetRef | None = None,
        hyperparameters: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        trainer_image: str | None = None,
        evaluation: dict[str, Any] | None = None,
        on_file: Callable[[str], None] | None = None,
    ) -> PushResult:
        """Upload src as an immutable version. Same content again: no-op; other content: VersionExists."""
        lineage = Lineage(kind, name, version, base_model, dataset, hyperparameters, metrics, trainer_image, evaluation)
        # self._commit is looked up per push: the race tests wrap it to hold writers at the commit point.
        return self._writer.push(Path(src), folder, lineage, commit=self._commit, on_file=on_file)

    def _commit(self, folder: VersionFolder, body: bytes, conditional: bool) -> bool:
        """Create manifest.json; False when another writer's manifest is already there."""
        return self._writer.commit(folder, body, conditional)

    def pull(self, folder: VersionFolder, dest: Path, *, digest: str | None = None) -> PullResult:
        """Download a version into dest, verifying every file; resumes an interrupted pull into the same dest."""
        return download.pull(self._io, folder, dest, digest=digest)

    def verify(self, folder: VersionFolder, *, digest: str | None = None) -> tuple[Manifest, str]:
        """Re-hash every remote file against the manifest (no local copy). ChecksumMismatch lists all bad files."""
        return catalog.verify(self._io, folder, digest=digest)

    def walk(self, root: Location, max_depth: int = 6) -> Iterator[VersionInfo]:
        """Every version folder under root (complete or not): a folder with a manifest.json or a data/ folder."""
        return catalog.walk(self._io, root, max_depth)

    def list_versions(self, root: Location, *, include_incomplete: bool = False) -> list[VersionInfo]:
        return catalog.list_versions(self._io, root, include_incomplete=include_incomplete)

    def delete_version(self, folder: VersionFolder) -> int:
        """Remove a version: manifest first (it stops being served at once), then its data. Returns objects removed."""
        return catalog.delete_version(self._io, folder)

    def gc(self, root: Location, older_than: timedelta, *, dry_run: bool = False) -> list[str]:
        """Remove unreferenced uploads older than older_than (interrupted pushes, losers of a race); returns their
        s3:// URIs (or those it would remove, with dry_run). Keep older_than above the longest push."""
        return catalog.gc(self._io, root, older_than, dry_run=dry_run)
