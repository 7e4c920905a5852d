"""The evaluation's contract: what the trainer measured (in its report and in the adapter's manifest, the top-level
field `EVALUATION_KEY` of lorafleet.storage.manifest.Manifest: read it with `from_manifest`), and the one judgement
of it against quality bars that the FineTuneJob and the AdapterDeployment both use.

The numbers come from the training pod, which may run a tenant's own image: they are read leniently (a bad number
reads as absent) and judged here by the operator, never taken from a "passed" flag the pod sets. A bar guards
against a worse adapter by mistake; it is as trustworthy as the image that measured it (docs/security.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from pydantic import Field, StrictFloat, StrictInt, field_validator

from lorafleet.api.evaluation import LOWER_IS_BETTER, MetricResult, QualityBar
from lorafleet.contracts.base import Contract, Lenient

EVALUATION_VERSION = 1
# The adapter manifest's top-level field holding the result (Manifest.evaluation).
EVALUATION_KEY = "evaluation"
PREDICTIONS_FILE = "evaluation/predictions.jsonl"
MAX_METRICS = 16

Score = Annotated[StrictInt | StrictFloat | None, Lenient]
Count = Annotated[StrictInt | None, Lenient]


class MetricScore(Contract):
    """One metric: the base model's and the adapter's score on the same `examples`."""

    base: Score = None
    adapter: Score = None
    examples: Count = None

    @field_validator("base", "adapter", mode="after")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        return value if value is None or math.isfinite(value) else None


class EvaluationResult(Contract):
    """What an evaluation measured; `metrics` maps a metric name (lorafleet.api.evaluation.EvaluationMetric) to
    its scores. Written by the trainer into its report and the adapter manifest's lineage."""

    version: Annotated[int | None, Lenient] = EVALUATION_VERSION
    metrics: dict[str, MetricScore] = Field(default_factory=dict)
    examples: Count = None
    predictions_file: Annotated[str | None, Lenient] = None  # relative to the adapter version folder

    @field_validator("metrics", mode="before")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return {}
        return {str(k)[:64]: v for k, v in list(value.items())[:MAX_METRICS] if isinstance(v, Mapping)}


def parse_result(value: object) -> EvaluationResult | None:
    """The evaluation in a report or manifest lineage, or None when there is none (or it is not an object)."""
    return EvaluationResult.model_validate(value) if isinstance(value, Mapping) else None


def from_manifest(manifest: object) -> EvaluationResult | None:
    """The evaluation recorded in an adapter manifest (a lorafleet.storage.manifest.Manifest or its JSON object),
    or None when it has none."""
    if isinstance(manifest, Mapping):
        return parse_result(manifest.get(EVALUATION_KEY))
    return parse_result(getattr(manifest, EVALUATION_KEY, None))


def metric_results(result: EvaluationResult, order: Iterable[str] = ()) -> list[MetricResult]:
    """Status rows: the metrics named in `order` first (the spec's order), then any others by name."""
    names = [n for n in order if n in result.metrics] + sorted(n for n in result.metrics if n not in set(order))
    rows = []
    for name in names:
        m = result.metrics[name]
        delta = m.adapter - m.base if m.adapter is not None and m.base is not None else None
        rows.append(
            MetricResult(
                name=name,
                base=_round(m.base),
                adapter=_round(m.adapter),
                delta=_round(delta),
                examples=m.examples,
            )
        )
    return rows


def score_line(rows: list[MetricResult]) -> str | None:
    """The first metric as 'rougeL 0.81 (+0.42)', for `kubectl get ftj`."""
    if not rows or rows[0].adapter is None:
        return None
    first = rows[0]
    delta = f" ({first.delta:+.3g})" if first.delta is not None else ""
    return f"{first.name} {first.adapter:.3g}{delta}"


def missed_bars(result: EvaluationResult | None, bars: Iterable[QualityBar]) -> list[str]:
    """Each bar the result does not reach, as a sentence; empty when all are reached. A metric the result lacks
    misses its bar."""
    missed = []
    for bar in bars:
        scores = result.metrics.get(bar.metric) if result is not None else None
        adapter = scores.adapter if scores is not None else None
        if adapter is None:
            missed.append(f"{bar.metric} was not measured")
            continue
        lower = bar.metric in LOWER_IS_BETTER
        if bar.min_score is not None and (adapter > bar.min_score if lower else adapter < bar.min_score):
            word = "at most" if lower else "at least"
            missed.append(f"{bar.metric} {adapter:.4g} is not {word} {bar.min_score:g}")
        if bar.min_improvement is not None:
            base = scores.base if scores is not None else None
            if base is None:
                missed.append(f"{bar.metric} of the base model was not measured")
                continue
            gain = base - adapter if lower else adapter - base
            if gain < bar.min_improvement:
                missed.append(f"{bar.metric} improves on the base by {gain:+.4g}, less than {bar.min_improvement:g}")
    return missed


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
