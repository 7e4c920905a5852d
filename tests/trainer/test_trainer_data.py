"""Dataset parsing, validation and loss masks of the trainer (lorafleet.trainer.data).

Invariants: every bad line is reported with its line number under one DatasetInvalid; an empty dataset is
DatasetEmpty; with completion-only loss exactly the answer tokens (assistant turns with their end-of-turn
marker, the completion, the output) carry labels, the rest is IGNORE_INDEX; overlong samples are cut or dropped
as configured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lorafleet.api.finetunejob import Dataset
from lorafleet.trainer import data
from lorafleet.trainer.errors import (
    DATASET_EMPTY,
    DATASET_INVALID,
    DATASET_NOT_FOUND,
    EXIT_INVALID_INPUT,
    TrainerError,
)
from tests.trainer_fixtures import MEMORIZE_CHAT, need_training_stack, write_jsonl

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    need_training_stack()
    from lorafleet_dev.tiny_model import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer: Any) -> Any:
    """The same tokenizer without a chat template (instruction falls back to an Alpaca prompt)."""
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain


def dataset(fmt: str, **extra: Any) -> Dataset:
    return Dataset.model_validate({"uri": "s3://data/d.jsonl", "format": fmt, **extra})


def load(
    tmp_path: Path,
    tokenizer: Any,
    lines: list[Any],
    fmt: str = "chat",
    max_length: int = 256,
    completion_only: bool = True,
    **extra: Any,
) -> tuple[list[data.Example], data.LoadReport]:
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    return data.load_examples(
        path,
        dataset(fmt, **extra),
        tokenizer,
        max_length=max_length,
        completion_only=completion_only,
        uri="s3://data/d.jsonl",
    )


def trained_text(tokenizer: Any, example: data.Example) -> str:
    return str(tokenizer.decode([t for t in example.labels if t != data.IGNORE_INDEX]))


def failure(tmp_path: Path, tokenizer: Any, lines: list[Any], fmt: str = "chat", **kw: Any) -> TrainerError:
    with pytest.raises(TrainerError) as info:
        load(tmp_path, tokenizer, lines, fmt, **kw)
    return info.value


# -- validation ----------------------------------------------------------------------------------------------


def test_bad_json_is_reported_with_line_numbers(tmp_path: Path, tokenizer: Any) -> None:
    lines = [MEMORIZE_CHAT[0], "{not json", "", MEMORIZE_CHAT[1], '["a list"]']
    error = failure(tmp_path, tokenizer, lines)
    assert error.reason == DATASET_INVALID and error.exit_code == EXIT_INVALID_INPUT
    assert "2 invalid lines" in error.message
    assert "line 2: invalid JSON" in error.message
    assert "line 5: expected a JSON object, got an array" in error.message


def test_json_and_record_errors_are_reported_together_in_line_order(tmp_path: Path, tokenizer: Any) -> None:
    bad_role = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}
    error = failure(tmp_path, tokenizer, [bad_role, "{oops"])
    assert error.message.index("line 1:") < error.message.index("line 2:")
    assert 'line 1: message 2 has unknown role "bot" (expected system, user, assistant, or a name mapped by ' in (
        error.message
    )


def test_not_utf8(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(TrainerError, match="line 2: not UTF-8"):
        data.load_examples(path, dataset("text"), tokenizer, max_length=64, completion_only=True)


@pytest.mark.parametrize(
    ("fmt", "record", "expected"),
    [
        ("chat", {"msgs": []}, 'line 1: missing field "messages"'),
        ("chat", {"messages": "hi"}, 'field "messages" must be an array of messages, got a string'),
        ("chat", {"messages": []}, 'field "messages" is empty'),
        ("chat", {"messages": ["hi"]}, "message 1 must be an object, got a string"),
        ("chat", {"messages": [{"content": "hi"}]}, 'missing field "role" in message 1'),
        ("chat", {"messages": [{"role": "user", "content": 3}]}, 'field "content" in message 1 must be a string'),
        ("chat", {"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ("instruction", {"instruction": "x"}, 'missing field "output"'),
        ("instruction", {"output": "x"}, 'missing field "instruction"'),
        ("completion", {"prompt": "x"}, 'missing field "completion"'),
        ("completion", {"prompt": "x", "completion": "  "}, 'field "completion" is empty'),
        ("text", {"body": "x"}, 'missing field "text"'),
        ("text", {"text": None}, 'missing field "text"'),
        ("text", {"text": ["x"]}, 'field "text" must be a string, got an array'),
    ],
)
def test_record_errors(tmp_path: Path, tokenizer: Any, fmt: str, record: dict[str, Any], expected: str) -> None:
    error = failure(tmp_path, tokenizer, [record], fmt)
    assert error.reason == DATASET_INVALID
    assert expected in error.message


def test_many_errors_are_summarized(tmp_path: Path, tokenizer: Any) -> None:
    error = failure(tmp_path, tokenizer, ["{"] * 12, "text")
    assert "12 invalid lines" in error.message and "and 7 more" in error.message
    assert len(error.message) < 1024


def test_empty_and_blank_files(tmp_path: Path, tokenizer: Any) -> None:
    error = failure(tmp_path, tokenizer, ["", "   "], "text")
    assert error.reason == DATASET_EMPTY and error.exit_code == EXIT_INVALID_INPUT
    assert "no samples" in error.message


def test_missing_file(tmp_path: Path, tokenizer: Any) -> None:
    with pytest.raises(TrainerError) as info:
        data.load_examples(tmp_path / "nope.jsonl", dataset("text"), tokenizer, max_length=64, completion_only=True)
    assert info.value.reason == DATASET_NOT_FOUND


def test_field_mapping(tmp_path: Path, tokenizer: Any) -> None:
    record = {"conv": [{"who": "user", "text": "Hi"}, {"who": "assistant", "text": "Hello!"}]}
    examples, _ = load(tmp_path, tokenizer, [record], fields={"messages": "conv", "role": "who", "content": "text"})
    assert trained_text(tokenizer, examples[0]) == f"Hello!{IM_END}\n"
    examples, _ = load(
        tmp_path, tokenizer, [{"q": "2+2=", "a": " 4"}], "completion", fields={"prompt": "q", "completion": "a"}
    )
    assert trained_text(tokenizer, examples[0]) == " 4</s>"


# -- masks -------------------------------------------------------------------------------------------------------


def test_chat_trains_only_assistant_turns(tmp_path: Path, tokenizer: Any) -> None:
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome."},
        ]
    }
    (example,), report = load(tmp_path, tokenizer, [record])
    assert trained_text(tokenizer, example) == f"Paris.{IM_END}\nRome.{IM_END}\n"
    # Inputs are the whole rendered conversation, starting with the template's BOS (no second one).
    full = tokenizer.decode(example.input_ids)
    assert full == tokenizer.apply_chat_template(record["messages"], tokenize=False)
    assert full.startswith("<s><|im_start|>system") and not full.startswith("<s><s>")
    assert report.trained_tokens == example.trained_tokens < len(example)


def test_chat_without_completion_only_trains_everything(tmp_path: Path, tokenizer: Any) -> None:
    (example,), _ = load(tmp_path, tokenizer, [MEMORIZE_CHAT[0]], completion_only=False)
    # Special tokens the template wrote as text are trained too; only nothing is masked.
    assert example.labels == example.input_ids


def test_completion_trains_completion_and_eos(tmp_path: Path, tokenizer: Any) -> None:
    (example,), _ = load(
        tmp_path, tokenizer, [{"prompt": "The capital of France is", "completion": " Paris."}], "completion"
    )
    assert example.input_ids[0] == tokenizer.bos_token_id and example.labels[0] == data.IGNORE_INDEX
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert trained_text(tokenizer, example) == " Paris.</s>"


def test_text_trains_everything_but_bos(tmp_path: Path, tokenizer: Any) -> None:
    (example,), _ = load(tmp_path, tokenizer, [{"text": "The sky is blue."}], "text")
    assert trained_text(tokenizer, example) == "The sky is blue.</s>"
    assert example.labels[0] == data.IGNORE_INDEX


def test_instruction_uses_the_chat_template(tmp_path: Path, tokenizer: Any) -> None:
    record = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    (example,), _ = load(tmp_path, tokenizer, [record], "instruction")
    text = tokenizer.decode(example.input_ids)
    assert "<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>" in text
    assert trained_text(tokenizer, example) == f"5{IM_END}\n"


def test_instruction_without_template_uses_alpaca(tmp_path: Path, plain_tokenizer: Any) -> None:
    records = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "output": "Hi"},
    ]
    first, second = load(tmp_path, plain_tokenizer, records, "instruction")[0]
    assert "### Input:\n2 and 3\n\n### Response:\n" in plain_tokenizer.decode(first.input_ids)
    assert "### Input" not in plain_tokenizer.decode(second.input_ids)
    assert trained_text(plain_tokenizer, first) == "5</s>"


def test_chat_needs_a_template(tmp_path: Path, plain_tokenizer: Any) -> None:
    error = failure(tmp_path, plain_tokenizer, [MEMORIZE_CHAT[0]])
    assert error.reason == "ChatTemplateUnsupported" and error.exit_code == EXIT_INVALID_INPUT


def test_prefix_unstable_template_is_refused(tmp_path: Path, tokenizer: Any) -> None:
    import copy

    odd = copy.deepcopy(tokenizer)
    # Renders the number of messages first: earlier turns change when a turn is added.
    odd.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    error = failure(tmp_path, odd, [MEMORIZE_CHAT[0]])
    assert error.reason == "ChatTemplateUnsupported" and "completionOnlyLoss" in error.message
    # Without completion-only loss the same template is fine.
    (example,), _ = load(tmp_path, odd, [MEMORIZE_CHAT[0]], completion_only=False)
    assert example.trained_tokens == len(example)


def test_template_refusing_a_conversation_is_a_line_error(tmp_path: Path, tokenizer: Any) -> None:
    import copy

    strict = copy.deepcopy(tokenizer)
    strict.chat_template = (
        "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('must start with user') }}{% endif %}"
        + tokenizer.chat_template
    )
    record = {"messages": [{"role": "assistant", "content": "Hi"}]}
    error = failure(tmp_path, strict, [MEMORIZE_CHAT[0], record])
    assert error.reason == DATASET_INVALID and "line 2: the chat template refused" in error.message


# -- length ----------------------------------------------------------------------------------------------------


def test_overlong_truncate(tmp_path: Path, tokenizer: Any) -> None:
    long = {"prompt": "one two three", "completion": " four five six seven eight nine ten eleven twelve" * 4}
    examples, report = load(
        tmp_path, tokenizer, [long, {"prompt": "a", "completion": " b"}], "completion", max_length=16
    )
    assert len(examples) == 2 and len(examples[0]) == 16
    assert report.truncated == [1] and not report.dropped_overlong


def test_overlong_drop(tmp_path: Path, tokenizer: Any) -> None:
    long = {"text": "one two three four five six seven eight nine ten eleven twelve" * 4}
    examples, report = load(tmp_path, tokenizer, [{"text": "short"}, long], "text", max_length=16, overlong="drop")
    assert [e.line for e in examples] == [1] and report.dropped_overlong == [2]


def test_all_dropped_is_empty(tmp_path: Path, tokenizer: Any) -> None:
    long = {"text": "one two three four five six seven eight nine ten eleven twelve" * 4}
    error = failure(tmp_path, tokenizer, [long, long], "text", max_length=16, overlong="drop")
    assert error.reason == DATASET_EMPTY
    assert "2 longer than training.maxSequenceLength=16" in error.message and "line 1" in error.message


def test_truncated_prompt_without_answer_is_dropped(tmp_path: Path, tokenizer: Any) -> None:
    record = {"prompt": "one two three four five six seven eight nine ten eleven twelve " * 3, "completion": " yes"}
    examples, report = load(
        tmp_path, tokenizer, [record, {"prompt": "a", "completion": " b"}], "completion", max_length=16
    )
    assert [e.line for e in examples] == [2] and report.dropped_untrained == [1]


def test_split_eval_is_seeded_and_disjoint(tmp_path: Path, tokenizer: Any) -> None:
    examples, _ = load(tmp_path, tokenizer, [{"text": f"sample {i}"} for i in range(20)], "text")
    train, held = data.split_eval(examples, 0.25, seed=7)
    assert len(held) == 5 and len(train) == 15
    assert {e.line for e in train}.isdisjoint({e.line for e in held})
    assert data.split_eval(examples, 0.25, seed=7)[1] == held
    assert data.split_eval(examples, 0.25, seed=8)[1] != held
    assert len(data.split_eval(examples[:2], 0.01, seed=1)[1]) == 1
    with pytest.raises(TrainerError, match="at least 2 samples"):
        data.split_eval(examples[:1], 0.5, seed=1)
