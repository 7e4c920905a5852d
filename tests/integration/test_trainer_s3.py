"""The trainer against a real S3 server (MinIO from tests.s3_fixtures): dataset download, checkpoints in the store,
resume from them, and the adapter pushed through lorafleet.storage with its lineage.

Invariants: the published adapter verifies (every file against its manifest) and its digest is the one the status
reports; the manifest names the dataset by URI, sha256 and ETag; a SIGTERM'd run's checkpoint is in the store and
the next run resumes from it; only the newest checkpoints are kept; a missing dataset object is DatasetNotFound.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from lorafleet.trainer.errors import DATASET_NOT_FOUND, Interrupted, TrainerError
from tests.s3_fixtures import s3_bucket, s3_server  # noqa: F401
from tests.trainer_fixtures import MEMORIZE_CHAT, TrainerEnv, tiny_model_dir  # noqa: F401


@pytest.fixture
def s3_env(
    tmp_path: Path,
    tiny_model_dir: Path,  # noqa: F811
    s3_server: Any,  # noqa: F811
    s3_bucket: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[TrainerEnv, str, Any]:
    from lorafleet.storage import ArtifactStore

    monkeypatch.delenv("LORAFLEET_LOCAL_STORE", raising=False)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    store = ArtifactStore(s3_server.store_settings())
    body = "".join(json.dumps(line) + "\n" for line in MEMORIZE_CHAT).encode()
    store.client.put_object(Bucket=s3_bucket, Key="datasets/chat.jsonl", Body=body)
    return TrainerEnv(tmp_path, tiny_model_dir), s3_bucket, store


def s3_config(env: TrainerEnv, bucket: str, name: str, **training: Any) -> Any:
    config = env.config(name=name, **training)
    config.dataset.uri = f"s3://{bucket}/datasets/chat.jsonl"
    config.output.uri = f"s3://{bucket}/lorafleet"
    config.output.checkpoint_uri = f"s3://{bucket}/lorafleet/checkpoints/tests/{name}"
    return config


def run(config: Any, stop_at_once: bool = False) -> Any:
    from lorafleet.trainer.progress import ProgressReporter
    from lorafleet.trainer.sink import S3Sink
    from lorafleet.trainer.train import StopSignal
    from lorafleet.trainer.train import run as train

    stop = StopSignal()
    if stop_at_once:
        stop.requested = signal.SIGTERM  # as if SIGTERM arrived during the first step
    return train(config, reporter=ProgressReporter(enabled=False), stop=stop, sink=S3Sink(config))


def test_train_checkpoint_resume_and_publish_on_s3(s3_env: tuple[TrainerEnv, str, Any]) -> None:
    from lorafleet.storage import Location, version_folder

    env, bucket, store = s3_env
    config = s3_config(env, bucket, "s3run", maxSteps=8, checkpointInterval=3)
    with pytest.raises(Interrupted, match="step 1/8"):
        run(config, stop_at_once=True)
    checkpoints = Location.parse(config.output.checkpoint_uri)
    assert [v.folder.uri.rsplit("/", 1)[-1] for v in store.list_versions(checkpoints)] == ["checkpoint-1"]

    result = run(config)
    assert result.progress["step"] == 8 and not result.skipped
    # Saved at 3, 6 and 8 (the last step); the oldest pruned.
    names = sorted(v.folder.uri.rsplit("/", 1)[-1] for v in store.list_versions(checkpoints))
    assert names == ["checkpoint-6", "checkpoint-8"]

    folder = version_folder(config.output.uri, "adapter", "s3run", "v1")
    manifest, digest = store.verify(folder)
    assert digest == result.artifact.digest and result.artifact.uri == folder.uri
    assert result.artifact.size_bytes == manifest.total_size
    assert [f.path for f in manifest.files] == ["adapter_config.json", "adapter_model.safetensors"]
    lineage = manifest.to_json_obj()
    assert lineage["dataset"]["uri"] == config.dataset.uri and lineage["dataset"]["etag"]
    assert len(lineage["dataset"]["sha256"]) == 64
    assert lineage["hyperparameters"]["job"]["uid"] == "uid-s3run"
    assert lineage["metrics"]["steps"] == 8 and len(lineage["metrics"]["lossCurve"]) >= 2
    assert lineage["trainerImage"] == config.image

    again = run(config)  # a retry after publishing: nothing trained, same artifact
    assert again.skipped and again.artifact.digest == digest


def test_missing_dataset_object(s3_env: tuple[TrainerEnv, str, Any]) -> None:
    env, bucket, _ = s3_env
    config = s3_config(env, bucket, "nodata")
    config.dataset.uri = f"s3://{bucket}/datasets/nope.jsonl"
    with pytest.raises(TrainerError) as info:
        run(config)
    assert info.value.reason == DATASET_NOT_FOUND and info.value.exit_code == 2
