"""Fixtures for tests against a real S3 server: MinIO built from source by lorafleet_dev.s3server. No mocks.

* ``s3_server`` (session): one MinIO on 127.0.0.1, a free port and a temporary directory, with random root
  credentials. A missing Go toolchain or a failed build FAILS the tests that need it (never skips them).
* ``s3_bucket``: a fresh bucket per test, emptied and removed afterwards.
* ``store_settings`` / ``artifact_store``: lorafleet.storage configured for that server.
* ``private_s3_server``: a server of the test's own, which the test may stop, kill and restart.

MinIO is built (first run only, minutes) right after collection, so that pytest-timeout does not cut the build.
Register with ``pytest_plugins = ["tests.s3_fixtures"]`` in tests/conftest.py.
"""

from __future__ import annotations

import base64
import contextlib
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from lorafleet.storage import ArtifactStore, StoreSettings
from lorafleet.storage.client import make_client
from lorafleet_dev.build import BuildError
from lorafleet_dev.s3server import S3Server, build

S3_FIXTURES = {"s3_server", "s3_bucket", "store_settings", "artifact_store", "private_s3_server"}
_build: dict[str, object] = {}


def pytest_collection_finish(session: pytest.Session) -> None:
    if not any(S3_FIXTURES & set(getattr(item, "fixturenames", ())) for item in session.items):
        return
    capture = session.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        try:
            _build["binary"] = build()
        except Exception as e:  # reported as a failure by the fixtures
            _build["error"] = e


def _binary() -> Path:
    if "error" in _build or "binary" not in _build:
        try:
            _build["binary"] = build()
        except (BuildError, OSError) as e:
            pytest.fail(
                f"could not build MinIO for the storage tests: {e}\n"
                "Run `hack/s3server build` to see why (it needs Go and the Go module proxy).",
                pytrace=False,
            )
    binary = _build["binary"]
    assert isinstance(binary, Path)
    return binary


def _start(data_dir: Path) -> S3Server:
    server = S3Server(data_dir=data_dir, binary=_binary())
    try:
        server.start()
    except Exception as e:
        pytest.fail(f"could not start MinIO: {e}", pytrace=False)
    return server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = _start(tmp_path_factory.mktemp("minio") / "data")
    yield server
    server.remove()


@pytest.fixture
def private_s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = _start(tmp_path_factory.mktemp("minio-private") / "data")
    yield server
    server.remove()


def _empty_and_remove(c: Any, bucket: str) -> None:
    for page in c.get_paginator("list_object_versions").paginate(Bucket=bucket):
        objs = [{"Key": o["Key"], "VersionId": o["VersionId"]} for o in page.get("Versions", [])]
        objs += [{"Key": o["Key"], "VersionId": o["VersionId"]} for o in page.get("DeleteMarkers", [])]
        if objs:
            c.delete_objects(Bucket=bucket, Delete={"Objects": objs, "Quiet": True})
    for page in c.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for up in page.get("Uploads", []):
            c.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
    c.delete_bucket(Bucket=bucket)


def make_bucket(server: S3Server, hint: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", hint.lower()).strip("-")[:40].strip("-")
    name = f"t-{slug}-{uuid.uuid4().hex[:8]}"
    server.create_bucket(name)
    return name


@pytest.fixture
def s3_bucket(s3_server: S3Server, request: pytest.FixtureRequest) -> Iterator[str]:
    name = make_bucket(s3_server, request.node.name)
    yield name
    if s3_server.ready():  # a test may have stopped the server; its data dir goes with it anyway
        _empty_and_remove(make_client(s3_server.store_settings()), name)


@pytest.fixture
def store_settings(s3_server: S3Server) -> StoreSettings:
    settings: StoreSettings = s3_server.store_settings()
    return settings


@pytest.fixture
def artifact_store(store_settings: StoreSettings) -> ArtifactStore:
    return ArtifactStore(store_settings)


def secret_keys(secret: Any) -> dict[str, str]:
    """A V1Secret's data, decoded (the keys a minted credentials Secret holds)."""
    return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


def session_client(server: S3Server, keys: dict[str, str]) -> Any:
    """A boto3 S3 client on `server` signing with the AWS_* keys of a minted credentials Secret."""
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        region_name="us-east-1",
        aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
        aws_session_token=keys["AWS_SESSION_TOKEN"],
    )


def refusal_codes(calls: Mapping[str, Callable[[], Any]]) -> dict[str, str]:
    """The S3 error code each call was refused with, by its description ("allowed" when it succeeded): a test of
    scoped keys asserts `refusal_codes(calls) == dict.fromkeys(calls, "AccessDenied")`."""
    codes = {}
    for what, call in calls.items():
        try:
            call()
        except ClientError as exc:
            codes[what] = str(exc.response.get("Error", {}).get("Code"))
        else:
            codes[what] = "allowed"
    return codes
