"""The evaluation's metrics: pure functions of a generated answer and its reference. Free of torch.

Every generation metric scores one example 0 or 1 (rougeL: a fraction) and the metric is the mean over the examples
it scored, in [0, 1], higher is better:

* exactMatch: the answer equals the reference after stripping leading and trailing whitespace (case and
  punctuation count).
* normalizedExactMatch: equal after SQuAD's normalisation (`normalize`): lower-case, every ASCII punctuation
  character removed, the articles "a", "an", "the" removed as whole words, runs of whitespace collapsed to one
  space, leading and trailing whitespace removed.
* contains: the normalised reference occurs in the normalised answer as a run of whole words ("4" is in "it is
  4", not in "42"). An empty normalised reference is contained only in an empty normalised answer.
* rougeL: ROUGE-L F-measure, exactly as ``rouge_score.rouge_scorer.RougeScorer(["rougeL"])`` computes it without
  stemming: both texts lower-cased, every run of characters other than a-z and 0-9 made a separator (so text in
  other scripts has no tokens), then F = 2PR / (P + R) with P = LCS / answer tokens and R = LCS / reference
  tokens, LCS the longest common subsequence of tokens; 0 when either side has no token. Each side is cut to its
  first MAX_ROUGE_TOKENS tokens (the LCS costs the product of the lengths).
* regexAccuracy: the last match of evaluation.answerPattern in the answer equals the last match in the reference
  (the first capturing group when the pattern has one, else the whole match; both stripped). Examples whose
  reference has no match are not scored. Each side is searched in its last MAX_REGEX_INPUT characters, and one
  search may take at most REGEX_TIMEOUT seconds: a pattern that backtracks catastrophically on a reference is an
  error before training; on an answer it finds nothing, and after MAX_REGEX_TIMEOUTS such answers the metric is
  left unmeasured (None: a quality bar on it is missed).
* jsonValid: the stripped answer parses as JSON (any JSON value); the reference is not used.

The loss metrics come from the model (generate.py): evalLoss is the mean cross-entropy (natural log) over every
reference token of every example, each predicted from the prompt and the reference tokens before it (a token-
weighted mean, as the Trainer's eval loss); perplexity is exp(evalLoss). Lower is better for both.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lorafleet.api.evaluation import EvaluationMetric

GENERATION_METRICS: frozenset[str] = frozenset(
    {"exactMatch", "normalizedExactMatch", "contains", "rougeL", "regexAccuracy", "jsonValid"}
)
LOSS_METRICS: frozenset[str] = frozenset({"evalLoss", "perplexity"})
MAX_ROUGE_TOKENS = 1024
MAX_PATTERN = 256
MAX_REGEX_INPUT = 8192
REGEX_TIMEOUT = 0.5
MAX_REGEX_TIMEOUTS = 5

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


@dataclass(frozen=True)
class Score:
    """A metric's mean over the examples it scored (None when it scored none)."""

    value: float | None
    examples: int


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(answer: str, reference: str) -> float:
    return float(answer.strip() == reference.strip())


def normalized_exact_match(answer: str, reference: str) -> float:
    return float(normalize(answer) == normalize(reference))


def contains(answer: str, reference: str) -> float:
    expected, got = normalize(reference), normalize(answer)
    if not expected:
        return float(not got)
    return float(f" {expected} " in f" {got} ")


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's tokenizer without stemming: lower-case a-z0-9 words."""
    return [t for t in _NON_ALPHANUMERIC.sub(" ", text.lower()).split() if t][:MAX_ROUGE_TOKENS]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (one row of the dynamic programme at a time)."""
    if len(b) > len(a):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(answer: str, reference: str) -> float:
    predicted, target = rouge_tokens(answer), rouge_tokens(reference)
    if not predicted or not target:
        return 0.0
    common = lcs_length(target, predicted)
    precision, recall = common / len(predicted), common / len(target)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def json_valid(answer: str) -> float:
    try:
        json.loads(answer.strip())
    except (ValueError, RecursionError):
        return 0.0
    return 1.0


# -- regexAccuracy ---------------------------------------------------------------------------------------------


class PatternError(ValueError):
    """evaluation.answerPattern cannot be used (the message says why and what to do)."""


class AnswerPattern:
    """A tenant's answer pattern, compiled once; searches are bounded in input length and time."""

    def __init__(self, pattern: str) -> None:
        if len(pattern) > MAX_PATTERN:
            raise PatternError(f"evaluation.answerPattern is {len(pattern)} characters; at most {MAX_PATTERN}")
        self._engine = _regex_engine()
        try:
            self._compiled: Any = self._engine.compile(pattern)
        except Exception as e:  # re.error / regex.error
            raise PatternError(f"evaluation.answerPattern {pattern!r} is not a valid regular expression: {e}") from e
        self.pattern = pattern
        self.timeouts = 0

    def last(self, text: str) -> str | None:
        """The last match in text's last MAX_REGEX_INPUT characters (group 1 if the pattern has groups), stripped;
        None when nothing matches. TimeoutError when the search takes over REGEX_TIMEOUT seconds."""
        found = None
        for match in self._finditer(text[-MAX_REGEX_INPUT:]):
            found = match
        if found is None:
            return None
        value = found.group(1) if self._compiled.groups else found.group(0)
        return (value or "").strip()

    def _finditer(self, text: str) -> Any:
        if self._engine is re:
            return self._compiled.finditer(text)
        return self._compiled.finditer(text, timeout=REGEX_TIMEOUT)


def _regex_engine() -> Any:
    """The `regex` package (a dependency of transformers): it bounds a search's time. Without it, `re` (searches
    are bounded in input length only)."""
    try:
        import regex

        return regex
    except ImportError:  # pragma: no cover - the trainer image has it
        return re


def regex_match(pattern: AnswerPattern, answer: str, reference: str) -> float | None:
    """1.0 when the answers' last matches agree, 0.0 when not, None when the reference has no match."""
    try:
        expected = pattern.last(reference)
        if expected is None:
            return None
        got = pattern.last(answer)
    except TimeoutError:
        pattern.timeouts += 1
        return 0.0
    return float(got == expected)


# -- aggregation -----------------------------------------------------------------------------------------------

_PAIRWISE: dict[str, Callable[[str, str], float]] = {
    "exactMatch": exact_match,
    "normalizedExactMatch": normalized_exact_match,
    "contains": contains,
    "rougeL": rouge_l,
    "jsonValid": lambda answer, _reference: json_valid(answer),
}


def score(
    metric: EvaluationMetric,
    answers: Sequence[str],
    references: Sequence[str],
    pattern: AnswerPattern | None = None,
) -> Score:
    """The mean of a generation metric over the examples; regexAccuracy needs the pattern."""
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    if metric == "regexAccuracy":
        if pattern is None:
            raise ValueError("regexAccuracy needs the answer pattern")
        values = []
        for answer, reference in zip(answers, references, strict=True):
            value = regex_match(pattern, answer, reference)
            if pattern.timeouts > MAX_REGEX_TIMEOUTS:
                return Score(None, 0)
            if value is not None:
                values.append(value)
    elif metric in _PAIRWISE:
        function = _PAIRWISE[metric]
        values = [function(a, r) for a, r in zip(answers, references, strict=True)]
    else:
        raise ValueError(f"{metric} is not a generation metric")
    return Score(sum(values) / len(values) if values else None, len(values))


def perplexity(eval_loss: float | None) -> float | None:
    """exp(evalLoss); None when the loss is unknown or the exponential overflows."""
    if eval_loss is None:
        return None
    try:
        return math.exp(eval_loss)
    except OverflowError:
        return None
