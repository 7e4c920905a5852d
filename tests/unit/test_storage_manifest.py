"""The manifest's canonical bytes and digest are stable and language-neutral; unsafe paths are refused."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from lorafleet.storage.hashing import FileHasher, hash_file
from lorafleet.storage.manifest import (
    BaseModelRef,
    DatasetRef,
    FileEntry,
    Manifest,
    canonical_json,
    check_digest,
    check_relative_path,
    parse_manifest,
)

SHA_A = "a" * 64
SHA_B = "b" * 64


def manifest(**changes: object) -> Manifest:
    fields: dict[str, object] = {
        "kind": "adapter",
        "name": "support-bot",
        "version": "v1",
        "data_prefix": "data/20250101T000000Z-0123456789ab",
        "files": [
            FileEntry(path="adapter_config.json", sha256=SHA_A, size=10),
            FileEntry(path="w/x.bin", sha256=SHA_B, size=5),
        ],
        "total_size": 15,
        "base_model": BaseModelRef(name="llama", uri="s3://models/llama/main", digest="sha256:" + SHA_A),
        "dataset": DatasetRef(uri="s3://data/x.jsonl", etag='"abc"'),
        "hyperparameters": {"r": 16, "alpha": 32, "lr": 2e-4},
        "metrics": {"loss": 0.25},
        "trainer_image": "ghcr.io/x/trainer:1",
        "lorafleet_version": "0.1.0",
        "created_at": "2025-01-01T00:00:00Z",
    }
    fields.update(changes)
    return Manifest(**fields)  # type: ignore[arg-type]


def test_canonical_bytes_are_sorted_compact_camel_case_without_nulls() -> None:
    m = manifest(trainer_image=None)
    raw = m.canonical_bytes()
    obj = json.loads(raw)
    assert raw == json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    assert "trainerImage" not in obj  # absent, not null: adding optional fields later keeps old digests
    assert {"totalSize", "dataPrefix", "baseModel", "lorafleetVersion", "createdAt"} <= obj.keys()
    assert obj["dataset"] == {"uri": "s3://data/x.jsonl", "etag": '"abc"'}


def test_digest_is_sha256_of_the_stored_bytes_and_survives_a_round_trip() -> None:
    m = manifest()
    raw = m.canonical_bytes()
    assert m.digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    parsed, digest = parse_manifest(raw)
    assert digest == m.digest
    assert parsed.canonical_bytes() == raw


def test_digest_pins_every_file_and_the_lineage() -> None:
    base = manifest().digest
    assert (
        manifest(
            files=[
                FileEntry(path="adapter_config.json", sha256=SHA_B, size=10),
                FileEntry(path="w/x.bin", sha256=SHA_B, size=5),
            ]
        ).digest
        != base
    )
    assert manifest(metrics={"loss": 0.26}).digest != base
    assert manifest(dataset=DatasetRef(uri="s3://data/x.jsonl", etag='"abd"')).digest != base


def test_identity_ignores_when_and_by_whom_but_not_content() -> None:
    a = manifest()
    b = manifest(
        created_at="2026-01-01T00:00:00Z", data_prefix="data/20260101T000000Z-ffffffffffff", lorafleet_version="9"
    )
    assert a.identity() == b.identity()
    assert a.digest != b.digest
    assert manifest(hyperparameters={"r": 8}).identity() != a.identity()


def test_unknown_fields_from_a_newer_writer_are_kept() -> None:
    obj = json.loads(manifest().canonical_bytes())
    obj["signature"] = "x"
    raw = canonical_json(obj)
    parsed, _ = parse_manifest(raw)
    assert parsed.canonical_bytes() == raw


@pytest.mark.parametrize(
    "path", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/.", "a\\b", ".lorafleet/manifest.json"]
)
def test_unsafe_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError):
        check_relative_path(path)
    with pytest.raises(ValidationError):
        FileEntry(path=path, sha256=SHA_A, size=1)


@pytest.mark.parametrize("path", ["a", "a/b.safetensors", ".hidden", "sub/.lorafleet", "x..y"])
def test_ordinary_paths_are_accepted(path: str) -> None:
    check_relative_path(path)


def test_inconsistent_manifests_are_refused() -> None:
    with pytest.raises(ValidationError, match="totalSize"):
        manifest(total_size=16)
    with pytest.raises(ValidationError, match="sorted"):
        manifest(files=[FileEntry(path="b", sha256=SHA_A, size=10), FileEntry(path="a", sha256=SHA_B, size=5)])
    with pytest.raises(ValidationError, match="dataPrefix"):
        manifest(data_prefix="elsewhere/x")
    with pytest.raises(ValidationError, match="non-finite"):
        manifest(metrics={"loss": float("nan")})


def test_digest_syntax() -> None:
    assert check_digest("sha256:" + SHA_A)
    for bad in ("sha256:" + "A" * 64, "md5:" + SHA_A, SHA_A, "sha256:abc"):
        with pytest.raises(ValueError):
            check_digest(bad)


def test_files_larger_than_a_block_list_each_block() -> None:
    mib = 1024 * 1024
    big = FileEntry(path="w.bin", sha256=SHA_A, size=2 * mib + 1, blocks=[SHA_A, SHA_B, SHA_A])
    common = {"files": [big], "total_size": 2 * mib + 1, "block_size": mib}
    m = manifest(**common)
    assert json.loads(m.canonical_bytes())["files"][0]["blocks"] == [SHA_A, SHA_B, SHA_A]
    # Block hashes depend on the writer's block size, not on the content's identity.
    other = manifest(
        files=[FileEntry(path="w.bin", sha256=SHA_A, size=2 * mib + 1)], total_size=2 * mib + 1, block_size=4 * mib
    )
    assert other.identity() == m.identity() and other.digest != m.digest
    with pytest.raises(ValidationError, match="3 blocks"):
        manifest(**{**common, "files": [FileEntry(path="w.bin", sha256=SHA_A, size=2 * mib + 1, blocks=[SHA_A])]})
    with pytest.raises(ValidationError, match="3 blocks"):
        manifest(**{**common, "files": [FileEntry(path="w.bin", sha256=SHA_A, size=2 * mib + 1)]})
    with pytest.raises(ValidationError, match="1 blocks"):
        manifest(files=[FileEntry(path="a", sha256=SHA_A, size=3, blocks=[SHA_A])], total_size=3)


def test_file_hasher_matches_hashlib_whatever_the_piece_sizes(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 123)
    block = 1024 * 1024
    expected_blocks = [hashlib.sha256(data[i : i + block]).hexdigest() for i in range(0, len(data), block)]
    for piece in (1000, 65536, block - 1, block, 5 * block):
        hasher = FileHasher(block)
        for i in range(0, len(data), piece):
            hasher.update(data[i : i + piece])
        assert hasher.result() == (hashlib.sha256(data).hexdigest(), expected_blocks)
    (tmp_path / "f").write_bytes(data)
    assert hash_file(tmp_path / "f", block) == (hashlib.sha256(data).hexdigest(), expected_blocks)
    # One block or less: no block list (the file's own sha256 covers it).
    assert hash_file(tmp_path / "f", 4 * block) == (hashlib.sha256(data).hexdigest(), None)


def test_file_entry_in_two_threads_equals_one_pass(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from lorafleet.storage.hashing import LocalFile, file_entry

    path = tmp_path / "w.bin"
    path.write_bytes(os.urandom(5 * 1024 * 1024 + 7))
    local = LocalFile("w.bin", path, path.stat().st_size, 0)
    with ThreadPoolExecutor(1) as pool:
        entry = file_entry(local, 1024 * 1024, pool)
    assert entry == file_entry(local, 1024 * 1024)
    assert entry.blocks is not None and len(entry.blocks) == 6
