"""Datasets: JSON Lines in four formats, validated with line numbers, rendered to text and tokenized with a loss mask.

Formats (field names can be mapped with dataset.fields):

* chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` rendered with the
  tokenizer's chat template; with completion-only loss only the assistant turns are trained.
* instruction: ``{"instruction": str, "input": str (optional), "output": str}``: a user turn and an assistant
  turn through the chat template when the tokenizer has one, else an Alpaca-style prompt; the output is trained.
* completion: ``{"prompt": str, "completion": str}``: the completion (and EOS) is trained.
* text: ``{"text": str}``: everything is trained.

The loss mask is computed on characters and carried to tokens through the tokenizer's offsets, so it does not
depend on how a tokenizer merges across the prompt/answer boundary. For chat, an assistant turn's characters are
those the template adds between rendering the conversation up to the turn with a generation prompt and rendering
it with the turn: the answer and the template's end-of-turn marker, so the model learns to stop.

Free of torch: the tokenizer is any transformers tokenizer (duck-typed).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from lorafleet.api.finetunejob import Dataset, FieldMapping
from lorafleet.trainer.errors import (
    CHAT_TEMPLATE_UNSUPPORTED,
    DATASET_EMPTY,
    DATASET_INVALID,
    DATASET_NOT_FOUND,
    TrainerError,
)

IGNORE_INDEX = -100
CHAT_ROLES = ("system", "user", "assistant")
# Errors listed in a DatasetInvalid message before "and N more".
MAX_LISTED_ERRORS = 5

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


class Tokenizer(Protocol):
    """What we use of a transformers tokenizer."""

    eos_token_id: int | None
    chat_template: str | None

    def __call__(self, text: str, **kwargs: Any) -> Any: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


class SampleError(ValueError):
    """A problem with one line, reported with its line number."""


@dataclass(frozen=True)
class Rendered:
    """One sample as text: the spans (character ranges) that are trained on, and how to tokenize it."""

    text: str
    spans: tuple[tuple[int, int], ...]
    add_special_tokens: bool
    append_eos: bool


@dataclass(frozen=True)
class Example:
    """One tokenized sample: input ids and labels (IGNORE_INDEX where no loss is taken)."""

    line: int
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    def features(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "labels": self.labels}


@dataclass
class LoadReport:
    """What loading a file did: counts for the log and the lineage manifest."""

    samples: int = 0
    truncated: list[int] = field(default_factory=list)
    dropped_overlong: list[int] = field(default_factory=list)
    dropped_untrained: list[int] = field(default_factory=list)
    tokens: int = 0
    trained_tokens: int = 0

    def summary(self) -> dict[str, int]:
        return {
            "samples": self.samples,
            "truncated": len(self.truncated),
            "droppedOverlong": len(self.dropped_overlong),
            "droppedUntrained": len(self.dropped_untrained),
            "tokens": self.tokens,
            "trainedTokens": self.trained_tokens,
        }


# -- reading -----------------------------------------------------------------------------------------------------


def read_jsonl(path: str | Path, *, uri: str | None = None) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; DatasetInvalid listing the bad lines."""
    name = uri or str(path)
    records, errors = _read_lines(path, name)
    raise_if_errors(name, errors)
    return records


def _read_lines(path: str | Path, name: str) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise TrainerError(DATASET_NOT_FOUND, f"dataset {name} does not exist") from None
    except OSError as e:
        raise TrainerError(DATASET_NOT_FOUND, f"dataset {name} cannot be read: {e.strerror or e}") from None
    records: list[tuple[int, dict[str, Any]]] = []
    errors: list[str] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            errors.append(f"line {number}: not UTF-8 (byte {e.start})")
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            errors.append(f"line {number}: invalid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(value, dict):
            errors.append(f"line {number}: expected a JSON object, got {_json_type(value)}")
            continue
        records.append((number, value))
    return records, errors


def raise_if_errors(name: str, errors: Sequence[str]) -> None:
    if not errors:
        return
    listed = "; ".join(errors[:MAX_LISTED_ERRORS])
    more = f"; and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
    bad = f"{len(errors)} invalid line{'s' * (len(errors) != 1)}"
    raise TrainerError(DATASET_INVALID, f"dataset {name}: {bad}: {listed}{more}")


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return {list: "an array", str: "a string", int: "a number", float: "a number", dict: "an object"}.get(
        type(value), type(value).__name__
    )


def _string(record: dict[str, Any], key: str, *, required: bool = True, where: str = "") -> str:
    if key not in record or record[key] is None:
        if required:
            raise SampleError(f'missing field "{key}"{where}')
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise SampleError(f'field "{key}"{where} must be a string, got {_json_type(value)}')
    if required and not value.strip():
        raise SampleError(f'field "{key}"{where} is empty')
    return value


# -- rendering ---------------------------------------------------------------------------------------------------


def parse_messages(record: dict[str, Any], fields: FieldMapping) -> list[dict[str, str]]:
    """The messages of a chat record, as [{"role", "content"}], validated."""
    if fields.messages not in record:
        raise SampleError(f'missing field "{fields.messages}"')
    raw = record[fields.messages]
    if not isinstance(raw, list):
        raise SampleError(f'field "{fields.messages}" must be an array of messages, got {_json_type(raw)}')
    if not raw:
        raise SampleError(f'field "{fields.messages}" is empty')
    messages = []
    for index, message in enumerate(raw, start=1):
        where = f" in message {index}"
        if not isinstance(message, dict):
            raise SampleError(f"message {index} must be an object, got {_json_type(message)}")
        role = _string(message, fields.role, where=where)
        if role not in CHAT_ROLES:
            raise SampleError(f'message {index} has unknown role "{role}" (expected {", ".join(CHAT_ROLES)})')
        content = _string(message, fields.content, required=False, where=where)
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise SampleError("no assistant message: nothing to learn from")
    return messages


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, str]], *, completion_only: bool) -> Rendered:
    text = _apply_template(tokenizer, messages, add_generation_prompt=False)
    if not completion_only:
        return Rendered(text, ((0, len(text)),), add_special_tokens=False, append_eos=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            before = _apply_template(tokenizer, messages[:index], add_generation_prompt=True)
        except SampleError:
            if index:
                raise
            before = ""  # a template that refuses an empty conversation
        through = _apply_template(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise TrainerError(
                CHAT_TEMPLATE_UNSUPPORTED,
                "the tokenizer's chat template renders earlier turns differently once later turns are added, so "
                "the assistant turns cannot be located for completion-only loss; set "
                "training.completionOnlyLoss: false or use a base model with a prefix-stable template",
            )
        if len(through) > len(before):
            spans.append((len(before), len(through)))
    return Rendered(text, tuple(spans), add_special_tokens=False, append_eos=False)


def _apply_template(tokenizer: Tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2 errors: templates refuse conversations with raise_exception()
        raise SampleError(f"the chat template refused this conversation: {e}") from e
    if not isinstance(text, str):
        raise SampleError("the chat template did not render to text")
    return text


def render(record: dict[str, Any], dataset: Dataset, tokenizer: Tokenizer, *, completion_only: bool) -> Rendered:
    """Render one record of the dataset's format; SampleError for a bad record."""
    fields = dataset.fields
    if dataset.format == "chat":
        if not tokenizer.chat_template:
            raise TrainerError(
                CHAT_TEMPLATE_UNSUPPORTED,
                "dataset format chat needs a tokenizer with a chat template; the base model's has none "
                "(use format completion or instruction)",
            )
        return render_chat(tokenizer, parse_messages(record, fields), completion_only=completion_only)
    if dataset.format == "instruction":
        instruction = _string(record, fields.instruction)
        extra = _string(record, fields.input, required=False)
        output = _string(record, fields.output)
        if tokenizer.chat_template:
            user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
            return render_chat(tokenizer, messages, completion_only=completion_only)
        if extra.strip():
            prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=extra)
        else:
            prompt = ALPACA_PROMPT.format(instruction=instruction)
        return _prompt_completion(prompt, output, completion_only)
    if dataset.format == "completion":
        prompt = _string(record, fields.prompt, required=False)
        completion = _string(record, fields.completion)
        return _prompt_completion(prompt, completion, completion_only)
    text = _string(record, fields.text)
    return Rendered(text, ((0, len(text)),), add_special_tokens=True, append_eos=True)


def _prompt_completion(prompt: str, completion: str, completion_only: bool) -> Rendered:
    text = prompt + completion
    start = len(prompt) if completion_only else 0
    return Rendered(text, ((start, len(text)),), add_special_tokens=True, append_eos=True)


# -- tokenizing --------------------------------------------------------------------------------------------------


def tokenize(rendered: Rendered, tokenizer: Tokenizer, line: int = 0) -> Example:
    """Input ids and labels: a token is trained when its characters overlap a trained span."""
    encoded = tokenizer(
        rendered.text, add_special_tokens=rendered.add_special_tokens, return_offsets_mapping=True, truncation=False
    )
    ids: list[int] = list(encoded["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in encoded["offset_mapping"]]
    labels = []
    for token, (start, end) in zip(ids, offsets, strict=True):
        trained = end > start and any(start < b and end > a for a, b in rendered.spans)
        labels.append(token if trained else IGNORE_INDEX)
    eos = tokenizer.eos_token_id
    if rendered.append_eos and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        labels.append(eos if rendered.spans else IGNORE_INDEX)
    return Example(line, ids, labels)


def fit(example: Example, max_length: int, overlong: Literal["truncate", "drop"]) -> Example | None:
    """The example cut to max_length tokens (truncate) or None (drop) when longer."""
    if len(example) <= max_length:
        return example
    if overlong == "drop":
        return None
    return Example(example.line, example.input_ids[:max_length], example.labels[:max_length])


def load_examples(
    path: str | Path,
    dataset: Dataset,
    tokenizer: Tokenizer,
    *,
    max_length: int,
    completion_only: bool,
    uri: str | None = None,
) -> tuple[list[Example], LoadReport]:
    """Every valid sample of a JSONL file, tokenized and fitted. DatasetInvalid with line numbers when any line
    is bad, DatasetEmpty when nothing is left to train on."""
    name = uri or str(path)
    records, errors = _read_lines(path, name)
    examples, report = build_examples(records, dataset, tokenizer, max_length, completion_only, name, errors)
    if not examples:
        raise TrainerError(DATASET_EMPTY, _empty_message(name, len(records), report, dataset.overlong, max_length))
    return examples, report


def build_examples(
    records: Iterable[tuple[int, dict[str, Any]]],
    dataset: Dataset,
    tokenizer: Tokenizer,
    max_length: int,
    completion_only: bool,
    name: str,
    errors: list[str] | None = None,
) -> tuple[list[Example], LoadReport]:
    """Render, tokenize and fit every record; DatasetInvalid listing every bad line (with earlier errors)."""
    report = LoadReport()
    errors = list(errors or [])
    examples: list[Example] = []
    for line, record in records:
        try:
            rendered = render(record, dataset, tokenizer, completion_only=completion_only)
        except SampleError as e:
            errors.append(f"line {line}: {e}")
            continue
        if errors:
            continue  # keep validating, stop tokenizing
        example = tokenize(rendered, tokenizer, line)
        fitted = fit(example, max_length, dataset.overlong)
        if fitted is None:
            report.dropped_overlong.append(line)
            continue
        if fitted is not example:
            report.truncated.append(line)
        if fitted.trained_tokens == 0:
            # Nothing to learn (a prompt as long as the limit): a batch of such samples has no loss at all.
            report.dropped_untrained.append(line)
            continue
        examples.append(fitted)
        report.tokens += len(fitted)
        report.trained_tokens += fitted.trained_tokens
    raise_if_errors(name, sorted(errors, key=_line_of))
    report.samples = len(examples)
    return examples, report


def _line_of(error: str) -> int:
    head = error.split(":", 1)[0]
    return int(head.removeprefix("line ")) if head.startswith("line ") and head[5:].isdigit() else 0


def _empty_message(name: str, records: int, report: LoadReport, overlong: str, max_length: int) -> str:
    if records == 0:
        return f"dataset {name} has no samples (the file is empty or blank)"
    parts = []
    if report.dropped_overlong:
        parts.append(
            f"{len(report.dropped_overlong)} longer than training.maxSequenceLength={max_length} tokens "
            f"(dataset.overlong: {overlong}; first at line {report.dropped_overlong[0]})"
        )
    if report.dropped_untrained:
        parts.append(
            f"{len(report.dropped_untrained)} with no trained token left after truncation to {max_length} "
            f"(first at line {report.dropped_untrained[0]})"
        )
    return f"dataset {name} has no usable sample: of {records}, " + "; ".join(parts)


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded random split: (train, eval), at least one sample in each."""
    if len(examples) < 2:
        raise TrainerError(
            DATASET_EMPTY, f"dataset.evalSplit needs at least 2 samples, the dataset has {len(examples)}"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    held = set(order[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in held]
    evaluation = [e for i, e in enumerate(examples) if i in held]
    return train, evaluation
