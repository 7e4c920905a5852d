"""Task evaluation in a training run (config.evaluation; the metrics and prompts are lorafleet.evaluation).

* `prepare`, on every rank with the datasets, before the model is loaded: the held-out samples read and turned into
  prompts and references, the template and the answer pattern checked. Every problem is a TrainerError here
  (exit 2), so a bad evaluation setting costs no training.
* `evaluate`, on rank 0 after training, before publishing (the other ranks wait in publish's broadcast): the
  base model and the adapter answer the same prompts; the predictions file is written into the adapter folder,
  so it is published and checksummed with the version, and the result goes into the manifest and the report.

Held-out samples, in this order, the first evaluation.maxExamples of them: evaluation.uri's (same format as the
dataset, read by the same readers), then the dataset's evalUri samples or its evalSplit samples (in file order).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.contracts.evaluation import EvaluationResult
from lorafleet.contracts.trainer import TrainerConfig
from lorafleet.evaluation.metrics import AnswerPattern, PatternError
from lorafleet.evaluation.prompts import EvalExample, HeldOutRecord, TemplateError, build_examples, check_spec
from lorafleet.trainer import data
from lorafleet.trainer.errors import CONFIG_INVALID, DATASET_EMPTY, TrainerError
from lorafleet.trainer.progress import ProgressReporter
from lorafleet.trainer.readers import FileFormat, detect_format
from lorafleet.trainer.sink import ArtifactSink, DatasetFile


@dataclass
class HeldOut:
    """The evaluation's examples and its compiled answer pattern (regexAccuracy only)."""

    examples: list[EvalExample]
    pattern: AnswerPattern | None


def prepare(
    config: TrainerConfig,
    tokenizer: Any,
    sink: ArtifactSink,
    work_dir: Path,
    eval_file: DatasetFile | None,
    eval_lines: set[int] | None,
    train_file: DatasetFile,
) -> HeldOut | None:
    """The held-out examples (None without config.evaluation). `eval_file`: the dataset's evalUri file;
    `eval_lines`: the record numbers of the evalSplit samples in `train_file`."""
    spec = config.evaluation
    if spec is None:
        return None
    if config.distributed.strategy == "fsdp":
        raise TrainerError(
            CONFIG_INVALID,
            "evaluation with distributed strategy fsdp is not supported (the sharded model cannot generate on one "
            "process); leave evaluation out or use ddp",
        )
    if spec.uri is None and eval_file is None and not eval_lines:
        raise TrainerError(
            CONFIG_INVALID,
            "evaluation needs held-out samples (training samples would only measure memorisation): set "
            "evaluation.uri, dataset.evalUri or dataset.evalSplit",
        )
    try:
        template = check_spec(spec, config.dataset)
        pattern = AnswerPattern(spec.answer_pattern) if "regexAccuracy" in spec.metrics else None
    except (TemplateError, PatternError) as e:
        raise TrainerError(CONFIG_INVALID, str(e)) from None
    own = sink.fetch_dataset(spec.uri, work_dir / "data-evaluation") if spec.uri is not None else None

    def records() -> Iterator[HeldOutRecord]:
        if own is not None:
            yield from _records(own, spec.file_format)
        if eval_file is not None:
            yield from _records(eval_file, config.dataset.file_format)
        elif eval_lines:
            yield from _records(train_file, config.dataset.file_format, eval_lines)

    examples, errors = build_examples(records(), spec, config.dataset, tokenizer, template)
    errors.raise_if_any("of the evaluation")
    if not examples:
        raise TrainerError(DATASET_EMPTY, "evaluation: the held-out files have no samples")
    if pattern is not None:
        _check_references(pattern, examples)
    return HeldOut(examples, pattern)


def _records(file: DatasetFile, file_format: FileFormat, only: set[int] | None = None) -> Iterator[HeldOutRecord]:
    fmt = detect_format(file.path) if file_format == "auto" else file_format
    unit = "line" if fmt in ("jsonl", "csv") else "record"
    for number, record in data.stream_records(file.path, uri=file.uri, file_format=file_format):
        if only is None or number in only:
            yield HeldOutRecord(file.uri, unit, number, record)


def _check_references(pattern: AnswerPattern, examples: list[EvalExample]) -> None:
    """The answer pattern must find an answer in some reference, within its time limit in every one."""
    found = 0
    for example in examples:
        try:
            found += pattern.last(example.reference) is not None
        except TimeoutError:
            raise TrainerError(
                CONFIG_INVALID,
                f"evaluation.answerPattern {pattern.pattern!r} takes too long on the reference of "
                f"{example.source} line {example.line} (catastrophic backtracking): simplify it",
            ) from None
    if not found:
        sample = examples[0].reference[:80]
        raise TrainerError(
            CONFIG_INVALID,
            f"evaluation.answerPattern {pattern.pattern!r} matches none of the {len(examples)} references "
            f"(the first is {sample!r}): regexAccuracy would have nothing to score; fix the pattern or leave the "
            "metric out",
        )


def evaluate(
    config: TrainerConfig,
    model: Any,
    tokenizer: Any,
    held_out: HeldOut,
    adapter_dir: Path,
    reporter: ProgressReporter,
) -> EvaluationResult:
    """Rank 0: evaluate the trained model against its base, write the predictions into the adapter folder."""
    from lorafleet.evaluation.generate import TransformersBackend
    from lorafleet.evaluation.run import evaluate as run_evaluation

    spec = config.evaluation
    assert spec is not None
    started = time.monotonic()
    backend = TransformersBackend(
        model, tokenizer, max_length=config.training.max_sequence_length, seed=config.training.seed
    )
    outcome = run_evaluation(backend, held_out.examples, spec, held_out.pattern)
    outcome.write_predictions(adapter_dir)
    reporter.event(
        "evaluation",
        examples=len(held_out.examples),
        seconds=round(time.monotonic() - started, 1),
        metrics={name: {"base": m.base, "adapter": m.adapter} for name, m in outcome.result.metrics.items()},
    )
    return outcome.result
