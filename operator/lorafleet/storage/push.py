"""The write protocol of a version (docs/storage.md has the full argument):

1. While step 2 runs, look for ``manifest.json``: if it exists the upload stops and is removed, and the local
   files' hashes decide: the same content is a no-op, other content is refused. A push of at most one part's
   worth of data skips this look once the bucket's conditional-write support is known: step 3 decides the same.
2. Upload every file under ``<version>/data/<upload-id>/`` (unique per writer; upload.py).
3. Create ``<version>/manifest.json`` with ``If-None-Match: *``. That PUT is the commit: exactly one writer
   succeeds; a loser deletes its own upload and gets VersionExists (or a no-op if it uploaded the same content).

Files of two writers never share a key, so nothing is ever overwritten or mixed, and a version without a manifest
(interrupted upload) is invisible: list skips it, pull refuses it, gc removes it once old enough.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from lorafleet import __version__
from lorafleet.storage.client import is_conditional_conflict, is_precondition_failed
from lorafleet.storage.errors import StoreError, VersionExists
from lorafleet.storage.hashing import file_entry, scan_folder
from lorafleet.storage.layout import VersionFolder, new_upload_id
from lorafleet.storage.manifest import (
    DATA_DIR,
    RESERVED_DIR,
    ArtifactKind,
    BaseModelRef,
    DatasetRef,
    FileEntry,
    Manifest,
    digest_of,
    now_rfc3339,
)
from lorafleet.storage.objects import StoreIO, backoff
from lorafleet.storage.upload import upload_files

log = logging.getLogger("lorafleet.storage")

# The commit step: (folder, manifest bytes, conditional) -> False when another writer's manifest is there.
Commit = Callable[[VersionFolder, bytes, bool], bool]


@dataclass(frozen=True)
class PushResult:
    folder: VersionFolder
    manifest: Manifest
    digest: str
    created: bool  # False: the same content was already there (a no-op)


@dataclass(frozen=True)
class Lineage:
    """What a push says about the version besides its files."""

    kind: ArtifactKind
    name: str
    version: str
    base_model: BaseModelRef | None = None
    dataset: DatasetRef | None = None
    hyperparameters: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    trainer_image: str | None = None
    evaluation: dict[str, Any] | None = None

    def manifest(self, entries: list[FileEntry], data_prefix: str, block_size: int) -> Manifest:
        return Manifest(
            kind=self.kind,
            name=self.name,
            version=self.version,
            data_prefix=data_prefix,
            files=entries,
            total_size=sum(e.size for e in entries),
            block_size=block_size,
            base_model=self.base_model,
            dataset=self.dataset,
            hyperparameters=self.hyperparameters or {},
            metrics=self.metrics or {},
            trainer_image=self.trainer_image,
            evaluation=self.evaluation,
            lorafleet_version=__version__,
            created_at=now_rfc3339(),
        )


class VersionWriter:
    """Pushes versions; remembers per bucket whether the server honours conditional writes."""

    def __init__(self, io: StoreIO, conditional_writes: bool | None = None) -> None:
        """conditional_writes: None probes the server once per bucket; False forces the weaker fallback."""
        self.io = io
        self._conditional: dict[str, bool] = {}
        self._forced_conditional = conditional_writes

    # -- conditional writes ---------------------------------------------------------------------------------

    def probed(self, folder: VersionFolder) -> bool:
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
        client = self.io.client
        key = folder.data_key(f"{DATA_DIR}/{new_upload_id()}", f"{RESERVED_DIR}/probe")
        supported = False
        try:
            for i in range(2):
                try:
                    client.put_object(Bucket=folder.bucket, Key=key, Body=b"probe", IfNoneMatch="*", **self.io.sse())
                except ClientError as e:
                    if i == 1 and is_precondition_failed(e):
                        supported = True
                        break
                    if i == 0 and (e.response.get("Error", {}).get("Code") in ("NotImplemented", "501")):
                        break
                    raise
        except (ClientError, BotoCoreError) as e:
            raise self.io.err(e, folder.bucket, key, "probe conditional writes with") from e
        finally:
            with contextlib.suppress(ClientError, BotoCoreError):  # a stray probe is harmless; gc removes it
                client.delete_object(Bucket=folder.bucket, Key=key)
        if not supported:
            log.warning(
                "%s ignores If-None-Match on PUT: concurrent pushes of one version are detected after the fact "
                "(see docs/storage.md)",
                self.io.settings.describe(),
            )
        self._conditional[folder.bucket] = supported
        return supported

    # -- push -----------------------------------------------------------------------------------------------

    def push(
        self,
        src: Path,
        folder: VersionFolder,
        lineage: Lineage,
        *,
        commit: Commit,
        on_file: Callable[[str], None] | None = None,
    ) -> PushResult:
        """Upload src as an immutable version. Same content again: no-op; other content: VersionExists.

        commit is the step that creates manifest.json (normally self.commit; the front passes its own method so
        a test can hold concurrent writers at the commit point).
        """
        files = scan_folder(src)
        block_size = self.io.settings.transfer.block_size
        upload_id = new_upload_id()
        data_prefix = f"{DATA_DIR}/{upload_id}"
        started_at = datetime.now(UTC).replace(microsecond=0)
        # The existence check and the conditional-write probe run while the files upload, so a new version (the
        # usual case) waits for neither. Finding a version (or failing to look) stops the upload at its next part.
        # A push of at most one part's worth of data skips the check once the probe's answer is known: the check
        # could stop no more than that much upload, and the conditional commit (or, without conditional writes,
        # the fallback's own check) refuses an existing version anyway, with the same outcome. There the check
        # only competed with the upload for CPU and GIL.
        look = sum(f.size for f in files) > self.io.settings.transfer.multipart_threshold or not self.probed(folder)
        stop = threading.Event()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lf-check") as checks:
            pending: list[Future[Any]] = []
            if look:
                existing_check = checks.submit(self.io.existing, folder)
                existing_check.add_done_callback(lambda f: stop.set() if f.exception() or f.result() else None)
                pending = [existing_check, checks.submit(self.supports_conditional_writes, folder)]
            try:
                entries = upload_files(self.io, files, folder, data_prefix, on_file, stop)
                if look:
                    existing = pending[0].result()
                    conditional = pending[1].result()
                else:
                    existing, conditional = None, self.supports_conditional_writes(folder)  # known: no request
            except BaseException:
                # Failed, interrupted, or stopped by the check: the version stays invisible. Remove what this
                # writer staged; if even that fails (store down), gc removes it later.
                self.cleanup_upload(folder, data_prefix)
                if not look or not stop.is_set() or not pending[0].done():
                    raise
                existing = pending[0].result()  # the check's own error, when it failed, is the one to report
                if existing is None:
                    raise
                entries = [file_entry(f, block_size) for f in files]
        if existing is not None:
            self.cleanup_upload(folder, data_prefix)
            ours = lineage.manifest(entries, existing[0].data_prefix, block_size)
            return self.same_or_refuse(folder, ours, *existing)
        manifest = lineage.manifest(entries, data_prefix, block_size)
        body = manifest.canonical_bytes()
        # No cleanup if the commit itself fails: the PUT may have landed with its response lost, and deleting
        # the data of a committed manifest would break the version. gc removes the upload if it is unreferenced.
        if commit(folder, body, conditional):
            return PushResult(folder, manifest, digest_of(body), created=True)
        winner, winner_digest, _ = self.io.read_manifest(folder)
        if winner.data_prefix == data_prefix:
            # Our own PUT landed, its response was lost, and botocore's retry hit our manifest.
            return PushResult(folder, winner, winner_digest, created=True)
        # Another writer committed first: our upload is garbage whatever the outcome. Without the existence
        # check, the winner's creation time tells a race from a version that was there before this push.
        self.cleanup_upload(folder, data_prefix)
        raced = look or created_after(winner, started_at)
        return self.same_or_refuse(folder, manifest, winner, winner_digest, raced=raced)

    def same_or_refuse(
        self, folder: VersionFolder, ours: Manifest, theirs: Manifest, their_digest: str, raced: bool = False
    ) -> PushResult:
        if ours.identity() == theirs.identity():
            return PushResult(folder, theirs, their_digest, created=False)
        differs = describe_difference(ours, theirs)
        when = "was committed by another writer while this one uploaded" if raced else "already exists"
        raise VersionExists(
            f"{folder.uri} {when} with different content ({differs}; existing digest {their_digest}, created "
            f"{theirs.created_at}): versions are immutable, push under a new version"
        )

    def commit(self, folder: VersionFolder, body: bytes, conditional: bool) -> bool:
        """Create manifest.json; False when another writer's manifest is already there."""
        key = folder.manifest_key
        args: dict[str, Any] = {
            "Bucket": folder.bucket,
            "Key": key,
            "Body": body,
            "ContentType": "application/json",
            **self.io.sse(),
        }
        attempts = self.io.settings.max_attempts
        if conditional:
            for attempt in range(1, attempts + 1):
                try:
                    self.io.client.put_object(**args, IfNoneMatch="*")
                    return True
                except ClientError as e:
                    if is_precondition_failed(e):
                        return False
                    if is_conditional_conflict(e) and attempt < attempts:
                        backoff(attempt)
                        continue
                    raise self.io.err(e, folder.bucket, key, "write the manifest") from e
                except BotoCoreError as e:
                    raise self.io.err(e, folder.bucket, key, "write the manifest") from e
        # Fallback for servers without conditional writes: check, write, read back. Two writers racing in the
        # gap both write, the last one's manifest stands and the other sees it on read-back: each manifest only
        # references its own upload, so files are never mixed, but the loser learns it lost after the fact.
        if self.io.existing(folder) is not None:
            return False
        try:
            self.io.client.put_object(**args)
        except (ClientError, BotoCoreError) as e:
            raise self.io.err(e, folder.bucket, key, "write the manifest") from e
        time.sleep(0.5)  # let a racing writer's PUT land before the read-back
        _, digest, raw = self.io.read_manifest(folder)
        if raw != body:
            log.warning("manifest of %s was overwritten by a concurrent writer (%s)", folder.uri, digest)
            return False
        return True

    def cleanup_upload(self, folder: VersionFolder, data_prefix: str) -> None:
        """Remove this writer's staged upload; on failure leave it to gc (it is invisible either way)."""
        prefix = folder.location.key(data_prefix) + "/"
        try:
            self.io.delete_keys(folder.bucket, [o["Key"] for o in self.io.keys(folder.bucket, prefix)])
            self.io.abort_multipart(folder.bucket, prefix)
        except StoreError as e:
            log.warning("could not remove the staged upload %s/%s (gc will): %s", folder.uri, data_prefix, e)


def created_after(manifest: Manifest, since: datetime) -> bool:
    """Whether the manifest was created after since, in a later second by the writer's clock (within the same
    second it cannot tell, and "already exists" is true either way)."""
    try:
        created = datetime.fromisoformat(manifest.created_at.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        return False
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return created > since


def describe_difference(ours: Manifest, theirs: Manifest) -> str:
    a, b = ours.identity(), theirs.identity()
    if a.get("files") != b.get("files"):
        ours_f = {f.path: f.sha256 for f in ours.files}
        theirs_f = {f.path: f.sha256 for f in theirs.files}
        changed = sorted(p for p in ours_f.keys() | theirs_f.keys() if ours_f.get(p) != theirs_f.get(p))
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        return "files differ: " + ", ".join(changed[:5]) + more
    fields = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return "lineage differs: " + ", ".join(fields)
