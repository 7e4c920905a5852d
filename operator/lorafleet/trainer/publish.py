"""The end of a run: the final adapter in peft's format, its lineage, and publishing both as an immutable version
(rank 0 only); and, at the start, whether an earlier attempt of this job already published it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerState

from lorafleet.contracts.evaluation import EVALUATION_KEY, EvaluationResult
from lorafleet.contracts.serving import ENGINE_MODEL_DIR
from lorafleet.contracts.trainer import TrainerConfig
from lorafleet.trainer.batches import Datasets
from lorafleet.trainer.errors import ADAPTER_VERSION_EXISTS, TrainerError
from lorafleet.trainer.progress import ProgressReporter
from lorafleet.trainer.runtime import Ranks, barrier, broadcast
from lorafleet.trainer.sink import ArtifactSink, PublishedArtifact

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def published_earlier(config: TrainerConfig, sink: ArtifactSink, ranks: Ranks) -> PublishedArtifact | None:
    """The adapter version if an earlier attempt of this job published it (a retry after a crash between
    publishing and exiting), else None; AdapterVersionExists if another job did. Collective: every rank calls it."""
    existing: PublishedArtifact | None = broadcast(sink.existing_adapter() if ranks.is_main else None)
    if existing is None:
        return None
    if existing.lineage.get("hyperparameters", {}).get("job", {}).get("uid") == config.job.uid:
        return existing
    raise TrainerError(
        ADAPTER_VERSION_EXISTS,
        f"adapter version {existing.uri} already exists (made by another job); versions are never "
        "overwritten: set a new output.version",
    )


def publish(
    trainer: Trainer,
    config: TrainerConfig,
    datasets: Datasets,
    metrics: dict[str, float],
    sink: ArtifactSink,
    ranks: Ranks,
    reporter: ProgressReporter,
    evaluation: Callable[[Path], EvaluationResult] | None = None,
) -> PublishedArtifact | None:
    """Save the adapter (every rank: FSDP gathers), evaluate it on rank 0 (`evaluation` writes its predictions
    into the folder; its result goes into the lineage under EVALUATION_KEY), publish it from rank 0, and return
    what rank 0 published on every rank, so that any pod's status names the artifact."""
    adapter_dir = adapter_folder(trainer, config, Path(config.work_dir) / "adapter")
    artifact = None
    if ranks.is_main:
        stored = lineage(config, datasets, metrics, trainer.state)
        if evaluation is not None:
            stored[EVALUATION_KEY] = evaluation(adapter_dir).wire()
        artifact = sink.publish_adapter(adapter_dir, stored)
        reporter.event("published", uri=artifact.uri, digest=artifact.digest, sizeBytes=artifact.size_bytes)
    shared: PublishedArtifact | None = broadcast(artifact)
    barrier()
    return shared


def adapter_folder(trainer: Trainer, config: TrainerConfig, target: Path) -> Path:
    """The final adapter in peft's format, safetensors only: adapter_config.json + adapter_model.safetensors."""
    staging = target.with_name(target.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    trainer.save_model(str(staging))  # handles DDP/FSDP gathering; writes on the main process only
    if not trainer.args.should_save:
        return target
    target.mkdir(parents=True)
    for name in ADAPTER_FILES:
        if not (staging / name).is_file():
            raise TrainerError("TrainingFailed", f"peft did not write {name}")
        shutil.copy2(staging / name, target / name)
    shutil.rmtree(staging, ignore_errors=True)
    adapter_config = json.loads((target / "adapter_config.json").read_text())
    # What vLLM's resolver plugins compare with its --model; the base model's URI and digest are in the manifest.
    adapter_config["base_model_name_or_path"] = ENGINE_MODEL_DIR
    (target / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    return target


def lineage(
    config: TrainerConfig, datasets: Datasets, metrics: dict[str, float], state: TrainerState
) -> dict[str, Any]:
    """The manifest's lineage: base model, dataset, hyperparameters (and the job), metrics with the loss curves."""
    import peft
    import transformers

    curve = [[e["step"], round(e["loss"], 6)] for e in state.log_history if "loss" in e]
    eval_curve = [[e["step"], round(e["eval_loss"], 6)] for e in state.log_history if "eval_loss" in e]
    train_file = datasets.train_file
    dataset: dict[str, Any] = {
        "uri": train_file.uri,
        "sha256": train_file.sha256,
        "etag": train_file.etag,
        "versionId": train_file.version_id,
        "format": config.dataset.format,
        "fields": config.dataset.fields.model_dump(by_alias=True),
        "train": datasets.report.summary(),
    }
    if datasets.eval_file is not None and datasets.eval_report is not None:
        dataset["eval"] = {
            "uri": datasets.eval_file.uri,
            "sha256": datasets.eval_file.sha256,
            **datasets.eval_report.summary(),
        }
    elif config.dataset.eval_split:
        dataset["eval"] = {"split": config.dataset.eval_split, "samples": len(datasets.eval)}
    base = config.base_model
    return {
        "baseModel": {k: v for k, v in {"name": base.name, "uri": base.uri, "digest": base.digest}.items() if v},
        "dataset": {k: v for k, v in dataset.items() if v is not None},
        "hyperparameters": {
            "method": config.method,
            "lora": config.lora.model_dump(by_alias=True),
            "training": config.training.model_dump(by_alias=True, exclude_none=True),
            "distributed": {
                "nodes": config.distributed.nodes,
                "processesPerNode": config.distributed.processes_per_node,
                "strategy": config.distributed.strategy,
            },
            "job": config.job.model_dump(by_alias=True),
            "frameworks": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
            },
        },
        "metrics": {**metrics, "lossCurve": curve, "evalLossCurve": eval_curve},
        "trainerImage": config.image,
    }
