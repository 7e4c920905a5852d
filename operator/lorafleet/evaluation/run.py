"""One evaluation: the base model and the adapter on the same examples, every metric of the spec for both, and
the sample predictions stored next to the adapter (lorafleet.contracts.evaluation.PREDICTIONS_FILE).

The predictions file is JSON Lines, one object per example for the first evaluation.samplePredictions examples:
``{"source", "line", "prompt", "reference", "base", "adapter"}``, each text cut to MAX_PREDICTION_CHARS.
Scores are rounded to 6 significant digits (the trainer's report is at most 4 KiB).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.api.evaluation import Evaluation
from lorafleet.contracts.evaluation import PREDICTIONS_FILE, EvaluationResult, MetricScore
from lorafleet.evaluation.generate import Backend
from lorafleet.evaluation.metrics import GENERATION_METRICS, AnswerPattern, perplexity, score
from lorafleet.evaluation.prompts import EvalExample

MAX_PREDICTION_CHARS = 2000


@dataclass
class Outcome:
    """What an evaluation produced: the result for the manifest and the report, and the predictions to store."""

    result: EvaluationResult
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def write_predictions(self, adapter_dir: Path) -> Path | None:
        """The predictions file in the adapter folder (published with it); None when there is none to write."""
        if not self.predictions:
            return None
        path = adapter_dir / PREDICTIONS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for row in self.predictions:
                f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        return path


def evaluate(
    backend: Backend, examples: Sequence[EvalExample], spec: Evaluation, pattern: AnswerPattern | None = None
) -> Outcome:
    """Answer and score every example with the base model and with the adapter."""
    generated = [m for m in spec.metrics if m in GENERATION_METRICS]
    base: list[str] = []
    tuned: list[str] = []
    if generated:
        base = backend.generate(examples, spec.generation, adapter=False)
        tuned = backend.generate(examples, spec.generation, adapter=True)
    references = [e.reference for e in examples]
    losses: dict[bool, float | None] = {}
    if {"evalLoss", "perplexity"} & set(spec.metrics):
        losses = {adapter: backend.reference_loss(examples, adapter=adapter) for adapter in (False, True)}
    scores: dict[str, dict[str, Any]] = {}
    for metric in spec.metrics:
        if metric in GENERATION_METRICS:
            before = score(metric, base, references, pattern)
            after = score(metric, tuned, references, pattern)
            examples_scored = max(before.examples, after.examples)
            scores[metric] = _score(before.value, after.value, examples_scored)
        else:
            transform = perplexity if metric == "perplexity" else (lambda loss: loss)
            scores[metric] = _score(transform(losses[False]), transform(losses[True]), len(examples))
    predictions = [
        _without_none(
            {
                "source": e.source,
                "line": e.line,
                "prompt": e.prompt[-MAX_PREDICTION_CHARS:],  # the end of a prompt is where the question is
                "reference": e.reference[:MAX_PREDICTION_CHARS],
                "base": base[i][:MAX_PREDICTION_CHARS] if base else None,
                "adapter": tuned[i][:MAX_PREDICTION_CHARS] if tuned else None,
            }
        )
        for i, e in enumerate(examples[: spec.sample_predictions])
    ]
    # Validated from plain objects, as a reader of the manifest would (the contract's caps apply).
    result = EvaluationResult.model_validate(
        {"metrics": scores, "examples": len(examples), "predictionsFile": PREDICTIONS_FILE if predictions else None}
    )
    return Outcome(result, predictions)


def _score(base: float | None, adapter: float | None, examples: int) -> dict[str, Any]:
    return MetricScore(base=_round(base), adapter=_round(adapter), examples=examples).wire()


def _without_none(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if v is not None}


def _round(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.6g}")
