"""Datasets: records in four sample formats, validated with line or record numbers, rendered to text and tokenized
with a loss mask. Files (JSON Lines, JSON arrays, CSV, Parquet, saved Hugging Face datasets) are read by readers.py.

Formats (field names can be mapped with dataset.fields, chat role names with dataset.roles):

* chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` rendered with the
  tokenizer's chat template; with completion-only loss every assistant turn is trained. ShareGPT's shape,
  ``{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}``, is read too (when the fields are
  not mapped): ``human`` is user and ``gpt`` assistant, and dataset.roles maps any other name.
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

import random
from collections.abc import Iterable, Iterator, Mapping
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
from lorafleet.trainer.readers import MAX_LINE_BYTES, FileError, FileFormat, RecordFile, Row, json_type, open_records

IGNORE_INDEX = -100
CHAT_ROLES = ("system", "user", "assistant")
# ShareGPT's role names (Vicuna's files); dataset.roles adds to them and overrides them.
DEFAULT_ROLES = {"human": "user", "gpt": "assistant"}
# ShareGPT's field names, read when a chat record or message lacks the (unmapped) default ones.
SHAREGPT_FIELDS = {"messages": "conversations", "role": "from", "content": "value"}
# Errors listed in a DatasetInvalid message before "and N more".
MAX_LISTED_ERRORS = 5
__all__ = ["MAX_LINE_BYTES", "Example", "LoadReport", "Sample", "load_examples", "open_dataset", "read_jsonl"]

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


class Tokenizer(Protocol):
    """What we use of a transformers tokenizer."""

    eos_token_id: int | None
    chat_template: str | None

    def __call__(self, text: str, **kwargs: Any) -> Any: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


class SampleError(ValueError):
    """A problem with one record, reported with its line or record number."""


@dataclass(frozen=True)
class Rendered:
    """One sample as text: the spans (character ranges) that are trained on, and how to tokenize it."""

    text: str
    spans: tuple[tuple[int, int], ...]
    add_special_tokens: bool
    append_eos: bool


@dataclass(frozen=True)
class Example:
    """One tokenized sample: input ids and labels (IGNORE_INDEX where no loss is taken); line is its line or
    record number."""

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
    records: int = 0  # well-formed records read
    unit: str = "line"  # what the numbers below count: line (JSON Lines, CSV) or record
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


class Errors:
    """The bad records of a file: the first few (listed in DatasetInvalid) and how many in all."""

    def __init__(self, unit: str) -> None:
        self.unit = unit
        self.first: list[str] = []
        self.count = 0

    def add(self, number: int, message: str) -> None:
        self.count += 1
        if len(self.first) < MAX_LISTED_ERRORS:
            self.first.append(f"{self.unit} {number}: {message}" if number else message)

    def raise_if_any(self, name: str) -> None:
        if not self.count:
            return
        listed = "; ".join(self.first)
        more = f"; and {self.count - len(self.first)} more" if self.count > len(self.first) else ""
        bad = f"{self.count} invalid {self.unit}{'s' * (self.count != 1)}"
        raise TrainerError(DATASET_INVALID, f"dataset {name}: {bad}: {listed}{more}")


def open_dataset(path: str | Path, file_format: FileFormat, name: str) -> RecordFile:
    """The dataset's records, streamed; DatasetNotFound when the file is missing or unreadable, DatasetInvalid
    when it is not the format at all."""
    try:
        return open_records(path, file_format)
    except FileNotFoundError:
        raise TrainerError(DATASET_NOT_FOUND, f"dataset {name} does not exist") from None
    except FileError as e:
        raise TrainerError(DATASET_INVALID, f"dataset {name}: {e}") from None
    except OSError as e:
        raise TrainerError(DATASET_NOT_FOUND, f"dataset {name} cannot be read: {e.strerror or e}") from None


def read_records(
    path: str | Path, *, uri: str | None = None, file_format: FileFormat = "auto"
) -> list[tuple[int, dict[str, Any]]]:
    """(line or record number, object) for every record; DatasetInvalid listing the bad ones."""
    name = uri or str(path)
    source = open_dataset(path, file_format, name)
    errors = Errors(source.unit)
    records = []
    for row in _rows(source, name):
        if row.error is not None:
            errors.add(row.number, row.error)
        elif row.value is not None:
            records.append((row.number, row.value))
    errors.raise_if_any(name)
    return records


def stream_records(
    path: str | Path, *, uri: str | None = None, file_format: FileFormat = "auto"
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line or record number, object) for each record, read lazily; DatasetInvalid at the first bad one."""
    name = uri or str(path)
    source = open_dataset(path, file_format, name)
    for row in _rows(source, name):
        if row.error is not None:
            raise TrainerError(DATASET_INVALID, f"dataset {name}: {source.where(row.number)}: {row.error}")
        if row.value is not None:
            yield row.number, row.value


def read_jsonl(path: str | Path, *, uri: str | None = None) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSON Lines file; DatasetInvalid listing the bad lines."""
    return read_records(path, uri=uri, file_format="jsonl")


def _rows(source: RecordFile, name: str) -> Iterator[Row]:
    """The file's rows; an I/O error midway is DatasetNotFound (the file changed or went away)."""
    try:
        yield from source.rows
    except OSError as e:
        raise TrainerError(DATASET_NOT_FOUND, f"dataset {name} cannot be read: {e.strerror or e}") from None


def _string(record: Mapping[str, Any], key: str, *, required: bool = True, where: str = "") -> str:
    if key not in record or record[key] is None:
        if required:
            raise SampleError(f'missing field "{key}"{where}')
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise SampleError(f'field "{key}"{where} must be a string, got {json_type(value)}')
    if required and not value.strip():
        raise SampleError(f'field "{key}"{where} is empty')
    return value


# -- parsing -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """A validated record: chat messages (chat, and instruction when the tokenizer has a template), or a prompt and
    the completion trained after it (instruction without a template: the Alpaca prompt; text: no prompt)."""

    messages: tuple[dict[str, str], ...] = ()
    prompt: str = ""
    completion: str = ""
    instruction: tuple[str, str] | None = None  # instruction, input: rendered as chat or as the Alpaca prompt


def role_names(dataset: Dataset) -> dict[str, str]:
    """Source role name -> system, user or assistant: the chat roles themselves, ShareGPT's, then the spec's."""
    return {**{role: role for role in CHAT_ROLES}, **DEFAULT_ROLES, **dict(getattr(dataset, "roles", None) or {})}


def _field(record: Mapping[str, Any], configured: str, default: str) -> str:
    """The configured field name, or ShareGPT's when the name is the unmapped default and only ShareGPT's is there."""
    if configured == default and default not in record and SHAREGPT_FIELDS[default] in record:
        return SHAREGPT_FIELDS[default]
    return configured


def parse_messages(
    record: Mapping[str, Any], fields: FieldMapping, roles: Mapping[str, str] | None = None
) -> list[dict[str, str]]:
    """The messages of a chat record (OpenAI's or ShareGPT's shape), as [{"role", "content"}], validated."""
    roles = roles if roles is not None else {**{r: r for r in CHAT_ROLES}, **DEFAULT_ROLES}
    key = _field(record, fields.messages, "messages")
    if key not in record:
        raise SampleError(f'missing field "{fields.messages}"')
    raw = record[key]
    if not isinstance(raw, list):
        raise SampleError(f'field "{key}" must be an array of messages, got {json_type(raw)}')
    if not raw:
        raise SampleError(f'field "{key}" is empty')
    messages = []
    for index, message in enumerate(raw, start=1):
        where = f" in message {index}"
        if not isinstance(message, dict):
            raise SampleError(f"message {index} must be an object, got {json_type(message)}")
        name = _string(message, _field(message, fields.role, "role"), where=where)
        role = roles.get(name)
        if role not in CHAT_ROLES:
            raise SampleError(
                f'message {index} has unknown role "{name}" (expected system, user, assistant, or a name mapped by '
                f"dataset.roles such as {{{name}: assistant}}; human and gpt are mapped by default)"
            )
        content = _string(message, _field(message, fields.content, "content"), required=False, where=where)
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise SampleError("no assistant message: nothing to learn from")
    return messages


def parse_record(record: Mapping[str, Any], dataset: Dataset) -> Sample:
    """The sample a record of the dataset's format holds; SampleError naming the field when it is bad."""
    fields = dataset.fields
    if dataset.format == "chat":
        return Sample(messages=tuple(parse_messages(record, fields, role_names(dataset))))
    if dataset.format == "instruction":
        instruction = _string(record, fields.instruction)
        extra = _string(record, fields.input, required=False)
        return Sample(completion=_string(record, fields.output), instruction=(instruction, extra))
    if dataset.format == "completion":
        prompt = _string(record, fields.prompt, required=False)
        return Sample(prompt=prompt, completion=_string(record, fields.completion))
    return Sample(completion=_string(record, fields.text))


# -- rendering ---------------------------------------------------------------------------------------------------


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, str]], *, completion_only: bool) -> Rendered:
    text = apply_template(tokenizer, messages, add_generation_prompt=False)
    if not completion_only:
        return Rendered(text, ((0, len(text)),), add_special_tokens=False, append_eos=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            before = apply_template(tokenizer, messages[:index], add_generation_prompt=True)
        except SampleError:
            if index:
                raise
            before = ""  # a template that refuses an empty conversation
        through = apply_template(tokenizer, messages[: index + 1], add_generation_prompt=False)
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


def apply_template(tokenizer: Tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2 errors: templates refuse conversations with raise_exception()
        raise SampleError(f"the chat template refused this conversation: {e}") from e
    if not isinstance(text, str):
        raise SampleError("the chat template did not render to text")
    return text


def render(record: Mapping[str, Any], dataset: Dataset, tokenizer: Tokenizer, *, completion_only: bool) -> Rendered:
    """Render one record of the dataset's format; SampleError for a bad record."""
    return render_sample(parse_record(record, dataset), dataset, tokenizer, completion_only=completion_only)


def render_sample(sample: Sample, dataset: Dataset, tokenizer: Tokenizer, *, completion_only: bool) -> Rendered:
    if dataset.format == "chat":
        if not tokenizer.chat_template:
            raise TrainerError(
                CHAT_TEMPLATE_UNSUPPORTED,
                "dataset format chat needs a tokenizer with a chat template; the base model's has none "
                "(use format completion or instruction)",
            )
        return render_chat(tokenizer, list(sample.messages), completion_only=completion_only)
    if sample.instruction is not None:
        instruction, extra = sample.instruction
        if tokenizer.chat_template:
            user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": sample.completion}]
            return render_chat(tokenizer, messages, completion_only=completion_only)
        if extra.strip():
            prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=extra)
        else:
            prompt = ALPACA_PROMPT.format(instruction=instruction)
        return _prompt_completion(prompt, sample.completion, completion_only)
    if dataset.format == "completion":
        return _prompt_completion(sample.prompt, sample.completion, completion_only)
    text = sample.completion
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
    """Every valid sample of a dataset file, tokenized and fitted. DatasetInvalid with line or record numbers when
    any record is bad, DatasetEmpty when nothing is left to train on."""
    name = uri or str(path)
    source = open_dataset(path, getattr(dataset, "file_format", "auto"), name)
    examples, report = build_examples(
        _rows(source, name), dataset, tokenizer, max_length, completion_only, name, source.unit
    )
    if not examples:
        raise TrainerError(DATASET_EMPTY, _empty_message(name, report, dataset.overlong, max_length))
    return examples, report


def build_examples(
    rows: Iterable[Row],
    dataset: Dataset,
    tokenizer: Tokenizer,
    max_length: int,
    completion_only: bool,
    name: str,
    unit: str = "line",
) -> tuple[list[Example], LoadReport]:
    """Render, tokenize and fit every record; DatasetInvalid listing the first bad ones (with their numbers)."""
    report = LoadReport(unit=unit)
    errors = Errors(unit)
    examples: list[Example] = []
    for row in rows:
        if row.error is not None or row.value is None:
            errors.add(row.number, row.error or "no record")
            continue
        report.records += 1
        try:
            rendered = render(row.value, dataset, tokenizer, completion_only=completion_only)
        except SampleError as e:
            errors.add(row.number, str(e))
            continue
        if errors.count:
            continue  # keep validating, stop tokenizing
        example = tokenize(rendered, tokenizer, row.number)
        fitted = fit(example, max_length, dataset.overlong)
        if fitted is None:
            report.dropped_overlong.append(row.number)
            continue
        if fitted is not example:
            report.truncated.append(row.number)
        if fitted.trained_tokens == 0:
            # Nothing to learn (a prompt as long as the limit): a batch of such samples has no loss at all.
            report.dropped_untrained.append(row.number)
            continue
        examples.append(fitted)
        report.tokens += len(fitted)
        report.trained_tokens += fitted.trained_tokens
    errors.raise_if_any(name)
    report.samples = len(examples)
    return examples, report


def _empty_message(name: str, report: LoadReport, overlong: str, max_length: int) -> str:
    if report.records == 0:
        return f"dataset {name} has no samples (the file is empty or blank)"
    parts = []
    unit = report.unit
    if report.dropped_overlong:
        parts.append(
            f"{len(report.dropped_overlong)} longer than training.maxSequenceLength={max_length} tokens "
            f"(dataset.overlong: {overlong}; first at {unit} {report.dropped_overlong[0]})"
        )
    if report.dropped_untrained:
        parts.append(
            f"{len(report.dropped_untrained)} with no trained token left after truncation to {max_length} "
            f"(first at {unit} {report.dropped_untrained[0]})"
        )
    return f"dataset {name} has no usable sample: of {report.records}, " + "; ".join(parts)


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
