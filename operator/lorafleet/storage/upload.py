"""The bytes of a push: every file uploaded under the writer's own ``data/<upload-id>/``, parts in parallel, each
part hashed once for both the manifest's block digests and the sha256 the server checks.

The write protocol around it (existence check, commit, refusal) is push.py's.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from lorafleet.storage.errors import StoreError
from lorafleet.storage.hashing import LocalFile, sha256_file
from lorafleet.storage.layout import VersionFolder
from lorafleet.storage.manifest import FileEntry
from lorafleet.storage.objects import StoreIO

# What one part's upload yields: the part for CompleteMultipartUpload, its blocks' sha256s, its whole sha256.
PartResult = tuple[dict[str, Any], list[str], str]


def upload_files(
    io: StoreIO,
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
    transfer = io.settings.transfer
    with (
        ThreadPoolExecutor(max_workers=transfer.max_concurrency, thread_name_prefix="lf-put") as pool,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="lf-hash") as hasher,
    ):
        uploads = [
            FileUpload(io, f, folder.bucket, folder.data_key(data_prefix, f.path), pool, hasher, stop) for f in files
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


class FileUpload:
    """One file's upload: a single PUT up to the multipart threshold, else a multipart upload whose parts are
    whole numbers of manifest blocks (so a part's bytes are hashed once for both its blocks and its checksum)."""

    def __init__(
        self,
        io: StoreIO,
        file: LocalFile,
        bucket: str,
        key: str,
        pool: ThreadPoolExecutor,
        hasher: ThreadPoolExecutor,
        stop: threading.Event,
    ) -> None:
        self.io = io
        self.file = file
        self.bucket = bucket
        self.key = key
        self.pool = pool
        self.hasher = hasher
        transfer = io.settings.transfer
        self.block = transfer.block_size
        if file.size <= transfer.multipart_threshold:
            self.part_size = max(file.size, 1)
        else:  # S3 parts are >= 5 MiB: the smallest multiple of the block size >= the chunk size
            self.part_size = self.block * max(1, -(-transfer.multipart_chunksize // self.block))
        self.upload_id: str | None = None
        self.parts: list[Future[PartResult]] = []
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
            done: Future[PartResult] = Future()
            try:
                done.set_result(self._send(0, 0, size))
            except Exception as e:
                done.set_exception(e)
            self.parts.append(done)
            return
        if n_parts > 1:
            self.file_hash = self.hasher.submit(sha256_file, self.file.abspath, self.failed)
            try:
                algorithm = {"ChecksumAlgorithm": "SHA256"} if self.io.settings.checksum_headers else {}
                resp = self.io.data_client.create_multipart_upload(
                    Bucket=self.bucket, Key=self.key, **algorithm, **self.io.sse()
                )
            except (ClientError, BotoCoreError) as e:
                raise self.io.err(e, self.bucket, self.key, "upload") from e
            self.upload_id = resp["UploadId"]
        for i in range(n_parts):
            self.parts.append(self.pool.submit(self._send, i, i * part, min(part, size - i * part)))

    def _send(self, i: int, offset: int, length: int) -> PartResult:
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
        sent = {"ChecksumSHA256": checksum} if self.io.settings.checksum_headers else {}
        client = self.io.data_client
        try:
            if self.upload_id is None:
                client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **sent, **self.io.sse())
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
            raise self.io.err(e, self.bucket, self.key, "upload") from e
        return part, [b.hex() for b in blocks], whole.hex()

    def finish(self) -> FileEntry:
        results = [fut.result() for fut in self.parts]
        blocks = [b for _, part_blocks, _ in results for b in part_blocks]
        if self.upload_id is None:
            sha = results[0][2]
        else:
            assert self.file_hash is not None
            try:
                self.io.data_client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=self.key,
                    UploadId=self.upload_id,
                    MultipartUpload={"Parts": [part for part, _, _ in results]},
                )
            except (ClientError, BotoCoreError) as e:
                raise self.io.err(e, self.bucket, self.key, "complete the upload of") from e
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
