"""The bytes of a pull: every block of every file fetched with parallel ranged GETs into journaled partial files,
each block hashed as it streams in, a file moved into place only once all its blocks verified.

An interrupted pull keeps its verified blocks; the same pull into the same folder re-checks and reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.utils import S3_RETRYABLE_DOWNLOAD_ERRORS

from lorafleet.storage.errors import ChecksumMismatch, ObjectNotFound, StoreError, StoreUnavailable
from lorafleet.storage.hashing import EMPTY_SHA256, STREAM_BLOCK, verify_local
from lorafleet.storage.layout import VersionFolder
from lorafleet.storage.manifest import MANIFEST_NAME, RESERVED_DIR, FileEntry, Manifest, block_count, check_digest
from lorafleet.storage.objects import StoreIO, backoff
from lorafleet.storage.settings import MiB

log = logging.getLogger("lorafleet.storage")


@dataclass(frozen=True)
class PullResult:
    folder: VersionFolder
    dest: Path
    manifest: Manifest
    digest: str
    downloaded_bytes: int
    reused_bytes: int  # already in place (verified) or resumed from a partial download


def pull(io: StoreIO, folder: VersionFolder, dest: Path, *, digest: str | None = None) -> PullResult:
    """Download a version into dest, verifying every file; resumes an interrupted pull into the same dest."""
    manifest, actual, raw = io.read_manifest(folder)
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
    downloaded, resumed = Downloader(io, folder, manifest, dest, partial_dir).run(todo)
    (work / MANIFEST_NAME).write_bytes(raw)
    (work / "digest").write_text(actual + "\n")
    shutil.rmtree(partial_dir, ignore_errors=True)
    return PullResult(folder, dest, manifest, actual, downloaded, reused + resumed)


class Downloader:
    """Parallel ranged GETs, one per manifest block, into journaled partial files; each block's sha256 is computed
    as it streams in, in its own thread, so verification overlaps the transfer.

    s3transfer's download cannot resume, and writes ranges out of order so a file-wide sha256 would need a second
    pass after the download; hence this small loop. Each request still gets botocore's retries; a body cut
    mid-stream is continued here from the last byte written.
    """

    def __init__(self, io: StoreIO, folder: VersionFolder, manifest: Manifest, dest: Path, partial_dir: Path) -> None:
        self.io = io
        self.folder = folder
        self.manifest = manifest
        self.dest = dest
        self.partial_dir = partial_dir
        self.block = manifest.block_size
        self.failed = threading.Event()

    def run(self, entries: list[FileEntry]) -> tuple[int, int]:
        if not entries:
            return 0, 0
        jobs = [FileJob(self, entry) for entry in entries]
        pool = ThreadPoolExecutor(max_workers=self.io.settings.transfer.max_concurrency, thread_name_prefix="lf-get")
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


class FileJob:
    """One file of a pull: its blocks' fetches or re-checks, its partial file and the journal of verified blocks."""

    def __init__(self, dl: Downloader, entry: FileEntry) -> None:
        self.dl = dl
        self.entry = entry
        self.key = dl.folder.data_key(dl.manifest.data_prefix, entry.path)
        self.where = f"{entry.path} (s3://{dl.folder.bucket}/{self.key})"
        # Named by path, not content: two files with the same bytes are two partial files (a resumed pull into the
        # same dest finds its own again; the journal checks sha256, size and block size).
        stem = hashlib.sha256(entry.path.encode()).hexdigest()
        self.part = dl.partial_dir / stem
        self.journal = dl.partial_dir / f"{stem}.json"
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
        settings = self.dl.io.settings
        bucket = self.dl.folder.bucket
        for verify_attempt in range(1, verify_attempts + 1):
            h = hashlib.sha256()
            pos = start
            attempt = 0
            while pos < end:
                if self.dl.failed.is_set():
                    raise StoreError("cancelled")
                try:
                    resp = self.dl.io.data_client.get_object(
                        Bucket=bucket, Key=self.key, Range=f"bytes={pos}-{end - 1}"
                    )
                    for piece in resp["Body"].iter_chunks(STREAM_BLOCK):
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
                    backoff(attempt)
                except (ClientError, BotoCoreError) as e:
                    err = self.dl.io.err(e, bucket, self.key, "download")
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
        if self.n == 0 and self.entry.sha256 != EMPTY_SHA256:
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
