"""The requests every part of the ArtifactStore shares: the two clients, error translation, retried small reads,
listing, batch deletes, and reading a version's manifest.

Push (push.py, upload.py), pull (download.py) and the catalog (catalog.py) each hold one StoreIO, the same one
for one ArtifactStore, so they share its connections and settings.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.utils import S3_RETRYABLE_DOWNLOAD_ERRORS

from lorafleet.storage.client import make_client, translate
from lorafleet.storage.errors import IncompleteVersion, ObjectNotFound, ObjectTooLarge, StoreError
from lorafleet.storage.layout import VersionFolder
from lorafleet.storage.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, parse_manifest
from lorafleet.storage.settings import StoreSettings


def backoff(attempt: int) -> None:
    """Sleep before retry number attempt: exponential, capped at 20 s, with jitter so writers spread out."""
    time.sleep(min(20.0, 0.5 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0))


class StoreIO:
    """One S3-compatible endpoint, as the parts of the ArtifactStore use it."""

    def __init__(self, settings: StoreSettings, client: Any | None = None) -> None:
        self.settings = settings
        self.client = client or make_client(settings)
        # File bodies go through a client that leaves their integrity to lorafleet's own sha256s (sent as
        # x-amz-checksum-sha256 on upload, checked against the manifest on download) instead of hashing every
        # byte again for the signature and for botocore's default checksums.
        self.data_client = client or make_client(settings, verified_bodies=True)

    def err(self, e: Exception, bucket: str, key: str | None, action: str) -> StoreError:
        return translate(e, self.settings, bucket, key, action)

    def sse(self) -> dict[str, str]:
        """Arguments of every object-creating request: the configured server-side encryption, if any."""
        return {"ServerSideEncryption": self.settings.sse} if self.settings.sse else {}

    def get_bytes(self, bucket: str, key: str, action: str = "read", limit: int | None = None) -> bytes:
        """The whole object; ObjectTooLarge past limit bytes (by its length, or by what it sends when it lies)."""
        for attempt in range(1, self.settings.max_attempts + 1):
            try:
                resp = self.client.get_object(Bucket=bucket, Key=key)
                if limit is None:
                    body: bytes = resp["Body"].read()
                    return body
                size = resp.get("ContentLength")
                body = b"" if size is not None and size > limit else resp["Body"].read(limit + 1)
                if len(body) > limit or (size is not None and size > limit):
                    resp["Body"].close()
                    raise ObjectTooLarge(
                        f"s3://{bucket}/{key} is {size or len(body)} bytes, over the {limit}-byte limit to {action}: "
                        "lorafleet never writes one that large; remove the object, or push the version again"
                    )
                return body
            except S3_RETRYABLE_DOWNLOAD_ERRORS as e:  # botocore does not retry a body cut mid-stream
                if attempt == self.settings.max_attempts:
                    raise self.err(e, bucket, key, action) from e
                backoff(attempt)
            except (ClientError, BotoCoreError) as e:
                raise self.err(e, bucket, key, action) from e
        raise AssertionError("unreachable")

    def list_pages(self, bucket: str, prefix: str, delimiter: str | None = None) -> Iterator[dict[str, Any]]:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        try:
            yield from self.client.get_paginator("list_objects_v2").paginate(**kwargs)
        except (ClientError, BotoCoreError) as e:
            raise self.err(e, bucket, prefix, "list") from e

    def keys(self, bucket: str, prefix: str) -> list[dict[str, Any]]:
        """Every object under prefix (listing entries: Key, LastModified, ...)."""
        return [obj for page in self.list_pages(bucket, prefix) for obj in page.get("Contents", [])]

    def keys_exist(self, bucket: str, prefix: str) -> bool:
        try:
            resp = self.client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        except (ClientError, BotoCoreError) as e:
            raise self.err(e, bucket, prefix, "list") from e
        return bool(resp.get("KeyCount") or resp.get("Contents"))

    def delete_keys(self, bucket: str, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            try:
                resp = self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            except (ClientError, BotoCoreError) as e:
                raise self.err(e, bucket, batch[0]["Key"], "delete") from e
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise StoreError(
                    f"could not delete {len(resp['Errors'])} objects in s3://{bucket}, first "
                    f"{first.get('Key')}: {first.get('Code')}: {first.get('Message')}"
                )

    def abort_multipart(self, bucket: str, prefix: str, older_than: datetime | None = None) -> int:
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
            raise self.err(e, bucket, prefix, "abort multipart uploads under") from e
        return aborted

    def read_manifest(self, folder: VersionFolder, *, explain: bool = True) -> tuple[Manifest, str, bytes]:
        """(manifest, digest, raw bytes). IncompleteVersion when files exist without a manifest (with explain;
        without, ObjectNotFound either way, and one request less)."""
        try:
            raw = self.get_bytes(folder.bucket, folder.manifest_key, "read the manifest", limit=MAX_MANIFEST_BYTES)
        except ObjectNotFound:
            if explain and self.keys_exist(folder.bucket, folder.location.key("") + "/"):
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

    def existing(self, folder: VersionFolder) -> tuple[Manifest, str] | None:
        """The committed version's manifest and digest, or None."""
        try:
            manifest, digest, _ = self.read_manifest(folder, explain=False)
        except ObjectNotFound:
            return None  # an incomplete version is not a version: a new writer may still claim it
        return manifest, digest
