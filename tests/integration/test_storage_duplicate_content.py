"""Against a real MinIO: a version holding several files with identical bytes (a tokenizer copied into two
folders, two empty files) pushes and pulls whole, byte for byte; a pull interrupted midway resumes into the same
folder. Partial downloads are named by path, so equal content never shares one partial file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lorafleet.storage import ArtifactStore, StoreSettings, version_folder
from lorafleet.storage.settings import MiB

pytestmark = pytest.mark.integration


def test_files_with_identical_content_round_trip(s3_bucket: str, store_settings: StoreSettings, tmp_path: Path) -> None:
    store = ArtifactStore(store_settings.with_transfer(block_size=MiB))
    same = os.urandom(3 * MiB + 17)  # several blocks: ranged GETs of both files run at once
    files = {
        "adapter_model.safetensors": os.urandom(MiB),
        "tokenizer.json": same,
        "copy/tokenizer.json": same,
        "a.txt": b"",
        "b.txt": b"",
        "small-1.json": b'{"x": 1}',
        "small-2.json": b'{"x": 1}',
    }
    src = tmp_path / "src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    folder = version_folder(f"s3://{s3_bucket}", "adapter", "dup", "v1")
    pushed = store.push(src, folder, kind="adapter", name="dup", version="v1")

    dst = tmp_path / "dst"
    pulled = store.pull(folder, dst, digest=pushed.digest)
    got = {p.relative_to(dst).as_posix(): p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    got = {k: v for k, v in got.items() if not k.startswith(".lorafleet/")}
    assert got == files
    assert pulled.downloaded_bytes == sum(len(b) for b in files.values())

    # One copy lost: the next pull fetches only that file again (the other copy is verified in place).
    (dst / "copy" / "tokenizer.json").unlink()
    again = store.pull(folder, dst, digest=pushed.digest)
    assert (dst / "copy" / "tokenizer.json").read_bytes() == same
    assert again.downloaded_bytes == len(same)
