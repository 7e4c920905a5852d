"""A tenant's prompt template replaces only plain {name} fields with the sample's values and is never given to
str.format: attribute, index and format-spec fields ({0.__class__}, {a[0]}, {x!r}) and lone braces are refused
before training with an error naming evaluation.promptTemplate; a sample lacking a field is a per-sample error
naming the field; references come from referenceField or the format's answer field, capped in length.

The default prompts that need a tokenizer (chat template, instruction) are pinned in tests/trainer/test_evaluation.py
with the real tiny tokenizer."""

from __future__ import annotations

from typing import Any

import pytest

from lorafleet.api.evaluation import Evaluation
from lorafleet.api.finetunejob import Dataset
from lorafleet.evaluation import prompts
from lorafleet.evaluation.prompts import HeldOutRecord, PromptTemplate, TemplateError
from lorafleet.trainer.data import SampleError

NO_TOKENIZER: Any = None  # these cases never touch the tokenizer


def _dataset(fmt: str = "completion") -> Dataset:
    return Dataset.model_validate({"uri": "s3://bucket/train.jsonl", "format": fmt})


def _spec(**fields: Any) -> Evaluation:
    return Evaluation.model_validate({"uri": "s3://bucket/eval.jsonl", **fields})


def test_plain_fields_are_replaced_and_double_braces_are_literal() -> None:
    template = PromptTemplate("Q: {question}\n{{json}} {n}-{flag} {tags}}}")
    record = {"question": "2+2?", "n": 3, "flag": True, "tags": ["a", "b"], "unused": "x"}
    assert template.fields == ["question", "n", "flag", "tags"]
    assert template.fill(record) == 'Q: 2+2?\n{json} 3-true ["a", "b"]}'


@pytest.mark.parametrize(
    "template",
    ["{0.__class__}", "{question.__class__.__mro__}", "{a[0]}", "{x!r}", "{x:>10}", "{}", "{0}", "{ x }"],
)
def test_anything_but_a_plain_name_in_braces_is_refused(template: str) -> None:
    with pytest.raises(TemplateError, match=r"evaluation.promptTemplate: .* is not a plain field name"):
        PromptTemplate(template)


@pytest.mark.parametrize(("template", "where"), [("a { b", "'{' at character 3"), ("a } b", "'}' at character 3")])
def test_a_lone_brace_is_refused(template: str, where: str) -> None:
    with pytest.raises(TemplateError, match=f"lone {where}"):
        PromptTemplate(template)


def test_a_dunder_name_is_just_a_missing_field() -> None:
    # {__class__} is a plain name: looked up in the sample (absent), never as an attribute of anything.
    with pytest.raises(SampleError, match=r'missing field "__class__" used by evaluation\.promptTemplate'):
        PromptTemplate("{__class__}").fill({"question": "x"})


def test_a_sample_without_a_template_field_is_an_error_naming_it_and_the_sample() -> None:
    spec = _spec(promptTemplate="Q: {question}", referenceField="answer")
    records = [
        HeldOutRecord("s3://bucket/eval.jsonl", "line", 1, {"question": "a", "answer": "1"}),
        HeldOutRecord("s3://bucket/eval.jsonl", "line", 2, {"query": "b", "answer": "2"}),
        HeldOutRecord("s3://bucket/eval.jsonl", "line", 3, {"question": "c"}),
    ]
    template = prompts.check_spec(spec, _dataset())
    examples, errors = prompts.build_examples(records, spec, _dataset(), NO_TOKENIZER, template)
    assert [e.prompt for e in examples] == ["Q: a"]
    assert errors.count == 2
    assert (
        'line 2: missing field "question" used by evaluation.promptTemplate (the sample has: answer, query)'
        in (errors.first[0])
    )
    assert 'line 3: missing field "answer" named by evaluation.referenceField' in errors.first[1]


def test_template_and_reference_field_need_no_training_fields() -> None:
    spec = _spec(promptTemplate="{q} =", referenceField="a")
    example = prompts.example({"q": "1+1", "a": 2}, spec, _dataset("chat"), NO_TOKENIZER, PromptTemplate("{q} ="))
    assert (example.prompt, example.reference, example.add_special_tokens) == ("1+1 =", "2", True)


def test_completion_defaults_and_reference_cap() -> None:
    long = "y" * (prompts.MAX_REFERENCE_CHARS + 10)
    example = prompts.example({"prompt": "P:", "completion": long}, _spec(), _dataset(), NO_TOKENIZER, None)
    assert example.prompt == "P:" and example.add_special_tokens
    assert example.reference == long[: prompts.MAX_REFERENCE_CHARS]


def test_reference_field_overrides_the_format_default() -> None:
    spec = _spec(referenceField="gold")
    record = {"prompt": "P:", "completion": " 7", "gold": 7}
    assert prompts.example(record, spec, _dataset(), NO_TOKENIZER, None).reference == "7"
    with pytest.raises(SampleError, match=r'field "gold" named by evaluation\.referenceField must be a string'):
        prompts.example({**record, "gold": {"x": 1}}, spec, _dataset(), NO_TOKENIZER, None)


def test_text_data_needs_a_template_and_a_reference_field() -> None:
    with pytest.raises(
        TemplateError, match=r"format text needs evaluation\.promptTemplate and evaluation\.referenceField"
    ):
        prompts.check_spec(_spec(promptTemplate="{text}"), _dataset("text"))
    assert prompts.check_spec(_spec(promptTemplate="{q}", referenceField="a"), _dataset("text")) is not None


def test_at_most_max_examples_are_built() -> None:
    spec = _spec(maxExamples=2)
    records = (HeldOutRecord("u", "line", n, {"prompt": "p", "completion": "c"}) for n in range(1, 1000))
    examples, errors = prompts.build_examples(records, spec, _dataset(), NO_TOKENIZER, None)
    assert [e.line for e in examples] == [1, 2] and errors.count == 0
