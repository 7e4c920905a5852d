"""Against a real MinIO: credentials minted with STS AssumeRole and lorafleet's session policy reach one
namespace's root read-write (a whole push, multipart upload, pull and delete of an adapter version) and the
read-only inputs they name, and MinIO itself refuses them (AccessDenied) anywhere else: another namespace's root,
writing a shared base model, listing the bucket. They expire when asked; minted values never appear in an error."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from lorafleet.storage import ArtifactStore, StoreSettings, version_folder
from lorafleet.storage.errors import AccessDenied, BadCredentials
from lorafleet.storage.scrub import scrub
from lorafleet.storage.settings import MiB
from lorafleet.storage.sts import MintedCredentials, mint
from lorafleet.storage.sts_policy import Grant

pytestmark = pytest.mark.integration

DURATION = 900


def _client(settings: StoreSettings, creds: MintedCredentials) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint,
        region_name=settings.region,
        aws_access_key_id=creds.access_key_id,
        aws_secret_access_key=creds.secret_access_key,
        aws_session_token=creds.session_token,
    )


def _code(call: Any) -> str:
    with pytest.raises(ClientError) as info:
        call()
    return str(info.value.response["Error"]["Code"])


@pytest.fixture
def minted(s3_bucket: str, store_settings: StoreSettings) -> MintedCredentials:
    root = boto3.client(
        "s3",
        endpoint_url=store_settings.endpoint,
        region_name=store_settings.region,
        aws_access_key_id=store_settings.access_key_id,
        aws_secret_access_key=store_settings.secret_access_key,
    )
    root.put_object(Bucket=s3_bucket, Key="lorafleet/team-b/adapters/x/v1/manifest.json", Body=b"{}")
    root.put_object(Bucket=s3_bucket, Key="models/llama/main/config.json", Body=b"{}")
    grant = Grant(
        read_write=(f"s3://{s3_bucket}/lorafleet/team-a",), read_only=(f"s3://{s3_bucket}/models/llama/main",)
    )
    return mint(store_settings, grant, duration_seconds=DURATION, namespace="team-a", name="job-1")


def test_minted_keys_reach_their_root_and_nothing_else(
    minted: MintedCredentials, s3_bucket: str, store_settings: StoreSettings
) -> None:
    remaining = (minted.expiration - datetime.now(UTC)).total_seconds()
    assert DURATION - 120 < remaining <= DURATION + 5
    assert minted.access_key_id != store_settings.access_key_id

    tenant = _client(store_settings, minted)
    own = "lorafleet/team-a/adapters/bot/v1/x.bin"
    tenant.put_object(Bucket=s3_bucket, Key=own, Body=b"mine")
    assert tenant.get_object(Bucket=s3_bucket, Key=own)["Body"].read() == b"mine"
    assert tenant.list_objects_v2(Bucket=s3_bucket, Prefix="lorafleet/team-a/")["KeyCount"] == 1
    assert tenant.get_object(Bucket=s3_bucket, Key="models/llama/main/config.json")["Body"].read() == b"{}"
    tenant.delete_object(Bucket=s3_bucket, Key=own)

    other = "lorafleet/team-b/adapters/x/v1/manifest.json"
    refused = {
        "read B's adapter": lambda: tenant.get_object(Bucket=s3_bucket, Key=other),
        "overwrite B's adapter": lambda: tenant.put_object(Bucket=s3_bucket, Key=other, Body=b"x"),
        "delete B's adapter": lambda: tenant.delete_object(Bucket=s3_bucket, Key=other),
        "list B's root": lambda: tenant.list_objects_v2(Bucket=s3_bucket, Prefix="lorafleet/team-b/"),
        "list the bucket": lambda: tenant.list_objects_v2(Bucket=s3_bucket),
        "a sibling prefix": lambda: tenant.put_object(Bucket=s3_bucket, Key="lorafleet/team-ab/x", Body=b"x"),
        "write the base model": lambda: tenant.put_object(
            Bucket=s3_bucket, Key="models/llama/main/config.json", Body=b"x"
        ),
        "another bucket": lambda: tenant.list_objects_v2(Bucket=s3_bucket + "-other"),
    }
    codes = {what: _code(call) for what, call in refused.items()}
    assert codes == {what: "AccessDenied" for what in refused}


def test_lorafleet_push_pull_delete_with_minted_keys(
    minted: MintedCredentials, s3_bucket: str, store_settings: StoreSettings, tmp_path: Path
) -> None:
    settings = StoreSettings(
        endpoint=store_settings.endpoint,
        region=store_settings.region,
        access_key_id=minted.access_key_id,
        secret_access_key=minted.secret_access_key,
        session_token=minted.session_token,
    ).with_transfer(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, block_size=MiB)
    store = ArtifactStore(settings)
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_model.safetensors").write_bytes(os.urandom(11 * MiB))  # multipart
    (src / "adapter_config.json").write_text("{}")
    folder = version_folder(f"s3://{s3_bucket}/lorafleet/team-a", "adapter", "bot", "v1")
    pushed = store.push(src, folder, kind="adapter", name="bot", version="v1")
    store.pull(folder, tmp_path / "dst", digest=pushed.digest)
    assert (tmp_path / "dst" / "adapter_model.safetensors").read_bytes() == (
        src / "adapter_model.safetensors"
    ).read_bytes()
    assert store.delete_version(folder) > 0

    elsewhere = version_folder(f"s3://{s3_bucket}/lorafleet/team-b", "adapter", "bot", "v1")
    with pytest.raises(AccessDenied) as info:
        store.push(src, elsewhere, kind="adapter", name="bot", version="v1")
    for value in (minted.secret_access_key, minted.session_token):
        assert value not in str(info.value)
        assert scrub(f"leaked {value} here") == "leaked [REDACTED] here"


def test_minting_with_wrong_platform_keys_is_a_scrubbed_error(s3_bucket: str, store_settings: StoreSettings) -> None:
    wrong = StoreSettings(
        endpoint=store_settings.endpoint,
        region=store_settings.region,
        access_key_id=store_settings.access_key_id,
        secret_access_key="not-the-key\nwith-a-newline",
    )
    with pytest.raises(BadCredentials) as info:
        mint(
            wrong,
            Grant(read_write=(f"s3://{s3_bucket}/lorafleet/team-a",)),
            duration_seconds=DURATION,
            namespace="team-a",
            name="job-1",
        )
    message = str(info.value)
    assert "AssumeRole" in message
    assert "not-the-key" not in message and "with-a-newline" not in message
