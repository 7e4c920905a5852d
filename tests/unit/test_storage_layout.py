"""Keys and URIs of the artifact layout, settings from the environment, CLI argument parsing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lorafleet.api.common import ObjectStore, S3CredentialsRef
from lorafleet.storage.cli import parse_duration
from lorafleet.storage.errors import StoreError
from lorafleet.storage.layout import Location, VersionFolder, infer_layout, new_upload_id, upload_time, version_folder
from lorafleet.storage.settings import StoreSettings
from lorafleet_dev.s3server import replace_directives


def test_version_folder_keys() -> None:
    f = version_folder("s3://lorafleet/team-a", "adapter", "support-bot", "v1")
    assert f.uri == "s3://lorafleet/team-a/adapters/support-bot/v1"
    assert f.manifest_key == "team-a/adapters/support-bot/v1/manifest.json"
    assert f.data_root == "team-a/adapters/support-bot/v1/data/"
    assert f.data_key("data/u1", "sub/w.bin") == "team-a/adapters/support-bot/v1/data/u1/sub/w.bin"
    assert version_folder("s3://models", "model", "meta-llama/Llama-3.1-8B", "main").uri == (
        "s3://models/models/meta-llama/Llama-3.1-8B/main"
    )
    assert version_folder(Location("b"), "adapter", "a", "v1").manifest_key == "adapters/a/v1/manifest.json"


@pytest.mark.parametrize("name,version", [("a/b", "v1"), ("a", "v/1"), ("a b", "v1"), ("a", ""), ("-a", "v1")])
def test_bad_names_are_refused(name: str, version: str) -> None:
    with pytest.raises(ValueError):
        version_folder("s3://b", "adapter", name, version)


def test_uri_parsing_reuses_lorafleet_uris() -> None:
    assert Location.parse("s3://bucket/a/b/") == Location("bucket", "a/b")
    assert Location.parse("s3://bucket") == Location("bucket", "")
    assert VersionFolder.parse("s3://bucket/x/adapters/n/v1/").manifest_key == "x/adapters/n/v1/manifest.json"
    for bad in ("pvc://claim/x", "http://x/y", "s3://"):
        with pytest.raises(ValueError):
            Location.parse(bad)
    with pytest.raises(ValueError, match="bucket, not a version"):
        VersionFolder.parse("s3://bucket")


def test_infer_layout() -> None:
    info = infer_layout(VersionFolder.parse("s3://b/p/q/adapters/support-bot/v2"))
    assert info is not None
    assert (info.root, info.kind, info.name, info.version) == (Location("b", "p/q"), "adapter", "support-bot", "v2")
    info = infer_layout(VersionFolder.parse("s3://b/models/meta-llama/Llama-3.1-8B/main"))
    assert info is not None and (info.kind, info.name, info.version) == ("model", "meta-llama/Llama-3.1-8B", "main")
    assert infer_layout(VersionFolder.parse("s3://models/meta-llama/Llama-3.1-8B-Instruct/main")) is None


def test_upload_ids_sort_by_time_and_carry_it() -> None:
    t = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
    a, b = new_upload_id(t), new_upload_id(t + timedelta(seconds=1))
    assert a < b and a != new_upload_id(t)
    assert upload_time(a) == t
    assert upload_time("not-an-id") is None


def test_settings_from_env() -> None:
    s = StoreSettings.from_env(
        {
            "LORAFLEET_STORE_ENDPOINT": "https://minio.storage.svc:9000",
            "LORAFLEET_STORE_REGION": "eu-1",
            "LORAFLEET_STORE_SSE": "AES256",
            "AWS_ACCESS_KEY_ID": "k",
            "AWS_SECRET_ACCESS_KEY": "s",
        }
    )
    assert (s.endpoint, s.region, s.sse, s.access_key_id, s.secret_access_key) == (
        "https://minio.storage.svc:9000",
        "eu-1",
        "AES256",
        "k",
        "s",
    )
    assert s.verify is True and not s.insecure_skip_tls_verify
    assert "topsecret" not in repr(StoreSettings(secret_access_key="topsecret"))  # never in logs
    assert StoreSettings.from_env({"LORAFLEET_STORE_INSECURE_SKIP_TLS_VERIFY": "true"}).verify is False
    assert StoreSettings.from_env({}).endpoint is None


def test_settings_refuse_ambiguous_values(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not a boolean"):
        StoreSettings.from_env({"LORAFLEET_STORE_INSECURE_SKIP_TLS_VERIFY": "ture"})
    with pytest.raises(StoreError, match="SSE"):
        StoreSettings.from_env({"LORAFLEET_STORE_SSE": "aes"})
    with pytest.raises(StoreError, match="CA bundle"):
        _ = StoreSettings.from_env({"AWS_CA_BUNDLE": str(tmp_path / "missing.pem")}).verify
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert StoreSettings.from_env({"AWS_CA_BUNDLE": str(ca)}).verify == str(ca)
    # Verification off wins only when asked for explicitly.
    assert (
        StoreSettings.from_env({"AWS_CA_BUNDLE": str(ca), "LORAFLEET_STORE_INSECURE_SKIP_TLS_VERIFY": "1"}).verify
        is False
    )


def test_credentials_from_a_mounted_secret(tmp_path: Path) -> None:
    (tmp_path / "AWS_ACCESS_KEY_ID").write_text("key\n")
    (tmp_path / "AWS_SECRET_ACCESS_KEY").write_text("secret\n")
    s = StoreSettings.from_env({"LORAFLEET_STORE_CREDENTIALS_DIR": str(tmp_path)})
    assert (s.access_key_id, s.secret_access_key) == ("key", "secret")
    with pytest.raises(StoreError, match="mount a Secret"):
        StoreSettings.from_env({"LORAFLEET_STORE_CREDENTIALS_DIR": str(tmp_path / "nope")})


def test_settings_from_object_store_spec() -> None:
    spec = ObjectStore(
        endpoint="https://minio:9000/",
        region="r1",
        credentials_secret_ref=S3CredentialsRef(name="creds"),
        insecure_skip_tls_verify=True,
        server_side_encryption="aws:kms",
    )
    s = StoreSettings.from_object_store(spec, "k", "s")
    assert (s.endpoint, s.region, s.sse, s.verify, s.access_key_id) == (
        "https://minio:9000",
        "r1",
        "aws:kms",
        False,
        "k",
    )


def test_durations() -> None:
    assert parse_duration("90s") == timedelta(seconds=90)
    assert parse_duration("0") == timedelta(0)
    assert parse_duration("24h") == timedelta(hours=24)
    assert parse_duration("7d") == timedelta(days=7)
    with pytest.raises(Exception, match="duration"):
        parse_duration("1w")


def test_replace_directives_of_a_go_mod() -> None:
    gomod = """module github.com/minio/minio

go 1.24

require (
\tgithub.com/a/b v1.0.0
)

replace github.com/x/y => github.com/x/y v1.2.3

replace (
\tgithub.com/p/q v0.1.0 => github.com/p/q v0.1.1
\t// a comment
\tgithub.com/l/m => ./local
)
"""
    assert sorted(replace_directives(gomod)) == [
        "github.com/l/m => ./local",
        "github.com/p/q v0.1.0 => github.com/p/q v0.1.1",
        "github.com/x/y => github.com/x/y v1.2.3",
    ]
    assert replace_directives("module x\n\nrequire y v1\n") == []


def test_checksum_headers_default_on_and_typos_refused() -> None:
    assert StoreSettings.from_env({}).checksum_headers is True
    assert StoreSettings.from_env({"LORAFLEET_STORE_CHECKSUM_HEADERS": "false"}).checksum_headers is False
    with pytest.raises(StoreError, match="LORAFLEET_STORE_CHECKSUM_HEADERS='flase' is not a boolean"):
        StoreSettings.from_env({"LORAFLEET_STORE_CHECKSUM_HEADERS": "flase"})
