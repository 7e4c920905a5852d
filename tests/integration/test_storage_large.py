"""A 1 GiB model file goes through push and pull intact (multipart up, parallel ranged GETs down, sha256 checked).

Disk use is bounded: the source is sparse (random 1 MiB blocks every 64 MiB, so the hash still covers real data),
and the pulled copy and the stored object are removed at the end: about 2 GiB at the peak.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

from lorafleet.storage import ArtifactStore, StoreSettings, version_folder
from lorafleet.storage.settings import MiB

pytestmark = pytest.mark.integration

GiB = 1024 * MiB


def sparse_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, 64 * MiB):
            f.seek(offset)
            f.write(os.urandom(MiB))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * MiB):
            h.update(block)
    return h.hexdigest()


def test_one_gib_round_trip(s3_bucket: str, store_settings: StoreSettings, tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    assert free > 3 * GiB, f"the 1 GiB round trip needs 3 GiB free under {tmp_path}, {free // MiB} MiB left"
    store = ArtifactStore(store_settings)
    src = tmp_path / "src" / "model.safetensors"
    dest = tmp_path / "dst"
    folder = version_folder(f"s3://{s3_bucket}", "model", "big", "main")
    try:
        sparse_file(src, GiB)
        (src.parent / "config.json").write_text("{}")

        t0 = time.perf_counter()
        pushed = store.push(src.parent, folder, kind="model", name="big", version="main")
        t1 = time.perf_counter()
        pulled = store.pull(folder, dest, digest=pushed.digest)
        t2 = time.perf_counter()
        print(f"\n1 GiB: push {GiB / MiB / (t1 - t0):.0f} MiB/s, pull {GiB / MiB / (t2 - t1):.0f} MiB/s (verified)")

        assert pushed.manifest.total_size == GiB + 2
        assert pulled.downloaded_bytes == GiB + 2
        assert (dest / "model.safetensors").stat().st_size == GiB
        assert sha256(dest / "model.safetensors") == sha256(src) == pushed.manifest.file("model.safetensors").sha256
    finally:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.rmtree(src.parent, ignore_errors=True)
        store.delete_version(folder)  # frees the server's copy now rather than at bucket teardown
