"""Held-out samples as (prompt, reference) pairs. Free of torch.

The prompt, in this order:

* evaluation.promptTemplate: the template with each ``{name}`` replaced by the sample's field ``name`` (a string
  as it is; a number, boolean, array or object as JSON). Only plain names are replaced (letters, digits, ``_`` and
  ``-``; the first not a digit or ``-``); ``{{`` and ``}}`` are literal braces; anything else in braces
  (``{0.__class__}``, ``{a[0]}``, ``{}``) or a lone brace is refused before training. The template is never
  given to str.format. The text is tokenized with the tokenizer's special tokens (a BOS where the model has one).
* otherwise as in training (lorafleet.trainer.data): chat: the conversation up to its last assistant message,
  through the chat template with the generation prompt; instruction: the user turn through the chat template
  (generation prompt) when the tokenizer has one, else the Alpaca prompt; completion: the prompt field. Format
  text has no prompt: it needs promptTemplate and referenceField.

The reference: the field evaluation.referenceField (a string, or a number as JSON), otherwise output (instruction),
completion (completion), or the content of the last assistant message (chat). References are cut to
MAX_REFERENCE_CHARS characters.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lorafleet.api.evaluation import Evaluation
from lorafleet.api.finetunejob import Dataset
from lorafleet.trainer.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_WITH_INPUT,
    Errors,
    SampleError,
    Tokenizer,
    apply_template,
    parse_record,
)
from lorafleet.trainer.readers import json_type

MAX_REFERENCE_CHARS = 16384
# {{, }}, {anything without braces}, or a lone brace; a plain name is checked separately.
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,252}$")


class TemplateError(ValueError):
    """evaluation.promptTemplate cannot be used (the message names the problem and the fix)."""


@dataclass(frozen=True)
class EvalExample:
    """One held-out sample: the prompt text, how to tokenize it, the reference answer, and where it came from."""

    prompt: str
    reference: str
    add_special_tokens: bool
    source: str
    line: int


class PromptTemplate:
    """A tenant's template, parsed once into literal text and field names."""

    def __init__(self, template: str) -> None:
        self.parts: list[tuple[str, bool]] = []  # (text, is_field)
        position = 0
        for match in _TOKEN.finditer(template):
            self._literal(template[position : match.start()])
            token, inner = match.group(0), match.group(1)
            if token in ("{{", "}}"):
                self._literal(token[0])
            elif inner is not None and _NAME.match(inner):
                self.parts.append((inner, True))
            elif inner is not None:
                raise TemplateError(
                    f"evaluation.promptTemplate: {{{inner[:40]}}} is not a plain field name: only {{name}} (letters, "
                    "digits, _ and -) is replaced; write {{ and }} for literal braces"
                )
            else:
                raise TemplateError(
                    f"evaluation.promptTemplate: a lone {token!r} at character {match.start() + 1}: write {token * 2} "
                    "for a literal brace"
                )
            position = match.end()
        self._literal(template[position:])

    def _literal(self, text: str) -> None:
        if text:
            self.parts.append((text, False))

    @property
    def fields(self) -> list[str]:
        return [text for text, is_field in self.parts if is_field]

    def fill(self, record: Mapping[str, Any]) -> str:
        """The template with the record's fields in; SampleError naming a missing field."""
        out = []
        for text, is_field in self.parts:
            if not is_field:
                out.append(text)
                continue
            if record.get(text) is None:
                present = ", ".join(sorted(str(k) for k in record)[:10])
                raise SampleError(
                    f'missing field "{text}" used by evaluation.promptTemplate (the sample has: {present})'
                )
            out.append(_text(record[text]))
        return "".join(out)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def check_spec(spec: Evaluation, dataset: Dataset) -> PromptTemplate | None:
    """The parsed template; TemplateError when the spec cannot give prompts or references for the format."""
    template = PromptTemplate(spec.prompt_template) if spec.prompt_template is not None else None
    if dataset.format == "text" and (template is None or spec.reference_field is None):
        raise TemplateError(
            "evaluation of a dataset of format text needs evaluation.promptTemplate and evaluation.referenceField "
            "(a text sample has no prompt or answer of its own)"
        )
    return template


@dataclass(frozen=True)
class HeldOutRecord:
    """A record of a held-out file: its file's URI, the unit its number counts (line or record), the number."""

    uri: str
    unit: str
    number: int
    record: Mapping[str, Any]


def build_examples(
    records: Iterable[HeldOutRecord],
    spec: Evaluation,
    dataset: Dataset,
    tokenizer: Tokenizer,
    template: PromptTemplate | None,
) -> tuple[list[EvalExample], Errors]:
    """The examples of the first spec.max_examples records; the bad records in Errors (the caller raises them as
    DatasetInvalid)."""
    errors = Errors("sample")
    examples: list[EvalExample] = []
    for held in records:
        if len(examples) + errors.count >= spec.max_examples:
            break
        try:
            examples.append(example(held.record, spec, dataset, tokenizer, template, held.uri, held.number))
        except SampleError as e:
            errors.add(0, f"{held.uri} {held.unit} {held.number}: {e}")
    return examples, errors


def example(
    record: Mapping[str, Any],
    spec: Evaluation,
    dataset: Dataset,
    tokenizer: Tokenizer,
    template: PromptTemplate | None,
    source: str = "",
    line: int = 0,
) -> EvalExample:
    """One record as an example; SampleError when it lacks what the prompt or the reference needs."""
    if template is not None and spec.reference_field is not None:  # the training fields need not be there
        reference = _field(record, spec.reference_field, "evaluation.referenceField")
        return EvalExample(template.fill(record), reference[:MAX_REFERENCE_CHARS], True, source, line)
    default_prompt, special, default_reference = _as_trained(record, dataset, tokenizer, need_prompt=template is None)
    if spec.reference_field is not None:
        reference = _field(record, spec.reference_field, "evaluation.referenceField")
    elif default_reference is not None:
        reference = default_reference
    else:  # pragma: no cover - check_spec refuses text without referenceField
        raise SampleError("no reference answer: set evaluation.referenceField")
    if template is not None:
        prompt, special = template.fill(record), True
    else:
        prompt = default_prompt
    return EvalExample(prompt, reference[:MAX_REFERENCE_CHARS], special, source, line)


def _field(record: Mapping[str, Any], name: str, setting: str) -> str:
    value = record.get(name)
    if value is None:
        raise SampleError(f'missing field "{name}" named by {setting}')
    if isinstance(value, dict | list):
        raise SampleError(f'field "{name}" named by {setting} must be a string or a number, got {json_type(value)}')
    return _text(value)


def _as_trained(
    record: Mapping[str, Any], dataset: Dataset, tokenizer: Tokenizer, *, need_prompt: bool
) -> tuple[str, bool, str | None]:
    """(prompt, add_special_tokens, reference) as training renders the sample; the prompt only when needed, so a
    template may evaluate records whose training fields are absent."""
    if dataset.format == "text":
        return "", True, None
    sample = parse_record(record, dataset)
    if dataset.format == "chat":
        messages = list(sample.messages)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = apply_template(tokenizer, messages[:last], add_generation_prompt=True) if need_prompt else ""
        return prompt, False, messages[last]["content"]
    if sample.instruction is not None:
        instruction, extra = sample.instruction
        if not need_prompt:
            return "", True, sample.completion
        if tokenizer.chat_template:
            user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
            prompt = apply_template(tokenizer, [{"role": "user", "content": user}], add_generation_prompt=True)
            return prompt, False, sample.completion
        if extra.strip():
            return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=extra), True, sample.completion
        return ALPACA_PROMPT.format(instruction=instruction), True, sample.completion
    return sample.prompt, True, sample.completion
