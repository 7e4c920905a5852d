"""Against a real MinIO: a manifest over MAX_MANIFEST_BYTES is refused before it is read whole or parsed, with an
error naming the object, its size and the limit; one at the cap is still read (and judged by its content)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.storage import ArtifactStore, ObjectTooLarge, StoreError, VersionFolder
from lorafleet.storage.client import make_client
from lorafleet.storage.manifest import MAX_MANIFEST_BYTES
from lorafleet_dev.s3server import S3Server


def _put_manifest(s3_server: S3Server, bucket: str, size: int) -> VersionFolder:
    folder = VersionFolder.parse(f"s3://{bucket}/adapters/huge/v1")
    body = b"{" + b" " * (size - 2) + b"}"  # valid JSON, not a manifest: only its size matters here
    make_client(s3_server.store_settings()).put_object(Bucket=bucket, Key=folder.manifest_key, Body=body)
    return folder


def test_a_manifest_over_the_cap_is_refused_naming_object_size_and_limit(
    s3_server: S3Server, s3_bucket: str, artifact_store: ArtifactStore, tmp_path: Path
) -> None:
    folder = _put_manifest(s3_server, s3_bucket, MAX_MANIFEST_BYTES + 1)
    with pytest.raises(ObjectTooLarge) as raised:
        artifact_store.read_manifest(folder)
    message = str(raised.value)
    assert f"s3://{s3_bucket}/{folder.manifest_key}" in message
    assert f"{MAX_MANIFEST_BYTES + 1} bytes" in message and f"{MAX_MANIFEST_BYTES}-byte limit" in message
    with pytest.raises(ObjectTooLarge):  # a pull reads it the same way, before any file
        artifact_store.pull(folder, tmp_path / "dest")


def test_a_manifest_at_the_cap_is_read_and_judged_by_its_content(
    s3_server: S3Server, s3_bucket: str, artifact_store: ArtifactStore
) -> None:
    folder = _put_manifest(s3_server, s3_bucket, MAX_MANIFEST_BYTES)
    with pytest.raises(StoreError, match="not a valid lorafleet manifest") as raised:
        artifact_store.read_manifest(folder)
    assert not isinstance(raised.value, ObjectTooLarge)
