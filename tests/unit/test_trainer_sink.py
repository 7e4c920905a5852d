"""The local artifact sink (lorafleet.trainer.sink.LocalSink): the store's rules on a folder.

Invariants: a checkpoint counts only once its manifest is written; the newest complete one is resumed; pruning
keeps the newest N; a download is verified against the manifest; an adapter version is published once (files,
then a canonical manifest whose sha256 is the digest), an identical re-publish is a no-op and a different one is
refused with AdapterVersionExists (exit 2).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lorafleet.contracts.exits import ADAPTER_VERSION_EXISTS, DATASET_NOT_FOUND
from lorafleet.contracts.trainer import TrainerConfig
from lorafleet.trainer.errors import TrainerError
from lorafleet.trainer.sink import LocalSink, S3Sink, pvc_path, sink_for


def config() -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "job": {"namespace": "ns", "name": "j", "uid": "u-1"},
            "baseModel": {"name": "tiny", "uri": "pvc://models/tiny"},
            "dataset": {"uri": "s3://data/train.jsonl", "format": "text"},
            "method": "lora",
            "lora": {},
            "training": {},
            "output": {
                "adapterName": "bot",
                "version": "v1",
                "uri": "s3://artifacts/prefix",
                "checkpointUri": "s3://artifacts/prefix/checkpoints/ns/j-u",
            },
            "image": "img",
        }
    )


def folder(path: Path, **files: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_checkpoints_latest_download_prune(tmp_path: Path) -> None:
    sink = LocalSink(config(), tmp_path / "store")
    assert sink.latest_checkpoint() is None
    for step in (10, 20, 30):
        uri = sink.save_checkpoint(step, folder(tmp_path / f"local-{step}", **{"optimizer.pt": f"opt {step}"}))
        assert uri == f"s3://artifacts/prefix/checkpoints/ns/j-u/checkpoint-{step}"
    # An upload cut before its manifest is not a checkpoint.
    folder(tmp_path / "store/artifacts/prefix/checkpoints/ns/j-u/checkpoint-40", **{"optimizer.pt": "half"})
    assert sink.latest_checkpoint() == 30
    got = sink.download_checkpoint(30, tmp_path / "work")
    assert got == tmp_path / "work/checkpoint-30" and (got / "optimizer.pt").read_text() == "opt 30"
    assert not (got / "manifest.json").exists()
    sink.prune_checkpoints(2)
    remaining = sorted(p.name for p in (tmp_path / "store/artifacts/prefix/checkpoints/ns/j-u").iterdir())
    assert remaining == ["checkpoint-20", "checkpoint-30", "checkpoint-40"]


def test_corrupt_checkpoint_is_refused(tmp_path: Path) -> None:
    sink = LocalSink(config(), tmp_path / "store")
    sink.save_checkpoint(5, folder(tmp_path / "local", **{"a.bin": "good"}))
    (tmp_path / "store/artifacts/prefix/checkpoints/ns/j-u/checkpoint-5/a.bin").write_text("evil")
    with pytest.raises(TrainerError, match="does not match its manifest"):
        sink.download_checkpoint(5, tmp_path / "work")


def test_publish_once(tmp_path: Path) -> None:
    sink = LocalSink(config(), tmp_path / "store")
    assert sink.existing_adapter() is None
    local = folder(tmp_path / "adapter", **{"adapter_config.json": "{}", "adapter_model.safetensors": "w"})
    lineage = {"baseModel": {"name": "tiny"}, "metrics": {"trainLoss": 0.5}, "hyperparameters": {"job": {"uid": "u"}}}
    published = sink.publish_adapter(local, lineage)
    target = tmp_path / "store/artifacts/prefix/adapters/bot/v1"
    raw = (target / "manifest.json").read_bytes()
    assert published.uri == "s3://artifacts/prefix/adapters/bot/v1"
    assert published.digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    manifest = json.loads(raw)
    assert [f["path"] for f in manifest["files"]] == ["adapter_config.json", "adapter_model.safetensors"]
    assert manifest["totalSize"] == published.size_bytes == 3
    assert manifest["kind"] == "adapter" and manifest["metrics"] == {"trainLoss": 0.5}
    assert published.status() == {"uri": published.uri, "digest": published.digest, "sizeBytes": 3}
    again = sink.publish_adapter(local, {**lineage, "metrics": {"trainLoss": 0.4}})
    assert again.digest == published.digest
    (local / "adapter_model.safetensors").write_text("other")
    with pytest.raises(TrainerError) as info:
        sink.publish_adapter(local, lineage)
    assert info.value.reason == ADAPTER_VERSION_EXISTS and info.value.exit_code == 2


def test_datasets_from_store_and_claims(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = LocalSink(config(), tmp_path / "store")
    folder(tmp_path / "store/data", **{"train.jsonl": '{"text": "x"}\n'})
    got = sink.fetch_dataset("s3://data/train.jsonl", tmp_path / "work")
    assert got.sha256 == hashlib.sha256(b'{"text": "x"}\n').hexdigest()
    monkeypatch.setenv("LORAFLEET_PVC_ROOT", str(tmp_path / "mnt"))
    assert pvc_path("pvc://claim/dir/f.jsonl") == tmp_path / "mnt/claim/dir/f.jsonl"
    folder(tmp_path / "mnt/claim/dir", **{"f.jsonl": "{}\n"})
    assert sink.fetch_dataset("pvc://claim/dir/f.jsonl", tmp_path / "work").path == tmp_path / "mnt/claim/dir/f.jsonl"
    with pytest.raises(TrainerError) as info:
        sink.fetch_dataset("s3://data/missing.jsonl", tmp_path / "work")
    assert info.value.reason == DATASET_NOT_FOUND


def test_sink_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_LOCAL_STORE", str(tmp_path))
    assert isinstance(sink_for(config()), LocalSink)
    monkeypatch.delenv("LORAFLEET_LOCAL_STORE")
    assert isinstance(sink_for(config()), S3Sink)
