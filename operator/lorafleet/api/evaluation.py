"""Task evaluation: what a FineTuneJob measures after training (base model and adapter on the same held-out
prompts), the quality bars a FineTuneJob or an AdapterDeployment requires, and the status that reports both.

One set of metric names serves the spec, the trainer's report, the adapter's manifest and the status
(lorafleet.contracts.evaluation); docs/evaluation.md defines each metric.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field

from lorafleet.api.common import ApiModel, DatasetFileFormat, DataUri, StatusModel

# Scores in [0, 1], higher is better, except evalLoss and perplexity (lower is better; see LOWER_IS_BETTER).
EvaluationMetric = Literal[
    "exactMatch",  # the answer equals the reference, after stripping surrounding whitespace
    "normalizedExactMatch",  # equal after lower-casing and removing punctuation, articles and extra spaces
    "contains",  # the normalised reference occurs in the normalised answer
    "rougeL",  # ROUGE-L F-measure (longest common subsequence of tokens), as the rouge-score package computes it
    "regexAccuracy",  # the last match of answerPattern in the answer equals the one in the reference
    "jsonValid",  # the answer parses as JSON
    "evalLoss",  # mean token cross-entropy of the reference given the prompt
    "perplexity",  # exp(evalLoss)
]
LOWER_IS_BETTER: frozenset[str] = frozenset({"evalLoss", "perplexity"})


def _default_metrics() -> list[EvaluationMetric]:
    return ["exactMatch", "rougeL"]


class GenerationSettings(ApiModel):
    """How answers are generated: the same settings for the base model and the adapter."""

    max_new_tokens: int = Field(default=64, ge=1, le=4096, description="Most tokens generated per answer.")
    stop: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list,
        max_length=8,
        description="Strings that end an answer (cut there), in addition to the end-of-sequence token.",
    )
    temperature: float = Field(
        default=0.0, ge=0, le=2, description="Sampling temperature; 0 (the default) decodes greedily: repeatable."
    )


class QualityBar(ApiModel):
    """A minimum the adapter must reach on one metric: an absolute score, an improvement over its base, or both."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.minScore) || has(self.minImprovement)",
                    "message": "a quality bar needs minScore, minImprovement or both",
                }
            ]
        }
    )

    metric: EvaluationMetric = Field(description="The metric the bar applies to.")
    min_score: float | None = Field(
        default=None,
        description="The adapter's score must be at least this (at most this for evalLoss and perplexity).",
    )
    min_improvement: float | None = Field(
        default=None,
        description="The adapter must beat its base model by at least this much on the metric (for evalLoss and "
        "perplexity: be lower by at least this much); 0 means no worse than the base.",
    )


class Evaluation(ApiModel):
    """Task evaluation after training: the base model and the adapter answer the same held-out prompts and both
    answers are scored. Results go into status.evaluation and the adapter's manifest."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.require) || self.require.all(b, b.metric in self.metrics)",
                    "message": "every metric in evaluation.require must also be listed in evaluation.metrics",
                }
            ]
        }
    )

    uri: DataUri | None = Field(
        default=None,
        description="A held-out file in the training dataset's format (s3:// or pvc://). Left out, the dataset's "
        "evalUri or evalSplit is used; with both, the samples of both are evaluated.",
    )
    file_format: DatasetFileFormat = Field(default="auto", description="File format of uri, as dataset.fileFormat.")
    prompt_template: str | None = Field(
        default=None,
        max_length=4096,
        description="The prompt, with {field} replaced by the sample's field of that name (only plain names; {{ "
        "and }} for literal braces). Left out, the prompt is built as in training: the chat template for chat "
        "data, the instruction format for instruction data, the prompt field for completion data.",
    )
    reference_field: str | None = Field(
        default=None,
        max_length=253,
        description="The field holding the expected answer. Left out: output (instruction), completion "
        "(completion), the last assistant message (chat).",
    )
    metrics: list[EvaluationMetric] = Field(
        default_factory=_default_metrics,
        min_length=1,
        max_length=8,
        description="Metrics computed for both the base model and the adapter.",
        # A schema default (the API server fills it in), so the CEL rule on require always sees a list.
        json_schema_extra={"x-kubernetes-list-type": "set", "default": ["exactMatch", "rougeL"]},
    )
    answer_pattern: str = Field(
        default=r"-?\d+(?:\.\d+)?",
        max_length=256,
        description="regexAccuracy: a Python regular expression; the last match in the answer is compared with the "
        "last match in the reference (by default: the last number).",
    )
    generation: GenerationSettings = Field(
        default_factory=GenerationSettings, description="Generation settings for both models."
    )
    max_examples: int = Field(
        default=200, ge=1, le=5000, description="Held-out samples evaluated (the first ones, in file order)."
    )
    sample_predictions: int = Field(
        default=32,
        ge=0,
        le=200,
        description="Predictions (prompt, reference, base and adapter answers) stored next to the adapter in "
        "evaluation/predictions.jsonl, for a person to read.",
    )
    require: list[QualityBar] = Field(
        default_factory=list,
        max_length=8,
        description="Bars the adapter must reach; if one is missed the FineTuneJob ends Failed with reason "
        "BelowQualityBar (the adapter is kept, marked as such in its manifest).",
    )


class MetricResult(StatusModel):
    """One metric for the base model and the adapter on the same examples."""

    name: str = Field(description="The metric.")
    base: float | None = Field(default=None, description="The base model's score.")
    adapter: float | None = Field(default=None, description="The adapter's score.")
    delta: float | None = Field(default=None, description="adapter - base.")
    examples: int | None = Field(default=None, description="Examples scored.")


class EvaluationStatus(StatusModel):
    """What the evaluation measured, and whether the adapter reached the bars."""

    metrics: list[MetricResult] = Field(default_factory=list, description="Each metric, base and adapter.")
    score: str | None = Field(
        default=None, description="The first metric as 'adapter (delta)', e.g. 'rougeL 0.81 (+0.42)'."
    )
    passed: bool | None = Field(default=None, description="Whether every required bar was reached.")
    message: str | None = Field(default=None, description="Which bar was missed, if one was.")
    predictions_uri: str | None = Field(default=None, description="Where the sample predictions are stored.")


class UsageStatus(StatusModel):
    """What the fine-tune used, for chargeback."""

    wall_seconds: float | None = Field(default=None, description="From the Job's start to its completion.")
    gpu_seconds: float | None = Field(default=None, description="GPUs requested x pods x wall seconds.")
    cpu_seconds: float | None = Field(default=None, description="CPUs requested x pods x wall seconds (CPU jobs).")
    tokens_trained: int | None = Field(default=None, description="Tokens the trainer processed (as it reports).")
    estimated_cost: str | None = Field(
        default=None,
        description="gpuSeconds (or cpuSeconds) x the operator's configured price per hour, e.g. '0.42 USD'; "
        "left out when no price is configured.",
    )
