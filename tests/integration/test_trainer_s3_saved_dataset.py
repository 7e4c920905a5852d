"""A FineTuneJob dataset that is a Hugging Face save_to_disk folder in the object store trains (real MinIO).

Invariants: a folder of Arrow shards (state.json, dataset_info.json, data-*.arrow) under s3://bucket/prefix/ is
fetched whole by the trainer's S3 sink, with or without the URI's trailing slash and with fileFormat datasets or
auto; every row of every shard becomes a training example; the run publishes an adapter whose lineage names the
dataset by its URI and by the digest of the folder's file list (the same digest as of the folder before upload).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.s3_fixtures import s3_bucket, s3_server  # noqa: F401
from tests.trainer_fixtures import TrainerEnv, tiny_model_dir  # noqa: F401
from tests.unit.test_dataset_files import save_to_disk

ROWS = [{"text": f"Sample {i}: grass is green and the sky is blue."} for i in range(6)]
SHARDS = 3


@pytest.fixture
def saved_dataset(
    tmp_path: Path,
    tiny_model_dir: Path,  # noqa: F811
    s3_server: Any,  # noqa: F811
    s3_bucket: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[TrainerEnv, str, Path, Any]:
    """The trainer's environment pointed at MinIO, a saved dataset uploaded under datasets/saved/, the store."""
    pytest.importorskip("pyarrow")
    from lorafleet.storage import ArtifactStore

    monkeypatch.delenv("LORAFLEET_LOCAL_STORE", raising=False)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    folder = save_to_disk(tmp_path / "saved", ROWS, shards=SHARDS)
    store = ArtifactStore(s3_server.store_settings())
    for path in sorted(folder.iterdir()):
        store.client.upload_file(str(path), s3_bucket, f"datasets/saved/{path.name}")
    return TrainerEnv(tmp_path / "env", tiny_model_dir), s3_bucket, folder, store


@pytest.mark.parametrize(("suffix", "file_format"), [("/", "datasets"), ("", "auto")])
def test_a_saved_dataset_folder_in_s3_is_fetched_and_trains(
    saved_dataset: tuple[TrainerEnv, str, Path, Any], suffix: str, file_format: str
) -> None:
    from lorafleet.storage import version_folder
    from lorafleet.trainer.progress import ProgressReporter
    from lorafleet.trainer.sink import S3Sink, dataset_file
    from lorafleet.trainer.train import StopSignal, run, validate

    env, bucket, local, store = saved_dataset
    name = f"saved-{file_format}"
    uri = f"s3://{bucket}/datasets/saved{suffix}"
    config = env.config(name=name, dataset={"format": "text", "fileFormat": file_format}, maxSteps=2, batchSize=2)
    config.dataset.uri = uri
    config.output.uri = f"s3://{bucket}/lorafleet"
    config.output.checkpoint_uri = f"s3://{bucket}/lorafleet/checkpoints/tests/{name}"

    datasets = validate(config, sink=S3Sink(config))
    assert datasets.train_file.path.is_dir()
    assert sorted(p.name for p in datasets.train_file.path.iterdir()) == sorted(p.name for p in local.iterdir())
    assert len(datasets.train) + len(datasets.eval) == len(ROWS)  # every row of every shard

    result = run(config, reporter=ProgressReporter(enabled=False), stop=StopSignal(), sink=S3Sink(config))
    assert result.progress["step"] == 2 and result.artifact is not None

    manifest, digest = store.verify(version_folder(config.output.uri, "adapter", name, "v1"))
    assert digest == result.artifact.digest
    lineage = manifest.to_json_obj()
    assert lineage["dataset"]["uri"] == uri
    assert lineage["dataset"]["sha256"] == dataset_file(local, uri).sha256
