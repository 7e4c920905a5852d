"""One training run: transformers' Trainer over a peft LoRA (or QLoRA) model, with our data pipeline, progress,
checkpoints in the artifact store, resume, and the final adapter published with its lineage.

run() is the sequence; its parts (all on the training side: torch, transformers and peft are imported there and
never by the operator):

- runtime.py: signals, ranks and collectives, CPU threads;
- model.py: precision, the tokenizer, the base model with LoRA;
- batches.py: the datasets fetched and parsed, packing, the sampler and the collator;
- hf.py: TrainingArguments, our Trainer subclass and callback, the training loop;
- evaluate.py: the task evaluation (config.evaluation): checked with the data, run after training;
- publish.py: an earlier attempt's adapter, the final adapter and its lineage, publishing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerState
from transformers import logging as hf_logging

from lorafleet.contracts.evaluation import EvaluationResult, parse_result
from lorafleet.contracts.trainer import TrainerConfig
from lorafleet.trainer.batches import Datasets, collator, load_datasets, packing_mode, report_datasets
from lorafleet.trainer.errors import Interrupted
from lorafleet.trainer.evaluate import HeldOut, evaluate, prepare
from lorafleet.trainer.hf import LorafleetCallback, make_trainer, train, training_arguments
from lorafleet.trainer.model import check_qlora_dependencies, load_model, load_tokenizer, precision_for
from lorafleet.trainer.progress import ProgressReporter
from lorafleet.trainer.publish import publish, published_earlier
from lorafleet.trainer.runtime import Ranks, StopSignal, broadcast, cpu_threads, local_main_first
from lorafleet.trainer.sink import ArtifactSink, PublishedArtifact, sink_for

# Imported from here by main.py, the tests and the benchmark; re-exported so those imports keep working.
__all__ = ["Datasets", "RunResult", "StopSignal", "load_model", "run", "validate"]


@dataclass
class RunResult:
    """What the final status reports."""

    progress: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    artifact: PublishedArtifact | None = None
    skipped: bool = False  # the adapter version was already published by an earlier attempt of this job
    evaluation: EvaluationResult | None = None  # config.evaluation's result (rank 0's, on every rank)
    tokens_trained: int | None = None


def validate(config: TrainerConfig, *, sink: ArtifactSink | None = None) -> Datasets:
    """The checks that need no model weights: hardware, base model folder, tokenizer, the whole dataset, the
    evaluation's held-out samples and settings."""
    sink = sink or sink_for(config)
    precision_for(config)
    if config.method == "qlora":
        check_qlora_dependencies()
    tokenizer = load_tokenizer(config)
    datasets = load_datasets(config, tokenizer, sink, Path(config.work_dir))
    prepare_evaluation(config, tokenizer, sink, datasets)
    return datasets


def prepare_evaluation(config: TrainerConfig, tokenizer: Any, sink: ArtifactSink, datasets: Datasets) -> HeldOut | None:
    """The evaluation's held-out examples, checked (None without config.evaluation)."""
    eval_lines = {e.line for e in datasets.eval} if config.dataset.eval_split and not datasets.eval_file else None
    return prepare(config, tokenizer, sink, Path(config.work_dir), datasets.eval_file, eval_lines, datasets.train_file)


def run(
    config: TrainerConfig,
    *,
    reporter: ProgressReporter,
    stop: StopSignal,
    sink: ArtifactSink | None = None,
) -> RunResult:
    """Train, checkpoint, resume and publish. Raises TrainerError (Interrupted on SIGTERM).

    Every rank runs the same steps in the same order: several of them are collective (broadcast, barrier).
    """
    started = time.monotonic()
    _quiet_libraries()
    ranks = Ranks.from_environment()
    _limit_cpu_threads()
    sink = sink or sink_for(config)
    precision = precision_for(config)
    report = ranks.is_main
    output_dir = Path(config.work_dir) / "checkpoints"

    # TrainingArguments sets up torch.distributed under torchrun: before anything collective.
    has_eval = bool(config.dataset.eval_uri or config.dataset.eval_split)
    args = training_arguments(config, precision, output_dir, has_eval=has_eval)
    _ = args.device  # process group initialized here

    earlier = published_earlier(config, sink, ranks)
    if earlier is not None:
        reporter.event("published", uri=earlier.uri, digest=earlier.digest, note="by an earlier attempt")
        return _result_of_earlier_attempt(earlier)

    tokenizer = load_tokenizer(config)
    with local_main_first(ranks):
        datasets = load_datasets(config, tokenizer, sink, Path(config.work_dir))
        held_out = prepare_evaluation(config, tokenizer, sink, datasets)
    if report:
        report_datasets(reporter, config, datasets)

    from transformers import set_seed

    set_seed(config.training.seed)
    model = load_model(config, precision)
    if config.distributed.strategy == "fsdp":  # FSDP wraps the model's own layer classes: known only now
        args = training_arguments(config, precision, output_dir, has_eval=bool(datasets.eval), model=model)
    packing = packing_mode(config, attention=model.config._attn_implementation)
    callback = LorafleetCallback(reporter, sink, stop, ranks, report)
    trainer = make_trainer(model, args, datasets, collator(packing, tokenizer, precision), packing, callback)

    resume_step, resume_dir = _fetch_checkpoint(sink, ranks, output_dir, reporter)
    if report:
        _report_start(reporter, config, trainer, model, precision, packing, ranks, resume_step)
    output = train(trainer, resume_dir, stop)

    progress = _progress(trainer.state, callback)
    _raise_if_interrupted(callback, trainer.state)
    metrics = _metrics(trainer, callback, datasets, output.metrics, progress["loss"], started)
    evaluation = _evaluation_step(config, model, tokenizer, held_out, reporter)
    artifact = publish(trainer, config, datasets, metrics, sink, ranks, reporter, evaluation=evaluation)
    result = parse_result(artifact.lineage.get("evaluation")) if artifact is not None else None
    tokens = int(trainer.state.num_input_tokens_seen or 0) or None
    return RunResult(progress=progress, metrics=metrics, artifact=artifact, evaluation=result, tokens_trained=tokens)


# -- the steps of run ----------------------------------------------------------------------------------------------


def _quiet_libraries() -> None:
    """transformers' own log lines and progress bars off: the reporter's lines are the trainer's output."""
    hf_logging.set_verbosity_warning()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def _limit_cpu_threads() -> None:
    """On CPU, torch's threads capped by the container's CPU quota (torchrun sets OMP_NUM_THREADS itself)."""
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cpu_threads())


def _result_of_earlier_attempt(artifact: PublishedArtifact) -> RunResult:
    """The status of a run whose adapter an earlier attempt published: its stored metrics and evaluation."""
    stored = artifact.lineage.get("metrics", {})
    scalars = {k: float(v) for k, v in stored.items() if isinstance(v, int | float)}
    steps = int(scalars.get("steps", 0))
    return RunResult(
        progress={"step": steps, "totalSteps": steps},
        metrics=scalars,
        artifact=artifact,
        skipped=True,
        evaluation=parse_result(artifact.lineage.get("evaluation")),
        tokens_trained=int(scalars["trainTokens"]) if "trainTokens" in scalars else None,
    )


def _evaluation_step(
    config: TrainerConfig, model: Any, tokenizer: Any, held_out: HeldOut | None, reporter: ProgressReporter
) -> Callable[[Path], EvaluationResult] | None:
    """publish's hook: rank 0 evaluates once the adapter folder is written (None without config.evaluation)."""
    if held_out is None:
        return None
    return lambda adapter_dir: evaluate(config, model, tokenizer, held_out, adapter_dir, reporter)


def _fetch_checkpoint(
    sink: ArtifactSink, ranks: Ranks, output_dir: Path, reporter: ProgressReporter
) -> tuple[int | None, Path | None]:
    """The newest complete checkpoint (rank 0 decides for all), downloaded once per node: (step, folder)."""
    resume_step: int | None = broadcast(sink.latest_checkpoint() if ranks.is_main else None)
    if resume_step is None:
        return None, None
    with local_main_first(ranks):
        resume_dir = sink.download_checkpoint(resume_step, output_dir)
    if ranks.is_main:
        reporter.event("resume", step=resume_step)
    return resume_step, resume_dir


def _report_start(
    reporter: ProgressReporter,
    config: TrainerConfig,
    trainer: Trainer,
    model: Any,
    precision: str,
    packing: str,
    ranks: Ranks,
    resume_step: int | None,
) -> None:
    trainable, total = model.get_nb_trainable_parameters()
    reporter.event(
        "start",
        method=config.method,
        precision=precision,
        device=f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "cpu",
        distributedType=str(trainer.accelerator.distributed_type.value),
        packing=packing,
        attention=model.config._attn_implementation,
        worldSize=ranks.world_size,
        trainableParameters=trainable,
        totalParameters=total,
        resumeStep=resume_step,
    )


def _progress(state: TrainerState, callback: LorafleetCallback) -> dict[str, Any]:
    # A retry that resumed at the last step trained nothing: the losses come from the restored history.
    last_loss = callback.last_loss
    if last_loss is None:
        last_loss = next((e["loss"] for e in reversed(state.log_history) if "loss" in e), None)
    return {"step": state.global_step, "totalSteps": state.max_steps, "epoch": state.epoch, "loss": last_loss}


def _raise_if_interrupted(callback: LorafleetCallback, state: TrainerState) -> None:
    if callback.interrupted_at is not None:
        uri = callback.checkpoint_uris.get(callback.interrupted_at, "")
        raise Interrupted(
            f"stopped by a signal at step {callback.interrupted_at}/{state.max_steps}; checkpoint stored "
            f"{'at ' + uri if uri else 'by rank 0'}; the next attempt resumes from it"
        )


def _metrics(
    trainer: Trainer,
    callback: LorafleetCallback,
    datasets: Datasets,
    train_metrics: dict[str, float],
    last_loss: float | None,
    started: float,
) -> dict[str, float]:
    """The run's metrics (docs/trainer.md): losses, throughput of this attempt, counts of the whole run."""
    state = trainer.state
    metrics: dict[str, float] = {}
    if last_loss is not None:
        metrics["trainLoss"] = last_loss
    if datasets.eval:
        if callback.eval_step != state.global_step or callback.eval_loss is None:
            trainer.evaluate()  # reported through on_log
        if callback.eval_loss is not None:
            metrics["evalLoss"] = callback.eval_loss
    runtime = train_metrics.get("train_runtime") or 0.0
    session_tokens = state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)
    metrics.update(
        {
            "tokensPerSecond": session_tokens / runtime if runtime else 0.0,
            "trainSeconds": runtime,
            "wallSeconds": time.monotonic() - started,
            "trainTokens": float(state.num_input_tokens_seen),
            "steps": float(state.global_step),
            "samples": float(len(datasets.train)),
        }
    )
    return metrics
