"""ArtifactStore: immutable, checksummed adapter and model versions in any S3-compatible store.

The write protocol (docs/storage.md has the full argument):

1. While step 2 runs, look for ``manifest.json``: if it exists the upload stops and is removed, and the local
   files' hashes decide: the same content is a no-op, other content is refused. A push of at most one part's
   worth of data skips this look once the bucket's conditional-write support is known: step 3 decides the same.
2. Upload every file under ``<version>/data/<upload-id>/`` (unique per writer; multipart, parts in parallel),
   each part hashed as it is read and sent with its sha256 as the S3 checksum (the server verifies it).
3. Create ``<version>/manifest.json`` with ``If-None-Match: *``. That PUT is the commit: exactly one writer
   succeeds; a loser deletes its own upload and gets VersionExists (or a no-op if it uploaded the same content).

Files of two writers never share a key, so nothing is ever overwritten or mixed, and a version without a manifest
(interrupted upload) is invisible: list skips it, pull refuses it, gc removes it once old enough.

Downloads fetch ranged chunks in parallel into a partial file whose completed chunks are journaled, so an
interrupted pull resumes where it stopped; the sha256 is computed in order as chunks land, and a file is moved into
place only when its size and sha256 match the manifest.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.utils import S3_RETRYABLE_DOWNLOAD_ERRORS

from lorafleet import __version__
from lorafleet.storage.client import is_conditional_conflict, is_precondition_failed, make_client, translate
from lorafleet.storage.errors import (
    ChecksumMismatch,
    IncompleteVersion,
    ObjectNotFound,
    StoreError,
    StoreUnavailable,
    VersionExists,
)
from lorafleet.storage.layout import Location, VersionFolder, new_upload_id, upload_time
from lorafleet.storage.manifest import (
    DATA_DIR,
    MANIFEST_NAME,
    RESERVED_DIR,
    ArtifactKind,
    BaseModelRef,
    DatasetRef,
    FileEntry,
    Manifest,
    block_count,
    check_digest,
    check_relative_path,
    digest_of,
    now_rfc3339,
    parse_manifest,
)
from lorafleet.storage.settings import MiB, StoreSettings

log = logging.getLogger("lorafleet.storage")

_HASH_BLOCK = 8 * MiB
_STREAM_BLOCK = 1 * MiB
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


# -- results --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushResult:
    folder: VersionFolder
    manifest: Manifest
    digest: str
    created: bool  # False: the same content was already there (a no-op)


@dataclass(frozen=True)
class PullResult:
    folder: VersionFolder
    dest: Path
    manifest: Manifest
    digest: str
    downloaded_bytes: int
    reused_bytes: int  # already in place (verified) or resumed from a partial download


@dataclass
class VersionInfo:
    folder: VersionFolder
    complete: bool
    manifest: Manifest | None = None
    digest: str | None = None
    uploads: list[str] = field(default_factory=list)  # upload ids under data/


@dataclass(frozen=True)
class LocalFile:
    path: str  # relative, POSIX
    abspath: Path
    size: int
    mtime_ns: int


# -- local files ----------------------------------------------------------------------------------------------


def scan_folder(src: Path) -> list[LocalFile]:
    """Regular files under src (symlinks followed, as in a Hugging Face snapshot), sorted by path."""
    if not src.is_dir():
        raise StoreError(f"{src} is not a folder: push takes the folder holding the adapter or model files")
    out: list[LocalFile] = []
    for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
        rel_dir = Path(dirpath).relative_to(src)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d != RESERVED_DIR]  # a pulled folder's bookkeeping
        for name in filenames:
            p = Path(dirpath) / name
            st = p.stat()
            rel = (rel_dir / name).as_posix()
            try:
                check_relative_path(rel)
            except ValueError as e:
                raise StoreError(f"cannot push {p}: {e}") from e
            out.append(LocalFile(rel, p, st.st_size, st.st_mtime_ns))
    if not out:
        raise StoreError(f"{src} holds no files: nothing to push")
    return sorted(out, key=lambda f: f.path)


class FileHasher:
    """sha256 of a whole stream and, with a block size, of each block of it, fed in pieces of any size."""

    def __init__(self, block_size: int | None = None) -> None:
        self.file = hashlib.sha256()
        self.block_size = block_size
        self.blocks: list[str] = []
        self._block = hashlib.sha256()
        self._in_block = 0
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self.file.update(data)  # hashlib releases the GIL on large buffers: this overlaps the transfer threads
        self.size += len(data)
        if not self.block_size:
            return
        pos, n = 0, len(data)
        while pos < n:
            take = min(n - pos, self.block_size - self._in_block)
            self._block.update(data[pos : pos + take])
            self._in_block += take
            pos += take
            if self._in_block == self.block_size:
                self.blocks.append(self._block.hexdigest())
                self._block, self._in_block = hashlib.sha256(), 0

    def result(self) -> tuple[str, list[str] | None]:
        blocks = self.blocks + ([self._block.hexdigest()] if self._in_block else [])
        return self.file.hexdigest(), (blocks if len(blocks) > 1 else None)


def hash_file(path: Path, block_size: int | None = None) -> tuple[str, list[str] | None]:
    """sha256 of the file and, when it spans several blocks, of each block, in one read."""
    size = path.stat().st_size
    # Block hashes only for files of several blocks (the manifest lists none otherwise): half the CPU for the rest.
    hasher = FileHasher(block_size if block_size and size > block_size else None)
    buf = bytearray(_HASH_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            hasher.update(view[:n])
    return hasher.result()


def block_hashes(path: Path, block_size: int) -> list[str]:
    hashes = []
    with open(path, "rb", buffering=0) as f:
        while block := f.read(block_size):
            hashes.append(hashlib.sha256(block).hexdigest())
    return hashes


def file_entry(f: LocalFile, block_size: int, pool: ThreadPoolExecutor | None = None) -> FileEntry:
    """The manifest entry of a local file. With a pool, the file hash and the block hashes run in two threads
    (two reads, the second from the page cache): on a machine with spare cores hashing takes half as long."""
    if pool is None or f.size <= block_size:
        sha, blocks = hash_file(f.abspath, block_size)
    else:
        later = pool.submit(block_hashes, f.abspath, block_size)
        sha, blocks = hash_file(f.abspath)[0], later.result()
    return FileEntry(path=f.path, sha256=sha, size=f.size, blocks=blocks)


def verify_local(path: Path, entry: FileEntry) -> bool:
    try:
        return path.stat().st_size == entry.size and hash_file(path)[0] == entry.sha256
    except FileNotFoundError:
        return False


# -- the store ------------------------------------------------------------------------------------------------


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
        self.settings = settings
        self.client = client or make_client(settings)
        # File bodies go through a client that leaves their integrity to lorafleet's own sha256s (sent as
        # x-amz-checksum-sha256 on upload, checked against the manifest on download) instead of hashing every
        # byte again for the signature and for botocore's default checksums.
        self.data_client = client or make_client(settings, verified_bodies=True)
        self._conditional: dict[str, bool] = {}
        self._forced_conditional = conditional_writes

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ArtifactStore:
        return cls(StoreSettings.from_env(env))

    # -- small helpers --------------------------------------------------------------------------------------

    def _err(self, e: Exception, bucket: str, key: str | None, action: str) -> StoreError:
        return translate(e, self.settings, bucket, key, action)

    def _sse(self) -> dict[str, str]:
        return {"ServerSideEncryption": self.settings.sse} if self.settings.sse else {}

    def _get_bytes(self, bucket: str, key: str, action: str = "read") -> bytes:
        for attempt in range(1, self.settings.max_attempts + 1):
            try:
                body: bytes = self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
                return body
            except S3_RETRYABLE_DOWNLOAD_ERRORS as e:  # botocore does not retry a body cut mid-stream
                if attempt == self.settings.max_attempts:
                    raise self._err(e, bucket, key, action) from e
                _backoff(attempt)
            except (ClientError, BotoCoreError) as e:
                raise self._err(e, bucket, key, action) from e
        raise AssertionError("unreachable")

    def _list(self, bucket: str, prefix: str, delimiter: str | None = None) -> Iterator[dict[str, Any]]:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        try:
            yield from self.client.get_paginator("list_objects_v2").paginate(**kwargs)
        except (ClientError, BotoCoreError) as e:
            raise self._err(e, bucket, prefix, "list") from e

    def _keys(self, bucket: str, prefix: str) -> list[dict[str, Any]]:
        return [obj for page in self._list(bucket, prefix) for obj in page.get("Contents", [])]

    def _delete_keys(self, bucket: str, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            try:
                resp = self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            except (ClientError, BotoCoreError) as e:
                raise self._err(e, bucket, batch[0]["Key"], "delete") from e
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise StoreError(
                    f"could not delete {len(resp['Errors'])} objects in s3://{bucket}, first "
                    f"{first.get('Key')}: {first.get('Code')}: {first.get('Message')}"
                )

    def _abort_multipart(self, bucket: str, prefix: str, older_than: datetime | None = None) -> int:
        """Abort unfinished multipart uploads under prefix (their parts use space but are invisible)."""
        aborted = 0
        try:
            # Listed bucket-wide and filtered here: MinIO lists multipart uploads only for an exact key or no prefix.
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
                for up in page.get("Uploads", []):
                    if not up["Key"].startswith(prefix) or (older_than is not None and up["Initiated"] > older_than):
                        continue
                    self.client.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                    aborted += 1
        except (ClientError, BotoCoreError) as e:
            raise self._err(e, bucket, prefix, "abort multipart uploads under") from e
        return aborted

    # -- manifests ------------------------------------------------------------------------------------------

    def read_manifest(self, folder: VersionFolder, *, explain: bool = True) -> tuple[Manifest, str, bytes]:
        """(manifest, digest, raw bytes). IncompleteVersion when files exist without a manifest (with explain;
        without, ObjectNotFound either way, and one request less)."""
        try:
            raw = self._get_bytes(folder.bucket, folder.manifest_key, "read the manifest")
        except ObjectNotFound:
            if explain and self._keys_exist(folder.bucket, folder.location.key("") + "/"):
                raise IncompleteVersion(
                    f"{folder.uri} has files but no {MANIFEST_NAME}: an upload was interrupted or is still "
                    "running, so it is not a version yet; push it again, or remove it with "
                    f"`lorafleet artifacts gc {folder.uri} --older-than 1h`"
                ) from None
            raise ObjectNotFound(
                f"no version at {folder.uri} (no {MANIFEST_NAME}): check the URI, or push it first"
            ) from None
        try:
            manifest, digest = parse_manifest(raw)
        except ValueError as e:
            raise StoreError(f"{folder.uri}/{MANIFEST_NAME} is not a valid lorafleet manifest: {e}") from e
        return manifest, digest, raw

    def _keys_exist(self, bucket: str, prefix: str) -> bool:
        try:
            resp = self.client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        except (ClientError, BotoCoreError) as e:
            raise self._err(e, bucket, prefix, "list") from e
        return bool(resp.get("KeyCount") or resp.get("Contents"))

    def _existing(self, folder: VersionFolder) -> tuple[Manifest, str] | None:
        try:
            manifest, digest, _ = self.read_manifest(folder, explain=False)
        except ObjectNotFound:
            return None  # an incomplete version is not a version: a new writer may still claim it
        return manifest, digest

    def _probed(self, folder: VersionFolder) -> bool:
        """Whether supports_conditional_writes answers without a request."""
        return self._forced_conditional is not None or folder.bucket in self._conditional

    def supports_conditional_writes(self, folder: VersionFolder) -> bool:
        """Whether the server honours If-None-Match: * on PUT (AWS since 2024-08, MinIO, recent Ceph RGW).

        Probed once per bucket: create an object twice under a throwaway upload id; the second must be refused.
        """
        if self._forced_conditional is not None:
            return self._forced_conditional
        if folder.bucket in self._conditional:
            return self._conditional[folder.bucket]
        key = folder.data_key(f"{DATA_DIR}/{new_upload_id()}", f"{RESERVED_DIR}/probe")
        supported = False
        try:
            for i in range(2):
                try:
                    self.client.put_object(Bucket=folder.bucket, Key=key, Body=b"probe", IfNoneMatch="*", **self._sse())
                except ClientError as e:
                    if i == 1 and is_precondition_failed(e):
                        supported = True
                        break
                    if i == 0 and (e.response.get("Error", {}).get("Code") in ("NotImplemented", "501")):
                        break
                    raise
        except (ClientError, BotoCoreError) as e:
            raise self._err(e, folder.bucket, key, "probe conditional writes with") from e
        finally:
            with contextlib.suppress(ClientError, BotoCoreError):  # a stray probe is harmless; gc removes it
                self.client.delete_object(Bucket=folder.bucket, Key=key)
        if not supported:
            log.warning(
                "%s ignores If-None-Match on PUT: concurrent pushes of one version are detected after the fact "
                "(see docs/storage.md)",
                self.settings.describe(),
            )
        self._conditional[folder.bucket] = supported
        return supported

    # -- push -----------------------------------------------------------------------------------------------

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
        on_file: Callable[[str], None] | None = None,
    ) -> PushResult:
        """Upload src as an immutable version. Same content again: no-op; other content: VersionExists."""
        files = scan_folder(Path(src))
        block_size = self.settings.transfer.block_size

        def manifest_for(entries: list[FileEntry], data_prefix: str) -> Manifest:
            return Manifest(
                kind=kind,
                name=name,
                version=version,
                data_prefix=data_prefix,
                files=entries,
                total_size=sum(e.size for e in entries),
                block_size=block_size,
                base_model=base_model,
                dataset=dataset,
                hyperparameters=hyperparameters or {},
                metrics=metrics or {},
                trainer_image=trainer_image,
                lorafleet_version=__version__,
                created_at=now_rfc3339(),
            )

        upload_id = new_upload_id()
        data_prefix = f"{DATA_DIR}/{upload_id}"
        started_at = datetime.now(UTC).replace(microsecond=0)
        # The existence check and the conditional-write probe run while the files upload, so a new version (the
        # usual case) waits for neither. Finding a version (or failing to look) stops the upload at its next part.
        # A push of at most one part's worth of data skips the check once the probe's answer is known: the check
        # could stop no more than that much upload, and the conditional commit (or, without conditional writes,
        # the fallback's own check) refuses an existing version anyway, with the same outcome. There the check
        # only competed with the upload for CPU and GIL.
        look = sum(f.size for f in files) > self.settings.transfer.multipart_threshold or not self._probed(folder)
        stop = threading.Event()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lf-check") as checks:
            pending: list[Future[Any]] = []
            if look:
                existing_check = checks.submit(self._existing, folder)
                existing_check.add_done_callback(lambda f: stop.set() if f.exception() or f.result() else None)
                pending = [existing_check, checks.submit(self.supports_conditional_writes, folder)]
            try:
                entries = self._upload_files(files, folder, data_prefix, on_file, stop)
                if look:
                    existing = pending[0].result()
                    conditional = pending[1].result()
                else:
                    existing, conditional = None, self.supports_conditional_writes(folder)  # known: no request
            except BaseException:
                # Failed, interrupted, or stopped by the check: the version stays invisible. Remove what this
                # writer staged; if even that fails (store down), gc removes it later.
                self._cleanup_upload(folder, data_prefix)
                if not look or not stop.is_set() or not pending[0].done():
                    raise
                existing = pending[0].result()  # the check's own error, when it failed, is the one to report
                if existing is None:
                    raise
                entries = [file_entry(f, block_size) for f in files]
        if existing is not None:
            self._cleanup_upload(folder, data_prefix)
            return self._same_or_refuse(folder, manifest_for(entries, existing[0].data_prefix), *existing)
        manifest = manifest_for(entries, data_prefix)
        body = manifest.canonical_bytes()
        # No cleanup if the commit itself fails: the PUT may have landed with its response lost, and deleting
        # the data of a committed manifest would break the version. gc removes the upload if it is unreferenced.
        if self._commit(folder, body, conditional):
            return PushResult(folder, manifest, digest_of(body), created=True)
        winner, winner_digest, _ = self.read_manifest(folder)
        if winner.data_prefix == data_prefix:
            # Our own PUT landed, its response was lost, and botocore's retry hit our manifest.
            return PushResult(folder, winner, winner_digest, created=True)
        # Another writer committed first: our upload is garbage whatever the outcome. Without the existence
        # check, the winner's creation time tells a race from a version that was there before this push.
        self._cleanup_upload(folder, data_prefix)
        raced = look or _created_after(winner, started_at)
        return self._same_or_refuse(folder, manifest, winner, winner_digest, raced=raced)

    def _same_or_refuse(
        self, folder: VersionFolder, ours: Manifest, theirs: Manifest, their_digest: str, raced: bool = False
    ) -> PushResult:
        if ours.identity() == theirs.identity():
            return PushResult(folder, theirs, their_digest, created=False)
        differs = _describe_difference(ours, theirs)
        when = "was committed by another writer while this one uploaded" if raced else "already exists"
        raise VersionExists(
            f"{folder.uri} {when} with different content ({differs}; existing digest {their_digest}, created "
            f"{theirs.created_at}): versions are immutable, push under a new version"
        )

    def _upload_files(
        self,
        files: list[LocalFile],
        folder: VersionFolder,
        data_prefix: str,
        on_file: Callable[[str], None] | None,
        stop: threading.Event,
    ) -> list[FileEntry]:
        """Upload every file (parts in parallel), hashing each byte once per digest it feeds.

        Each part is read once and hashed in its upload thread: the sha256 of its blocks goes into the manifest
        and, as ``x-amz-checksum-sha256``, to the server, which rejects a part whose bytes do not match. That
        signed checksum replaces botocore's own payload hash (plain HTTP) and its CRC32, so the manifest's block
        digests cost no extra pass. The file-wide sha256 of a multi-part file is the one more pass, in a thread
        of its own, reading from the page cache.
        """
        transfer = self.settings.transfer
        with (
            ThreadPoolExecutor(max_workers=transfer.max_concurrency, thread_name_prefix="lf-put") as pool,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="lf-hash") as hasher,
        ):
            uploads = [
                _FileUpload(self, f, folder.bucket, folder.data_key(data_prefix, f.path), pool, hasher, stop)
                for f in files
            ]
            try:
                if len(uploads) == 1 and uploads[0].n_parts == 1:
                    # One request in all: sent from this thread, without a hand-over to a pool thread and back.
                    uploads[0].start(inline=True)
                else:
                    for upload in uploads:
                        upload.start()
                entries = []
                for upload in uploads:
                    entries.append(upload.finish())
                    if on_file:
                        on_file(upload.file.path)
            except BaseException:
                for upload in uploads:
                    upload.cancel()
                raise
        for f in files:
            st = f.abspath.stat()
            if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
                raise StoreError(f"{f.abspath} changed while it was uploaded: push again once it is complete")
        return entries

    def _commit(self, folder: VersionFolder, body: bytes, conditional: bool) -> bool:
        """Create manifest.json; False when another writer's manifest is already there."""
        key = folder.manifest_key
        args: dict[str, Any] = {
            "Bucket": folder.bucket,
            "Key": key,
            "Body": body,
            "ContentType": "application/json",
            **self._sse(),
        }
        if conditional:
            for attempt in range(1, self.settings.max_attempts + 1):
                try:
                    self.client.put_object(**args, IfNoneMatch="*")
                    return True
                except ClientError as e:
                    if is_precondition_failed(e):
                        return False
                    if is_conditional_conflict(e) and attempt < self.settings.max_attempts:
                        _backoff(attempt)
                        continue
                    raise self._err(e, folder.bucket, key, "write the manifest") from e
                except BotoCoreError as e:
                    raise self._err(e, folder.bucket, key, "write the manifest") from e
        # Fallback for servers without conditional writes: check, write, read back. Two writers racing in the
        # gap both write, the last one's manifest stands and the other sees it on read-back: each manifest only
        # references its own upload, so files are never mixed, but the loser learns it lost after the fact.
        if self._existing(folder) is not None:
            return False
        try:
            self.client.put_object(**args)
        except (ClientError, BotoCoreError) as e:
            raise self._err(e, folder.bucket, key, "write the manifest") from e
        time.sleep(0.5)  # let a racing writer's PUT land before the read-back
        _, digest, raw = self.read_manifest(folder)
        if raw != body:
            log.warning("manifest of %s was overwritten by a concurrent writer (%s)", folder.uri, digest)
            return False
        return True

    def _cleanup_upload(self, folder: VersionFolder, data_prefix: str) -> None:
        prefix = folder.location.key(data_prefix) + "/"
        try:
            self._delete_keys(folder.bucket, [o["Key"] for o in self._keys(folder.bucket, prefix)])
            self._abort_multipart(folder.bucket, prefix)
        except StoreError as e:
            log.warning("could not remove the staged upload %s/%s (gc will): %s", folder.uri, data_prefix, e)

    # -- pull -----------------------------------------------------------------------------------------------

    def pull(self, folder: VersionFolder, dest: Path, *, digest: str | None = None) -> PullResult:
        """Download a version into dest, verifying every file; resumes an interrupted pull into the same dest."""
        manifest, actual, raw = self.read_manifest(folder)
        if digest is not None and check_digest(digest) != actual:
            raise ChecksumMismatch(
                f"{folder.uri} has digest {actual}, not the pinned {digest}: the version was replaced or the pin "
                "is wrong; fix the digest in the spec, or push under a new version"
            )
        dest = Path(dest)
        work = dest / RESERVED_DIR
        partial_dir = work / "partial"
        partial_dir.mkdir(parents=True, exist_ok=True)
        todo: list[FileEntry] = []
        reused = 0
        for entry in manifest.files:
            if verify_local(dest / entry.path, entry):
                reused += entry.size
            else:
                todo.append(entry)
        downloader = _Downloader(self, folder, manifest, dest, partial_dir)
        downloaded, resumed = downloader.run(todo)
        (work / MANIFEST_NAME).write_bytes(raw)
        (work / "digest").write_text(actual + "\n")
        shutil.rmtree(partial_dir, ignore_errors=True)
        return PullResult(folder, dest, manifest, actual, downloaded, reused + resumed)

    # -- verify ---------------------------------------------------------------------------------------------

    def verify(self, folder: VersionFolder, *, digest: str | None = None) -> tuple[Manifest, str]:
        """Re-hash every remote file against the manifest (no local copy). ChecksumMismatch lists all bad files."""
        manifest, actual, _ = self.read_manifest(folder)
        problems: list[str] = []
        if digest is not None and check_digest(digest) != actual:
            problems.append(f"manifest digest is {actual}, not {digest}")
        with ThreadPoolExecutor(max_workers=self.settings.transfer.max_concurrency) as pool:
            results = pool.map(lambda e: (e, self._remote_hash(folder, manifest, e)), manifest.files)
            for entry, (size, sha, blocks) in results:
                if size != entry.size:
                    problems.append(f"{entry.path}: {size} bytes, manifest says {entry.size}")
                elif sha != entry.sha256:
                    problems.append(f"{entry.path}: sha256 {sha}, manifest says {entry.sha256}")
                elif blocks != entry.blocks:
                    problems.append(f"{entry.path}: the manifest's block hashes do not match the content")
        if problems:
            raise ChecksumMismatch(
                f"{folder.uri} is corrupt: " + "; ".join(problems) + ". Restore it from a backup or push a new version"
            )
        return manifest, actual

    def _remote_hash(
        self, folder: VersionFolder, manifest: Manifest, entry: FileEntry
    ) -> tuple[int, str, list[str] | None]:
        key = folder.data_key(manifest.data_prefix, entry.path)
        for attempt in range(1, self.settings.max_attempts + 1):
            hasher = FileHasher(manifest.block_size if entry.blocks else None)
            try:
                body = self.data_client.get_object(Bucket=folder.bucket, Key=key)["Body"]
                for piece in body.iter_chunks(_STREAM_BLOCK):
                    hasher.update(piece)
                return (hasher.size, *hasher.result())
            except S3_RETRYABLE_DOWNLOAD_ERRORS as e:
                if attempt == self.settings.max_attempts:
                    raise self._err(e, folder.bucket, key, "read") from e
                _backoff(attempt)
            except (ClientError, BotoCoreError) as e:
                err = self._err(e, folder.bucket, key, "read")
                if isinstance(err, ObjectNotFound):
                    raise ChecksumMismatch(f"{folder.uri} is missing {entry.path} (s3://{folder.bucket}/{key})") from e
                raise err from e
        raise AssertionError("unreachable")

    # -- listing, deletion, gc ------------------------------------------------------------------------------

    def walk(self, root: Location, max_depth: int = 6) -> Iterator[VersionInfo]:
        """Every version folder under root (complete or not): a folder with a manifest.json or a data/ folder."""
        prefix = root.key("") + "/" if root.prefix else ""
        yield from self._walk(root.bucket, prefix, max_depth)

    def _walk(self, bucket: str, prefix: str, depth: int) -> Iterator[VersionInfo]:
        children: list[str] = []
        has_manifest = False
        uploads: list[str] = []
        for page in self._list(bucket, prefix, "/"):
            for obj in page.get("Contents", []):
                if obj["Key"] == prefix + MANIFEST_NAME:
                    has_manifest = True
            for cp in page.get("CommonPrefixes", []):
                children.append(cp["Prefix"])
        if prefix + DATA_DIR + "/" in children:
            for page in self._list(bucket, prefix + DATA_DIR + "/", "/"):
                uploads += [cp["Prefix"][len(prefix) + len(DATA_DIR) + 1 : -1] for cp in page.get("CommonPrefixes", [])]
        if has_manifest or uploads:
            folder = VersionFolder(Location(bucket, prefix.rstrip("/")))
            info = VersionInfo(folder, complete=has_manifest, uploads=sorted(uploads))
            if has_manifest:
                try:
                    info.manifest, info.digest, _ = self.read_manifest(folder)
                except ObjectNotFound:  # deleted between list and read
                    info.complete = False
            yield info
            return  # a version folder holds no other versions
        if depth > 0:
            for child in sorted(children):
                yield from self._walk(bucket, child, depth - 1)

    def list_versions(self, root: Location, *, include_incomplete: bool = False) -> list[VersionInfo]:
        return [v for v in self.walk(root) if v.complete or include_incomplete]

    def delete_version(self, folder: VersionFolder) -> int:
        """Remove a version: manifest first (it stops being served at once), then its data. Returns objects removed."""
        try:
            self.client.delete_object(Bucket=folder.bucket, Key=folder.manifest_key)
        except (ClientError, BotoCoreError) as e:
            raise self._err(e, folder.bucket, folder.manifest_key, "delete") from e
        keys = [o["Key"] for o in self._keys(folder.bucket, folder.location.key("") + "/")]
        self._delete_keys(folder.bucket, keys)
        self._abort_multipart(folder.bucket, folder.location.key("") + "/")
        return len(keys) + 1

    def gc(self, root: Location, older_than: timedelta, *, dry_run: bool = False) -> list[str]:
        """Remove uploads that no manifest references and that are older than older_than: interrupted pushes,
        losers of a race. Returns the data prefixes (s3:// URIs) removed (or that would be, with dry_run).

        Age is the newest of: the upload id's time, its newest object, its newest unfinished multipart upload;
        keep older_than above the longest push, or gc may remove an upload that is still running.
        """
        cutoff = datetime.now(UTC) - older_than
        removed: list[str] = []
        for info in self.walk(root):
            keep = info.manifest.data_prefix if info.manifest else None
            for upload_id in info.uploads:
                data_prefix = f"{DATA_DIR}/{upload_id}"
                if data_prefix == keep:
                    continue
                prefix = info.folder.location.key(data_prefix) + "/"
                objects = self._keys(info.folder.bucket, prefix)
                times = [o["LastModified"] for o in objects]
                started = upload_time(upload_id)
                if started:
                    times.append(started)
                if times and max(times) > cutoff:
                    continue
                removed.append(f"{info.folder.uri}/{data_prefix}")
                if not dry_run:
                    self._delete_keys(info.folder.bucket, [o["Key"] for o in objects])
                    self._abort_multipart(info.folder.bucket, prefix)
            if not dry_run:
                # Parts of multipart uploads whose objects never appeared (killed mid-part) are not listed above.
                self._abort_multipart(info.folder.bucket, info.folder.data_root, older_than=cutoff)
        return removed


# -- downloads ------------------------------------------------------------------------------------------------


class _FileUpload:
    """One file's upload: a single PUT up to the multipart threshold, else a multipart upload whose parts are
    whole numbers of manifest blocks (so a part's bytes are hashed once for both its blocks and its checksum)."""

    def __init__(
        self,
        store: ArtifactStore,
        file: LocalFile,
        bucket: str,
        key: str,
        pool: ThreadPoolExecutor,
        hasher: ThreadPoolExecutor,
        stop: threading.Event,
    ) -> None:
        self.store = store
        self.file = file
        self.bucket = bucket
        self.key = key
        self.pool = pool
        self.hasher = hasher
        transfer = store.settings.transfer
        self.block = transfer.block_size
        if file.size <= transfer.multipart_threshold:
            self.part_size = max(file.size, 1)
        else:  # S3 parts are >= 5 MiB: the smallest multiple of the block size >= the chunk size
            self.part_size = self.block * max(1, -(-transfer.multipart_chunksize // self.block))
        self.upload_id: str | None = None
        self.parts: list[Future[tuple[dict[str, Any], list[str], str]]] = []
        self.file_hash: Future[str] | None = None
        self.failed = stop  # shared by the files of one push: any failure stops them all

    @property
    def n_parts(self) -> int:
        return max(1, -(-self.file.size // self.part_size))

    def start(self, inline: bool = False) -> None:
        """Submit the parts to the pool; inline: send a single-part file in this thread, now."""
        size, part = self.file.size, self.part_size
        n_parts = self.n_parts
        if inline and n_parts == 1:
            done: Future[tuple[dict[str, Any], list[str], str]] = Future()
            try:
                done.set_result(self._send(0, 0, size))
            except Exception as e:
                done.set_exception(e)
            self.parts.append(done)
            return
        if n_parts > 1:
            self.file_hash = self.hasher.submit(_sha256_file, self.file.abspath, self.failed)
            try:
                algorithm = {"ChecksumAlgorithm": "SHA256"} if self.store.settings.checksum_headers else {}
                resp = self.store.data_client.create_multipart_upload(
                    Bucket=self.bucket, Key=self.key, **algorithm, **self.store._sse()
                )
            except (ClientError, BotoCoreError) as e:
                raise self.store._err(e, self.bucket, self.key, "upload") from e
            self.upload_id = resp["UploadId"]
        for i in range(n_parts):
            self.parts.append(self.pool.submit(self._send, i, i * part, min(part, size - i * part)))

    def _send(self, i: int, offset: int, length: int) -> tuple[dict[str, Any], list[str], str]:
        if self.failed.is_set():
            raise StoreError("cancelled")
        with open(self.file.abspath, "rb", buffering=0) as f:
            data = os.pread(f.fileno(), length, offset)
        if len(data) != length:
            raise StoreError(f"{self.file.abspath} shrank while it was uploaded: push again once it is complete")
        view = memoryview(data)
        blocks = [hashlib.sha256(view[a : a + self.block]).digest() for a in range(0, length, self.block)] or [
            hashlib.sha256(b"").digest()
        ]
        whole = blocks[0] if len(blocks) == 1 else hashlib.sha256(data).digest()
        checksum = base64.b64encode(whole).decode()
        sent = {"ChecksumSHA256": checksum} if self.store.settings.checksum_headers else {}
        client = self.store.data_client
        try:
            if self.upload_id is None:
                client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **sent, **self.store._sse())
                part: dict[str, Any] = {}
            else:
                resp = client.upload_part(
                    Bucket=self.bucket,
                    Key=self.key,
                    UploadId=self.upload_id,
                    PartNumber=i + 1,
                    Body=data,
                    **sent,
                )
                part = {"PartNumber": i + 1, "ETag": resp["ETag"], **sent}
        except (ClientError, BotoCoreError) as e:
            self.failed.set()
            raise self.store._err(e, self.bucket, self.key, "upload") from e
        return part, [b.hex() for b in blocks], whole.hex()

    def finish(self) -> FileEntry:
        results = [fut.result() for fut in self.parts]
        blocks = [b for _, part_blocks, _ in results for b in part_blocks]
        if self.upload_id is None:
            sha = results[0][2]
        else:
            assert self.file_hash is not None
            try:
                self.store.data_client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=self.key,
                    UploadId=self.upload_id,
                    MultipartUpload={"Parts": [part for part, _, _ in results]},
                )
            except (ClientError, BotoCoreError) as e:
                raise self.store._err(e, self.bucket, self.key, "complete the upload of") from e
            sha = self.file_hash.result()
        return FileEntry(
            path=self.file.path, sha256=sha, size=self.file.size, blocks=blocks if len(blocks) > 1 else None
        )

    def cancel(self) -> None:
        """Stop queued parts; the staged upload (parts included) is removed by the caller's cleanup."""
        self.failed.set()
        for fut in self.parts:
            fut.cancel()
        if self.file_hash is not None:
            self.file_hash.cancel()


def _sha256_file(path: Path, cancelled: threading.Event) -> str:
    h = hashlib.sha256()
    buf = bytearray(_HASH_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            if cancelled.is_set():
                raise StoreError("cancelled")
            h.update(view[:n])
    return h.hexdigest()


class _Downloader:
    """Parallel ranged GETs, one per manifest block, into journaled partial files; each block's sha256 is computed
    as it streams in, in its own thread, so verification overlaps the transfer.

    s3transfer's download cannot resume, and writes ranges out of order so a file-wide sha256 would need a second
    pass after the download; hence this small loop. Each request still gets botocore's retries; a body cut
    mid-stream is continued here from the last byte written.
    """

    def __init__(
        self, store: ArtifactStore, folder: VersionFolder, manifest: Manifest, dest: Path, partial_dir: Path
    ) -> None:
        self.store = store
        self.folder = folder
        self.manifest = manifest
        self.dest = dest
        self.partial_dir = partial_dir
        self.block = manifest.block_size
        self.failed = threading.Event()

    def run(self, entries: list[FileEntry]) -> tuple[int, int]:
        if not entries:
            return 0, 0
        jobs = [_FileJob(self, entry) for entry in entries]
        pool = ThreadPoolExecutor(max_workers=self.store.settings.transfer.max_concurrency, thread_name_prefix="lf-get")
        try:
            for job in jobs:  # submitted file by file, block by block
                job.start(pool)
            for job in jobs:
                job.finish()
        except BaseException:
            self.failed.set()  # running blocks stop at their next piece
            pool.shutdown(wait=True, cancel_futures=True)
            for job in jobs:
                job.close()
            raise
        pool.shutdown(wait=True)
        return sum(j.fetched for j in jobs), sum(j.resumed for j in jobs)


class _FileJob:
    def __init__(self, dl: _Downloader, entry: FileEntry) -> None:
        self.dl = dl
        self.entry = entry
        self.key = dl.folder.data_key(dl.manifest.data_prefix, entry.path)
        self.where = f"{entry.path} (s3://{dl.folder.bucket}/{self.key})"
        self.part = dl.partial_dir / entry.sha256
        self.journal = dl.partial_dir / f"{entry.sha256}.json"
        self.size = entry.size
        self.n = block_count(entry.size, dl.block)
        self.done: set[int] = self._load_journal()
        self.futures: list[Future[None]] = []
        self.fetched = 0
        self.resumed = 0
        self.fd = -1
        self._lock = threading.Lock()

    def _span(self, i: int) -> tuple[int, int]:
        start = i * self.dl.block
        return start, min(start + self.dl.block, self.size)  # [start, end)

    def _expected(self, i: int) -> str:
        return self.entry.blocks[i] if self.entry.blocks else self.entry.sha256

    def _load_journal(self) -> set[int]:
        try:
            state = json.loads(self.journal.read_text())
        except (OSError, ValueError):
            return set()
        if (state.get("sha256"), state.get("size"), state.get("block")) != (
            self.entry.sha256,
            self.size,
            self.dl.block,
        ):
            return set()
        if not self.part.exists():
            return set()
        return {i for i in state.get("done", []) if isinstance(i, int) and 0 <= i < self.n}

    def _mark_done(self, i: int) -> None:
        with self._lock:
            self.done.add(i)
            if self.n == 1:
                return  # nothing to resume within a single block: spare the journal write
            state = {"sha256": self.entry.sha256, "size": self.size, "block": self.dl.block, "done": sorted(self.done)}
            tmp = self.journal.with_suffix(f".{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self.journal)

    def start(self, pool: ThreadPoolExecutor) -> None:
        if not self.done:
            self.journal.unlink(missing_ok=True)
        self.fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(self.fd, self.size)  # sparse; blocks are written in place
        for i in range(self.n):
            task = self._recheck if i in self.done else self._fetch
            self.futures.append(pool.submit(task, i))

    def _recheck(self, i: int) -> None:
        """A block kept from an interrupted pull: trust it only if it still hashes right (a node crash can lose
        page-cache writes that the journal already recorded)."""
        start, end = self._span(i)
        data = os.pread(self.fd, end - start, start)
        if len(data) == end - start and hashlib.sha256(data).hexdigest() == self._expected(i):
            with self._lock:
                self.resumed += end - start
            return
        with self._lock:
            self.done.discard(i)
        self._fetch(i)

    def _fetch(self, i: int, verify_attempts: int = 2) -> None:
        start, end = self._span(i)
        settings = self.dl.store.settings
        bucket = self.dl.folder.bucket
        for verify_attempt in range(1, verify_attempts + 1):
            h = hashlib.sha256()
            pos = start
            attempt = 0
            while pos < end:
                if self.dl.failed.is_set():
                    raise StoreError("cancelled")
                try:
                    resp = self.dl.store.data_client.get_object(
                        Bucket=bucket, Key=self.key, Range=f"bytes={pos}-{end - 1}"
                    )
                    for piece in resp["Body"].iter_chunks(_STREAM_BLOCK):
                        if pos + len(piece) > end:
                            raise ChecksumMismatch(f"{self.where} is larger than the manifest says ({self.size} bytes)")
                        os.pwrite(self.fd, piece, pos)
                        h.update(piece)  # in this thread, while the other blocks stream in
                        pos += len(piece)
                        if self.dl.failed.is_set():
                            raise StoreError("cancelled")
                    if pos < end:
                        raise ConnectionError(f"short read: {pos - start} of {end - start} bytes")
                except S3_RETRYABLE_DOWNLOAD_ERRORS as e:
                    # The body was cut (server restarted, connection reset): go on from the last byte written;
                    # the hash object already holds every byte before it.
                    attempt += 1
                    if attempt >= settings.max_attempts:
                        raise StoreUnavailable(
                            f"download of s3://{bucket}/{self.key} kept failing ({attempt} attempts): {e}"
                        ) from e
                    log.info("retrying s3://%s/%s from byte %d after %s", bucket, self.key, pos, e)
                    _backoff(attempt)
                except (ClientError, BotoCoreError) as e:
                    err = self.dl.store._err(e, bucket, self.key, "download")
                    if isinstance(err, ObjectNotFound):
                        raise ChecksumMismatch(f"{self.dl.folder.uri} is missing {self.where}") from e
                    raise err from e
            actual = h.hexdigest()
            if actual == self._expected(i):
                with self._lock:
                    self.fetched += end - start
                self._mark_done(i)
                return
            if verify_attempt < verify_attempts:
                log.warning("%s bytes %d-%d failed their sha256, fetching them again", self.where, start, end - 1)
        what = f"bytes {start}-{end - 1} of {self.where} have" if self.entry.blocks else f"{self.where} has"
        raise ChecksumMismatch(
            f"{self.dl.folder.uri}: {what} sha256 {actual}, the manifest says {self._expected(i)}: the stored "
            f"object is corrupt; run `lorafleet artifacts verify {self.dl.folder.uri}` and restore it or push a new "
            "version"
        )

    def finish(self) -> None:
        """Wait for every block; move the file into place once all of them verified."""
        if self.n == 0 and self.entry.sha256 != _EMPTY_SHA256:
            raise ChecksumMismatch(f"{self.where}: the manifest lists 0 bytes with the sha256 of non-empty content")
        for fut in self.futures:
            try:
                fut.result()
            except StoreUnavailable as e:
                kept = len(self.done) * self.dl.block // MiB
                raise StoreUnavailable(
                    f"{e}. The {kept} MiB of verified blocks downloaded so far are kept in {self.dl.partial_dir}: run "
                    "the same pull again to resume"
                ) from e
        self.close()
        target = self.dl.dest / self.entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.part, target)
        self.journal.unlink(missing_ok=True)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- helpers --------------------------------------------------------------------------------------------------


def _backoff(attempt: int) -> None:
    time.sleep(min(20.0, 0.5 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0))


def _created_after(manifest: Manifest, since: datetime) -> bool:
    """Whether the manifest was created after since, in a later second by the writer's clock (within the same
    second it cannot tell, and "already exists" is true either way)."""
    try:
        created = datetime.fromisoformat(manifest.created_at.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        return False
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return created > since


def _describe_difference(ours: Manifest, theirs: Manifest) -> str:
    a, b = ours.identity(), theirs.identity()
    if a.get("files") != b.get("files"):
        ours_f = {f.path: f.sha256 for f in ours.files}
        theirs_f = {f.path: f.sha256 for f in theirs.files}
        changed = sorted(p for p in ours_f.keys() | theirs_f.keys() if ours_f.get(p) != theirs_f.get(p))
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        return "files differ: " + ", ".join(changed[:5]) + more
    fields = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return "lineage differs: " + ", ".join(fields)
