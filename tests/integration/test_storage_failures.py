"""Against a real MinIO: corruption is detected, an interrupted upload never becomes a version, concurrent writers
of one version never mix files (one wins, the other is told), and every failure names its cause and its fix."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from lorafleet.storage import (
    ArtifactStore,
    BadCredentials,
    BucketNotFound,
    ChecksumMismatch,
    IncompleteVersion,
    Location,
    ObjectNotFound,
    PushResult,
    StoreError,
    StoreSettings,
    StoreUnavailable,
    VersionExists,
    VersionFolder,
    version_folder,
)
from lorafleet.storage.settings import MiB
from lorafleet_dev.s3server import S3Server, free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".lorafleet" not in p.relative_to(root).parts
    }


def writer_files(tag: str, big: int = 12 * MiB) -> dict[str, bytes]:
    """Every file carries the writer's tag, so a mix of two writers' files is visible."""
    return {
        "adapter_config.json": json.dumps({"writer": tag}).encode(),
        "adapter_model.safetensors": tag.encode() * (big // len(tag)),
        "README.md": f"written by {tag}".encode(),
    }


def small_parts(settings: StoreSettings) -> StoreSettings:
    return settings.with_transfer(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, block_size=4 * MiB)


def objects_under(store: ArtifactStore, folder: VersionFolder) -> list[str]:
    resp = store.client.list_objects_v2(Bucket=folder.bucket, Prefix=folder.location.prefix + "/")
    return [o["Key"] for o in resp.get("Contents", [])]


def multipart_uploads_under(store: ArtifactStore, folder: VersionFolder) -> list[dict[str, Any]]:
    # Bucket-wide, then filtered: MinIO lists multipart uploads only for an exact key or without a prefix.
    uploads = store.client.list_multipart_uploads(Bucket=folder.bucket).get("Uploads", [])
    return [u for u in uploads if u["Key"].startswith(folder.location.prefix + "/")]


# -- corruption -----------------------------------------------------------------------------------------------


def test_corrupted_object_is_detected_by_pull_and_verify(
    s3_bucket: str, artifact_store: ArtifactStore, tmp_path: Path
) -> None:
    files = writer_files("good", big=2 * MiB)
    folder = version_folder(f"s3://{s3_bucket}", "adapter", "bot", "v1")
    pushed = artifact_store.push(write_tree(tmp_path / "src", files), folder, kind="adapter", name="bot", version="v1")

    # Behind the library's back: same size, one byte flipped, as bit rot or a bad disk would.
    key = folder.data_key(pushed.manifest.data_prefix, "adapter_model.safetensors")
    data = bytearray(files["adapter_model.safetensors"])
    data[MiB] ^= 0xFF
    artifact_store.client.put_object(Bucket=s3_bucket, Key=key, Body=bytes(data))

    with pytest.raises(
        ChecksumMismatch, match=r"adapter_model.safetensors \(s3://.*\) has sha256 [0-9a-f]{64}, the manifest says"
    ):
        artifact_store.pull(folder, tmp_path / "dst")
    assert not (tmp_path / "dst" / "adapter_model.safetensors").exists()  # a bad file is never put in place
    with pytest.raises(ChecksumMismatch, match=r"is corrupt: adapter_model.safetensors: sha256"):
        artifact_store.verify(folder)

    artifact_store.client.put_object(Bucket=s3_bucket, Key=key, Body=bytes(data[:-1]))  # truncated
    with pytest.raises(ChecksumMismatch, match=r"adapter_model.safetensors: 2097151 bytes, manifest says 2097152"):
        artifact_store.verify(folder)
    artifact_store.client.delete_object(Bucket=s3_bucket, Key=key)
    with pytest.raises(ChecksumMismatch, match=r"is missing adapter_model\.safetensors"):
        artifact_store.verify(folder)


# -- interrupted upload ---------------------------------------------------------------------------------------

PUSH_SLOWLY = """
import sys
import time
from pathlib import Path
from lorafleet.storage import ArtifactStore, StoreSettings, VersionFolder
from lorafleet.storage.settings import MiB

settings = StoreSettings.from_env().with_transfer(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
store = ArtifactStore(settings.with_transfer(max_concurrency=2))
# Slow enough to be killed mid-upload: every part waits a second before it is sent.
store.data_client.meta.events.register("before-send.s3.UploadPart", lambda **_: time.sleep(1))
folder = VersionFolder.parse(sys.argv[2])
# Probe first: killed mid-probe, a push also leaves its probe object under data/ (gc removes it as well), which
# made this test count two staged uploads now and then.
store.supports_conditional_writes(folder)
store.push(Path(sys.argv[1]), folder, kind="adapter", name="big", version="v1")
print("finished")
"""


def test_interrupted_upload_leaves_no_visible_version(
    s3_server: S3Server, s3_bucket: str, artifact_store: ArtifactStore, tmp_path: Path
) -> None:
    src = write_tree(tmp_path / "src", writer_files("killed", big=60 * MiB))
    folder = version_folder(f"s3://{s3_bucket}", "adapter", "big", "v1")
    env = {**os.environ, **s3_server.env(), "PYTHONPATH": str(REPO / "operator")}
    proc = subprocess.Popen([sys.executable, "-c", PUSH_SLOWLY, str(src), folder.uri], env=env)
    try:
        deadline = time.monotonic() + 60
        while not (objects_under(artifact_store, folder) and multipart_uploads_under(artifact_store, folder)):
            assert proc.poll() is None, "the push ended before it could be interrupted"
            assert time.monotonic() < deadline, "the push never started uploading"
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no cleanup runs, as when a pod is evicted or a node dies
        proc.wait()

    assert objects_under(artifact_store, folder), "staged files are there..."
    assert artifact_store.list_versions(Location(s3_bucket)) == []  # ...but no version is
    [incomplete] = artifact_store.list_versions(Location(s3_bucket), include_incomplete=True)
    assert not incomplete.complete and len(incomplete.uploads) == 1
    for attempt in (lambda: artifact_store.read_manifest(folder), lambda: artifact_store.pull(folder, tmp_path / "d")):
        with pytest.raises(IncompleteVersion, match=r"has files but no manifest.json: an upload was interrupted"):
            attempt()
    assert not (tmp_path / "d" / "adapter_model.safetensors").exists()

    assert artifact_store.gc(Location(s3_bucket), timedelta(hours=1)) == []  # too young: may still be running
    removed = artifact_store.gc(Location(s3_bucket), timedelta(0))
    assert removed == [f"{folder.uri}/data/{incomplete.uploads[0]}"]
    assert objects_under(artifact_store, folder) == []
    assert multipart_uploads_under(artifact_store, folder) == []

    # The version can be pushed properly afterwards.
    assert artifact_store.push(src, folder, kind="adapter", name="big", version="v1").created


def test_failed_upload_cleans_up_after_itself(s3_bucket: str, artifact_store: ArtifactStore, tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", writer_files("interrupted", big=MiB))
    folder = version_folder(f"s3://{s3_bucket}", "adapter", "bot", "v1")

    def interrupt(path: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        artifact_store.push(src, folder, kind="adapter", name="bot", version="v1", on_file=interrupt)
    assert objects_under(artifact_store, folder) == []
    assert artifact_store.list_versions(Location(s3_bucket), include_incomplete=True) == []


@pytest.mark.parametrize("operation", ["PutObject", "UploadPart"])
def test_server_refuses_bytes_that_do_not_match_their_sha256(
    s3_bucket: str, store_settings: StoreSettings, tmp_path: Path, operation: str
) -> None:
    """Each body goes out with its sha256 as x-amz-checksum-sha256 (signed; no payload hash besides it): a byte
    changed after hashing, as a faulty NIC or proxy would, is refused by the server and no version appears."""
    store = ArtifactStore(small_parts(store_settings))
    big = 12 * MiB if operation == "UploadPart" else MiB  # multipart above 5 MiB
    src = write_tree(tmp_path / "src", {"adapter_model.safetensors": os.urandom(big)})
    name = f"flipped-{operation.lower()}"
    folder = version_folder(f"s3://{s3_bucket}", "adapter", name, "v1")
    flipped: list[str] = []

    def flip_one_byte(request: Any, **_: Any) -> None:
        body = bytearray(request.body.getvalue())  # botocore sends bytes bodies as BytesIO
        if not flipped and len(body) > 1024:
            body[1000] ^= 0xFF
            request.body = io.BytesIO(bytes(body))
            flipped.append(request.url)

    assert store.data_client.meta.config.s3["payload_signing_enabled"] is False
    store.data_client.meta.events.register(f"before-send.s3.{operation}", flip_one_byte)
    with pytest.raises(StoreError, match=r"do not match the sha256 they were sent with"):
        store.push(src, folder, kind="adapter", name=name, version="v1")
    assert flipped, "the body was never sent"
    assert objects_under(store, folder) == []
    assert store.list_versions(Location(s3_bucket), include_incomplete=True) == []


# -- concurrent writers ---------------------------------------------------------------------------------------


def race(
    stores: list[ArtifactStore], srcs: list[Path], folder: VersionFolder, sync_commit: bool
) -> list[PushResult | Exception]:
    """Push srcs[i] with stores[i] at the same time; with sync_commit both writers have uploaded everything before
    either tries to commit, so the conditional PUT of the manifest alone decides."""
    start = threading.Barrier(len(stores))
    commit = threading.Barrier(len(stores))
    results: list[PushResult | Exception] = [StoreError("did not run")] * len(stores)
    if sync_commit:
        for store in stores:
            real: Callable[..., bool] = store._commit

            def synced(*args: Any, _real: Callable[..., bool] = real) -> bool:
                commit.wait(timeout=60)
                return _real(*args)

            store._commit = synced  # type: ignore[method-assign]

    def run(i: int) -> None:
        start.wait(timeout=60)
        try:
            results[i] = stores[i].push(
                srcs[i], folder, kind="adapter", name="race", version=folder.uri.rsplit("/", 1)[1]
            )
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


@pytest.mark.parametrize("sync_commit", [True, False], ids=["both-uploaded-then-commit", "free-running"])
def test_two_concurrent_writers_one_wins_no_files_mixed(
    s3_bucket: str, store_settings: StoreSettings, tmp_path: Path, sync_commit: bool
) -> None:
    trees = {tag: writer_files(tag) for tag in ("alice", "bob")}
    srcs = [write_tree(tmp_path / tag, files) for tag, files in trees.items()]
    for round_ in range(3):
        folder = version_folder(f"s3://{s3_bucket}", "adapter", "race", f"v{round_}")
        # Two writers = two clients, as two pods would have.
        stores = [ArtifactStore(small_parts(store_settings)) for _ in srcs]
        results = race(stores, srcs, folder, sync_commit)

        winners = [r for r in results if isinstance(r, PushResult)]
        losers = [r for r in results if not isinstance(r, PushResult)]
        assert len(winners) == 1 and winners[0].created, results
        assert len(losers) == 1 and isinstance(losers[0], VersionExists), results
        msg = str(losers[0])
        assert folder.uri in msg and "push under a new version" in msg
        if sync_commit:
            assert "committed by another writer while this one uploaded" in msg

        pulled = read_tree(stores[0].pull(folder, tmp_path / f"pull-{sync_commit}-{round_}").dest)
        assert pulled == read_tree(srcs[results.index(winners[0])]), "the version is not exactly the winner's files"
        # The loser removed what it staged: only the winner's upload remains.
        [info] = stores[0].list_versions(folder.location)
        assert info.uploads == [winners[0].manifest.data_prefix.split("/", 1)[1]]


def test_concurrent_identical_writers_both_succeed_once(
    s3_bucket: str, store_settings: StoreSettings, tmp_path: Path
) -> None:
    src = write_tree(tmp_path / "same", writer_files("same"))
    folder = version_folder(f"s3://{s3_bucket}", "adapter", "race", "v1")
    stores = [ArtifactStore(small_parts(store_settings)) for _ in range(2)]
    results = race(stores, [src, src], folder, sync_commit=True)
    assert all(isinstance(r, PushResult) for r in results), results
    assert sorted(r.created for r in results if isinstance(r, PushResult)) == [False, True]
    assert len({r.digest for r in results if isinstance(r, PushResult)}) == 1
    assert len(stores[0].list_versions(folder.location)[0].uploads) == 1


def test_fallback_without_conditional_writes_never_mixes_files(
    s3_bucket: str, store_settings: StoreSettings, tmp_path: Path
) -> None:
    """For servers that ignore If-None-Match: check, write, read back. The loser still learns it lost."""
    trees = {tag: writer_files(tag, big=MiB) for tag in ("carol", "dave")}
    srcs = [write_tree(tmp_path / tag, files) for tag, files in trees.items()]
    folder = version_folder(f"s3://{s3_bucket}", "adapter", "race", "v1")
    stores = [ArtifactStore(store_settings, conditional_writes=False) for _ in srcs]
    results = race(stores, srcs, folder, sync_commit=True)
    assert sorted(type(r).__name__ for r in results) == ["PushResult", "VersionExists"], results
    winner = next(i for i, r in enumerate(results) if isinstance(r, PushResult))
    assert read_tree(stores[0].pull(folder, tmp_path / "pulled").dest) == trees[list(trees)[winner]]
    assert len(stores[0].list_versions(folder.location)[0].uploads) == 1
    with pytest.raises(VersionExists, match="already exists"):  # a fresh store: race() synced the others' commits
        ArtifactStore(store_settings, conditional_writes=False).push(
            srcs[1 - winner], folder, kind="adapter", name="race", version="v1"
        )


def test_server_honours_conditional_writes(s3_bucket: str, artifact_store: ArtifactStore) -> None:
    assert artifact_store.supports_conditional_writes(version_folder(f"s3://{s3_bucket}", "adapter", "x", "v1"))
    assert artifact_store.list_versions(Location(s3_bucket), include_incomplete=True) == []  # probe removed


def test_gc_keeps_the_referenced_upload_and_removes_the_rest(
    s3_bucket: str, artifact_store: ArtifactStore, tmp_path: Path
) -> None:
    folder = version_folder(f"s3://{s3_bucket}", "adapter", "bot", "v1")
    pushed = artifact_store.push(
        write_tree(tmp_path / "a", writer_files("a", big=MiB)), folder, kind="adapter", name="bot", version="v1"
    )
    stray = folder.data_key("data/20200101T000000Z-0123456789ab", "adapter_model.safetensors")
    artifact_store.client.put_object(Bucket=s3_bucket, Key=stray, Body=b"left by a writer that lost")

    assert artifact_store.gc(Location(s3_bucket), timedelta(hours=1)) == []  # written just now
    assert artifact_store.gc(Location(s3_bucket), timedelta(0), dry_run=True) == [
        f"{folder.uri}/data/20200101T000000Z-0123456789ab"
    ]
    assert artifact_store.gc(folder.location, timedelta(0)) == [f"{folder.uri}/data/20200101T000000Z-0123456789ab"]
    assert artifact_store.verify(folder)[1] == pushed.digest

    assert artifact_store.delete_version(folder) > 0
    assert objects_under(artifact_store, folder) == []
    with pytest.raises(ObjectNotFound, match="no version at"):
        artifact_store.read_manifest(folder)


# -- errors that name their cause -----------------------------------------------------------------------------


def test_wrong_credentials(s3_bucket: str, store_settings: StoreSettings, tmp_path: Path) -> None:
    folder = version_folder(f"s3://{s3_bucket}", "adapter", "bot", "v1")
    src = write_tree(tmp_path / "a", writer_files("x", big=MiB))
    for bad in (
        replace(store_settings, secret_access_key="wrong-secret"),
        replace(store_settings, access_key_id="nobody"),
    ):
        store = ArtifactStore(replace(bad, max_attempts=2))
        with pytest.raises(
            BadCredentials, match=r"refused the credentials .*AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ):
            store.push(src, folder, kind="adapter", name="bot", version="v1")
        with pytest.raises(BadCredentials, match=s3_bucket):
            store.pull(folder, tmp_path / "d")
        with pytest.raises(BadCredentials):
            store.list_versions(Location(s3_bucket))


def test_missing_bucket_and_missing_version(artifact_store: ArtifactStore, s3_bucket: str, tmp_path: Path) -> None:
    src = write_tree(tmp_path / "a", writer_files("x", big=MiB))
    folder = version_folder("s3://no-such-bucket-lorafleet", "adapter", "bot", "v1")
    with pytest.raises(
        BucketNotFound, match=r"bucket 'no-such-bucket-lorafleet' does not exist at http://127.0.0.1:\d+.*create it"
    ):
        artifact_store.push(src, folder, kind="adapter", name="bot", version="v1")
    with pytest.raises(BucketNotFound):
        artifact_store.pull(folder, tmp_path / "d")
    with pytest.raises(BucketNotFound):
        artifact_store.list_versions(Location("no-such-bucket-lorafleet"))
    with pytest.raises(ObjectNotFound, match=r"no version at s3://.*/adapters/ghost/v1 \(no manifest.json\)"):
        artifact_store.pull(version_folder(f"s3://{s3_bucket}", "adapter", "ghost", "v1"), tmp_path / "d")


def test_unreachable_endpoint(store_settings: StoreSettings, tmp_path: Path) -> None:
    dead = replace(store_settings, endpoint=f"http://127.0.0.1:{free_port()}", max_attempts=2)
    with pytest.raises(StoreUnavailable, match=r"could not reach http://127.0.0.1:\d+ .* after 2 attempts"):
        ArtifactStore(dead).pull(version_folder("s3://b", "adapter", "bot", "v1"), tmp_path / "d")


# -- server stopped mid-download ------------------------------------------------------------------------------


def test_server_stopped_mid_download_fails_clearly_then_resumes(private_s3_server: S3Server, tmp_path: Path) -> None:
    server = private_s3_server
    server.create_bucket("models")
    settings = replace(small_parts(server.store_settings()), max_attempts=3).with_transfer(
        block_size=2 * MiB, max_concurrency=2
    )
    store = ArtifactStore(settings)
    files = {"config.json": b"{}", "model.safetensors": os.urandom(48 * MiB)}
    folder = version_folder("s3://models", "model", "org/model", "main")
    store.push(write_tree(tmp_path / "src", files), folder, kind="model", name="org/model", version="main")

    attempts = {"n": 0, "after_stop": 0}
    stopped = threading.Event()

    def count(**kwargs: Any) -> None:
        attempts["n"] += 1
        if stopped.is_set():
            attempts["after_stop"] += 1
        elif attempts["n"] == 6:  # a few chunks in: crash the server while bodies are streaming
            threading.Timer(0.01, lambda: (server.stop(kill=True), stopped.set())).start()

    store.data_client.meta.events.register("before-send.s3.GetObject", count)
    dest = tmp_path / "dst"
    with pytest.raises(StoreUnavailable, match=r"run the same pull again to resume") as failure:
        store.pull(folder, dest)
    assert "s3://models/models/org/model/main/data/" in str(failure.value)
    assert attempts["after_stop"] >= settings.max_attempts  # retried (by botocore and by the chunk loop)...
    assert not (dest / "model.safetensors").exists()  # ...and nothing unverified was put in place

    partial = dest / ".lorafleet" / "partial"
    journals = [json.loads(p.read_text()) for p in partial.glob("*.json")]
    assert any(j["done"] for j in journals), "no chunk was journaled before the crash"

    server.start()  # same port, same data
    resumed = store.pull(folder, dest)
    assert read_tree(dest) == files
    assert resumed.reused_bytes > 0 and resumed.downloaded_bytes < resumed.manifest.total_size
    assert not partial.exists()
