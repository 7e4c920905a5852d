"""What is in the store: walking version folders (complete or not), deleting a version, garbage-collecting
unreferenced uploads, and re-hashing a version's remote files against its manifest.

Reading one manifest (``show``) is StoreIO.read_manifest, which push and pull need too.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.utils import S3_RETRYABLE_DOWNLOAD_ERRORS

from lorafleet.storage.errors import ChecksumMismatch, ObjectNotFound
from lorafleet.storage.hashing import STREAM_BLOCK, FileHasher
from lorafleet.storage.layout import Location, VersionFolder, upload_time
from lorafleet.storage.manifest import DATA_DIR, MANIFEST_NAME, FileEntry, Manifest, check_digest
from lorafleet.storage.objects import StoreIO, backoff


@dataclass
class VersionInfo:
    folder: VersionFolder
    complete: bool
    manifest: Manifest | None = None
    digest: str | None = None
    uploads: list[str] = field(default_factory=list)  # upload ids under data/


# -- listing --------------------------------------------------------------------------------------------------


def walk(io: StoreIO, root: Location, max_depth: int = 6) -> Iterator[VersionInfo]:
    """Every version folder under root (complete or not): a folder with a manifest.json or a data/ folder."""
    prefix = root.key("") + "/" if root.prefix else ""
    yield from _walk(io, root.bucket, prefix, max_depth)


def _walk(io: StoreIO, bucket: str, prefix: str, depth: int) -> Iterator[VersionInfo]:
    children: list[str] = []
    has_manifest = False
    uploads: list[str] = []
    for page in io.list_pages(bucket, prefix, "/"):
        for obj in page.get("Contents", []):
            if obj["Key"] == prefix + MANIFEST_NAME:
                has_manifest = True
        for cp in page.get("CommonPrefixes", []):
            children.append(cp["Prefix"])
    if prefix + DATA_DIR + "/" in children:
        for page in io.list_pages(bucket, prefix + DATA_DIR + "/", "/"):
            uploads += [cp["Prefix"][len(prefix) + len(DATA_DIR) + 1 : -1] for cp in page.get("CommonPrefixes", [])]
    if has_manifest or uploads:
        folder = VersionFolder(Location(bucket, prefix.rstrip("/")))
        info = VersionInfo(folder, complete=has_manifest, uploads=sorted(uploads))
        if has_manifest:
            try:
                info.manifest, info.digest, _ = io.read_manifest(folder)
            except ObjectNotFound:  # deleted between list and read
                info.complete = False
        yield info
        return  # a version folder holds no other versions
    if depth > 0:
        for child in sorted(children):
            yield from _walk(io, bucket, child, depth - 1)


def list_versions(io: StoreIO, root: Location, *, include_incomplete: bool = False) -> list[VersionInfo]:
    return [v for v in walk(io, root) if v.complete or include_incomplete]


# -- deletion and gc ------------------------------------------------------------------------------------------


def delete_version(io: StoreIO, folder: VersionFolder) -> int:
    """Remove a version: manifest first (it stops being served at once), then its data. Returns objects removed."""
    try:
        io.client.delete_object(Bucket=folder.bucket, Key=folder.manifest_key)
    except (ClientError, BotoCoreError) as e:
        raise io.err(e, folder.bucket, folder.manifest_key, "delete") from e
    keys = [o["Key"] for o in io.keys(folder.bucket, folder.location.key("") + "/")]
    io.delete_keys(folder.bucket, keys)
    io.abort_multipart(folder.bucket, folder.location.key("") + "/")
    return len(keys) + 1


def gc(io: StoreIO, root: Location, older_than: timedelta, *, dry_run: bool = False) -> list[str]:
    """Remove uploads that no manifest references and that are older than older_than: interrupted pushes,
    losers of a race. Returns the data prefixes (s3:// URIs) removed (or that would be, with dry_run).

    Age is the newest of: the upload id's time, its newest object, its newest unfinished multipart upload;
    keep older_than above the longest push, or gc may remove an upload that is still running.
    """
    cutoff = datetime.now(UTC) - older_than
    removed: list[str] = []
    for info in walk(io, root):
        keep = info.manifest.data_prefix if info.manifest else None
        for upload_id in info.uploads:
            data_prefix = f"{DATA_DIR}/{upload_id}"
            if data_prefix == keep:
                continue
            prefix = info.folder.location.key(data_prefix) + "/"
            objects = io.keys(info.folder.bucket, prefix)
            times = [o["LastModified"] for o in objects]
            started = upload_time(upload_id)
            if started:
                times.append(started)
            if times and max(times) > cutoff:
                continue
            removed.append(f"{info.folder.uri}/{data_prefix}")
            if not dry_run:
                io.delete_keys(info.folder.bucket, [o["Key"] for o in objects])
                io.abort_multipart(info.folder.bucket, prefix)
        if not dry_run:
            # Parts of multipart uploads whose objects never appeared (killed mid-part) are not listed above.
            io.abort_multipart(info.folder.bucket, info.folder.data_root, older_than=cutoff)
    return removed


# -- verify ---------------------------------------------------------------------------------------------------


def verify(io: StoreIO, folder: VersionFolder, *, digest: str | None = None) -> tuple[Manifest, str]:
    """Re-hash every remote file against the manifest (no local copy). ChecksumMismatch lists all bad files."""
    manifest, actual, _ = io.read_manifest(folder)
    problems: list[str] = []
    if digest is not None and check_digest(digest) != actual:
        problems.append(f"manifest digest is {actual}, not {digest}")
    with ThreadPoolExecutor(max_workers=io.settings.transfer.max_concurrency) as pool:
        results = pool.map(lambda e: (e, _remote_hash(io, folder, manifest, e)), manifest.files)
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
    io: StoreIO, folder: VersionFolder, manifest: Manifest, entry: FileEntry
) -> tuple[int, str, list[str] | None]:
    """(size, sha256, block sha256s) of one stored file, read end to end."""
    key = folder.data_key(manifest.data_prefix, entry.path)
    for attempt in range(1, io.settings.max_attempts + 1):
        hasher = FileHasher(manifest.block_size if entry.blocks else None)
        try:
            body = io.data_client.get_object(Bucket=folder.bucket, Key=key)["Body"]
            for piece in body.iter_chunks(STREAM_BLOCK):
                hasher.update(piece)
            return (hasher.size, *hasher.result())
        except S3_RETRYABLE_DOWNLOAD_ERRORS as e:
            if attempt == io.settings.max_attempts:
                raise io.err(e, folder.bucket, key, "read") from e
            backoff(attempt)
        except (ClientError, BotoCoreError) as e:
            err = io.err(e, folder.bucket, key, "read")
            if isinstance(err, ObjectNotFound):
                raise ChecksumMismatch(f"{folder.uri} is missing {entry.path} (s3://{folder.bucket}/{key})") from e
            raise err from e
    raise AssertionError("unreachable")
