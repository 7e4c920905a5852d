"""Against a real MinIO: what is pushed is what is pulled, byte for byte, with its lineage; versions are immutable
(an identical re-push is a no-op, a different one is refused); pins are enforced; the CLI does the same."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lorafleet.storage import (
    ArtifactStore,
    BaseModelRef,
    ChecksumMismatch,
    DatasetRef,
    Location,
    StoreSettings,
    VersionExists,
    VersionFolder,
    version_folder,
)
from lorafleet.storage.cli import main as cli
from lorafleet.storage.settings import MiB
from lorafleet_dev.s3server import S3Server

pytestmark = pytest.mark.integration


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".lorafleet" not in p.relative_to(root).parts
    }


def adapter_files(seed: int = 0, big: int = 3 * MiB) -> dict[str, bytes]:
    rng = bytes(range(256)) * (big // 256)
    return {
        "adapter_config.json": json.dumps({"r": 16, "seed": seed}).encode(),
        "adapter_model.safetensors": bytes([seed % 256]) + os.urandom(64) + rng,
        "tokenizer/tokenizer.json": b'{"v": 1}',
        "empty.txt": b"",
    }


def lineage() -> dict[str, Any]:
    return {
        "base_model": BaseModelRef(name="llama-3-8b", uri="s3://models/llama/main", digest="sha256:" + "c" * 64),
        "dataset": DatasetRef(uri="s3://datasets/support.jsonl", sha256="d" * 64),
        "hyperparameters": {"r": 16, "alpha": 32, "epochs": 3},
        "metrics": {"train_loss": 1.25},
        "trainer_image": "registry.local/lorafleet-trainer:0.1.0",
    }


def test_round_trip_with_lineage_multipart_and_ranged_chunks(
    s3_bucket: str, store_settings: StoreSettings, tmp_path: Path
) -> None:
    # Small part and chunk sizes so that a 23 MiB file goes multipart and is pulled in many ranged GETs.
    store = ArtifactStore(
        store_settings.with_transfer(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, block_size=MiB)
    )
    files = adapter_files(big=23 * MiB)
    src = write_tree(tmp_path / "src", files)
    folder = version_folder(f"s3://{s3_bucket}/team-a", "adapter", "support-bot", "v1")

    pushed = store.push(src, folder, kind="adapter", name="support-bot", version="v1", **lineage())
    assert pushed.created
    assert pushed.manifest.total_size == sum(len(b) for b in files.values())

    manifest, digest, raw = store.read_manifest(folder)
    assert digest == pushed.digest == manifest.digest
    assert raw == manifest.canonical_bytes()
    assert manifest.base_model and manifest.base_model.name == "llama-3-8b"
    assert manifest.dataset and manifest.dataset.sha256 == "d" * 64
    assert manifest.hyperparameters["r"] == 16 and manifest.metrics == {"train_loss": 1.25}
    assert [f.path for f in manifest.files] == sorted(files)

    pulled = store.pull(folder, tmp_path / "dst", digest=digest)
    assert read_tree(tmp_path / "dst") == files
    assert pulled.downloaded_bytes == manifest.total_size
    assert (tmp_path / "dst" / ".lorafleet" / "manifest.json").read_bytes() == raw
    assert not (tmp_path / "dst" / ".lorafleet" / "partial").exists()

    # Pulling again into the same folder downloads nothing: every file is already there and verified.
    again = store.pull(folder, tmp_path / "dst", digest=digest)
    assert (again.downloaded_bytes, again.reused_bytes) == (0, manifest.total_size)
    assert store.verify(folder, digest=digest)[1] == digest
    assert [v.folder for v in store.list_versions(Location(s3_bucket))] == [folder]


def test_identical_push_is_a_no_op_and_different_content_is_refused(
    s3_bucket: str, artifact_store: ArtifactStore, tmp_path: Path
) -> None:
    folder = version_folder(f"s3://{s3_bucket}", "adapter", "bot", "v1")
    src = write_tree(tmp_path / "a", adapter_files(1))
    first = artifact_store.push(src, folder, kind="adapter", name="bot", version="v1", **lineage())

    again = artifact_store.push(src, folder, kind="adapter", name="bot", version="v1", **lineage())
    assert not again.created and again.digest == first.digest
    assert [v.uploads for v in artifact_store.list_versions(Location(s3_bucket))] == [[first.manifest.data_prefix[5:]]]

    other = write_tree(tmp_path / "b", adapter_files(2))
    with pytest.raises(VersionExists, match=r"s3://.*/adapters/bot/v1 already exists .*adapter_model.safetensors"):
        artifact_store.push(other, folder, kind="adapter", name="bot", version="v1", **lineage())
    with pytest.raises(VersionExists, match="lineage differs: metrics"):
        artifact_store.push(src, folder, kind="adapter", name="bot", version="v1", **{**lineage(), "metrics": {}})
    assert artifact_store.read_manifest(folder)[1] == first.digest  # nothing was overwritten


def test_a_one_part_push_leaves_an_existing_version_to_the_conditional_commit(
    s3_bucket: str, store_settings: StoreSettings, tmp_path: Path
) -> None:
    """A push of at most one part's worth of data does not read manifest.json first once the bucket's
    conditional-write support is known: it uploads, and the conditional commit alone makes an identical re-push a
    no-op and refuses other content; the staged upload is removed and nothing is overwritten."""
    store = ArtifactStore(store_settings)
    folder = version_folder(f"s3://{s3_bucket}", "adapter", "small", "v1")
    src = write_tree(tmp_path / "a", {"adapter_model.safetensors": os.urandom(MiB)})
    first = store.push(src, folder, kind="adapter", name="small", version="v1")
    calls: list[str] = []
    for client in (store.client, store.data_client):
        client.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))

    again = store.push(src, folder, kind="adapter", name="small", version="v1")
    assert not again.created and again.digest == first.digest
    assert calls[:3] == ["PutObject", "PutObject", "GetObject"], calls  # data, refused commit, the winner's manifest
    assert [v.uploads for v in store.list_versions(Location(s3_bucket))] == [[first.manifest.data_prefix[5:]]]

    other = write_tree(tmp_path / "b", {"adapter_model.safetensors": os.urandom(MiB)})
    with pytest.raises(VersionExists, match=r"adapters/small/v1 already exists .*adapter_model.safetensors"):
        store.push(other, folder, kind="adapter", name="small", version="v1")
    assert [v.uploads for v in store.list_versions(Location(s3_bucket))] == [[first.manifest.data_prefix[5:]]]
    assert store.read_manifest(folder)[1] == first.digest


def test_push_of_an_existing_big_version_stops_its_upload_and_leaves_nothing(
    s3_bucket: str, store_settings: StoreSettings, tmp_path: Path
) -> None:
    """The existence check runs beside the upload: finding the version stops the upload after a few parts,
    removes them, and the local hashes decide (no-op or VersionExists)."""
    store = ArtifactStore(
        store_settings.with_transfer(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=2)
    )
    folder = version_folder(f"s3://{s3_bucket}", "model", "big", "r1")
    files = {"model.safetensors": os.urandom(80 * MiB), "config.json": b"{}"}
    src = write_tree(tmp_path / "a", files)
    first = store.push(src, folder, kind="model", name="big", version="r1")
    parts: list[str] = []
    store.data_client.meta.events.register("before-send.s3.UploadPart", lambda request, **_: parts.append(request.url))

    again = store.push(src, folder, kind="model", name="big", version="r1")
    assert not again.created and again.digest == first.digest
    assert len(parts) < 16, f"{len(parts)} of 16 parts were sent for a version that already existed"
    assert [v.uploads for v in store.list_versions(Location(s3_bucket))] == [[first.manifest.data_prefix[5:]]]
    assert store.client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []

    files["model.safetensors"] = os.urandom(80 * MiB)
    other = write_tree(tmp_path / "b", files)
    with pytest.raises(VersionExists, match=r"models/big/r1 already exists .*model.safetensors"):
        store.push(other, folder, kind="model", name="big", version="r1")
    assert [v.uploads for v in store.list_versions(Location(s3_bucket))] == [[first.manifest.data_prefix[5:]]]
    assert store.read_manifest(folder)[1] == first.digest


def test_round_trip_without_checksum_headers(s3_bucket: str, store_settings: StoreSettings, tmp_path: Path) -> None:
    """LORAFLEET_STORE_CHECKSUM_HEADERS=false (stores without S3 checksums): no x-amz-checksum-* header is sent,
    botocore signs the payload hash instead, and the manifest and pull verification are the same."""
    store = ArtifactStore(
        replace(store_settings, checksum_headers=False).with_transfer(
            multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, block_size=MiB
        )
    )
    headers: list[dict[str, Any]] = []
    for op in ("PutObject", "UploadPart", "CreateMultipartUpload"):
        store.data_client.meta.events.register(
            f"before-send.s3.{op}", lambda request, **_: headers.append(dict(request.headers))
        )
    files = adapter_files(big=12 * MiB)
    src = write_tree(tmp_path / "src", files)
    folder = version_folder(f"s3://{s3_bucket}", "adapter", "plain", "v1")
    pushed = store.push(src, folder, kind="adapter", name="plain", version="v1")
    assert len(headers) >= 4  # one multipart file (create + 3 parts) and the small files
    assert not [h for h in headers if any(k.lower().startswith("x-amz-checksum") for k in h)]
    assert {h["X-Amz-Content-SHA256"] for h in headers if "X-Amz-Content-SHA256" in h} - {b"UNSIGNED-PAYLOAD"}
    store.pull(folder, tmp_path / "dst", digest=pushed.digest)
    assert read_tree(tmp_path / "dst") == files


def test_pinned_digest_is_enforced(s3_bucket: str, artifact_store: ArtifactStore, tmp_path: Path) -> None:
    folder = version_folder(f"s3://{s3_bucket}", "adapter", "bot", "v1")
    artifact_store.push(write_tree(tmp_path / "a", adapter_files()), folder, kind="adapter", name="bot", version="v1")
    wrong = "sha256:" + "0" * 64
    with pytest.raises(ChecksumMismatch, match=f"not the pinned {wrong}"):
        artifact_store.pull(folder, tmp_path / "dst", digest=wrong)
    assert not (tmp_path / "dst").exists()


def test_models_use_the_same_code_inside_and_outside_the_layout(
    s3_bucket: str, artifact_store: ArtifactStore, tmp_path: Path
) -> None:
    files = {
        "config.json": b"{}",
        "model-00001-of-00002.safetensors": os.urandom(MiB),
        "model-00002-of-00002.safetensors": b"x",
    }
    src = write_tree(tmp_path / "m", files)
    inside = version_folder(f"s3://{s3_bucket}", "model", "meta-llama/Llama-3.1-8B", "main")
    artifact_store.push(src, inside, kind="model", name="meta-llama/Llama-3.1-8B", version="main")
    outside = Location(s3_bucket, "meta-llama/Llama-3.1-8B-Instruct/main")
    artifact_store.push(src, VersionFolder(outside), kind="model", name="Llama-3.1-8B-Instruct", version="main")
    for i, folder in enumerate((inside, VersionFolder(outside))):
        artifact_store.pull(folder, tmp_path / f"dst{i}")
        assert read_tree(tmp_path / f"dst{i}") == files
    assert {v.folder.uri for v in artifact_store.list_versions(Location(s3_bucket))} == {inside.uri, outside.uri}


def test_server_side_encryption(s3_bucket: str, store_settings: StoreSettings, tmp_path: Path) -> None:
    store = ArtifactStore(replace(store_settings, sse="AES256"))
    folder = version_folder(f"s3://{s3_bucket}", "adapter", "secret", "v1")
    pushed = store.push(
        write_tree(tmp_path / "a", adapter_files()), folder, kind="adapter", name="secret", version="v1"
    )
    key = folder.data_key(pushed.manifest.data_prefix, "adapter_model.safetensors")
    assert store.client.head_object(Bucket=s3_bucket, Key=key)["ServerSideEncryption"] == "AES256"
    assert store.client.head_object(Bucket=s3_bucket, Key=folder.manifest_key)["ServerSideEncryption"] == "AES256"
    store.pull(folder, tmp_path / "dst")
    assert read_tree(tmp_path / "dst") == read_tree(tmp_path / "a")


def test_cli(
    s3_server: S3Server,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    src = write_tree(tmp_path / "src", adapter_files())
    (tmp_path / "hp.json").write_text('{"r": 16}')
    uri = f"s3://{s3_bucket}/t/adapters/cli-bot/v3"

    assert (
        cli(
            [
                "artifacts",
                "push",
                str(src),
                uri,
                "--base-model",
                "llama",
                "--hyperparameters",
                f"@{tmp_path / 'hp.json'}",
                "--json",
            ]
        )
        == 0
    )
    pushed = json.loads(capsys.readouterr().out)
    assert pushed["created"] and pushed["uri"] == uri

    # The exact form the operator's init containers run.
    assert cli(["artifacts", "pull", uri, str(tmp_path / "dst"), "--digest", pushed["digest"]]) == 0
    assert read_tree(tmp_path / "dst") == read_tree(src)
    capsys.readouterr()

    assert cli(["artifacts", "show", uri, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["digest"] == pushed["digest"] and shown["manifest"]["hyperparameters"] == {"r": 16}
    assert shown["manifest"]["baseModel"] == {"name": "llama"}
    assert cli(["artifacts", "show", uri]) == 0
    assert "base:     llama" in capsys.readouterr().out

    assert cli(["artifacts", "verify", uri, "--digest", pushed["digest"]]) == 0
    assert "4 files, 3.0 MiB verified" in capsys.readouterr().out
    assert cli(["artifacts", "list", f"s3://{s3_bucket}", "--json"]) == 0
    assert [v["uri"] for v in json.loads(capsys.readouterr().out)] == [uri]

    # Exit codes: 4 for a different push to an existing version, 3 for a wrong pin, 1 for a missing version.
    other = write_tree(tmp_path / "other", adapter_files(9))
    assert cli(["artifacts", "push", str(other), uri]) == 4
    assert cli(["artifacts", "pull", uri, str(tmp_path / "x"), "--digest", "sha256:" + "1" * 64]) == 3
    assert cli(["artifacts", "pull", f"s3://{s3_bucket}/t/adapters/cli-bot/v9", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "not the pinned" in err and "no version at" in err
    assert cli(["artifacts", "push", str(src), f"s3://{s3_bucket}/loose/folder"]) == 1
    assert "give --kind, --name and --version" in capsys.readouterr().err
    assert cli(["artifacts", "gc", f"s3://{s3_bucket}", "--older-than", "0", "--dry-run"]) == 0
