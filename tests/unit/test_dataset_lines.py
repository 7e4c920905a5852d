"""One hostile dataset line costs a bounded amount and is a DatasetInvalid naming its line, never a crash.

Invariants: a line over data.MAX_LINE_BYTES is refused before it is decoded or parsed; deeply nested JSON
(100,000 '[') is refused as nested too deeply (Python's json would raise RecursionError); the good lines around
them do not hide them, and a line at the cap is still read.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafleet.trainer import data
from lorafleet.trainer.errors import DATASET_INVALID, TrainerError

GOOD = json.dumps({"text": "hello"})


def _dataset(tmp_path: Path, *lines: str | bytes) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(line.encode() if isinstance(line, str) else line for line in lines) + b"\n")
    return path


def _refusal(path: Path) -> str:
    with pytest.raises(TrainerError) as raised:
        data.read_jsonl(path, uri="pvc://claim/train.jsonl")
    assert raised.value.reason == DATASET_INVALID
    return str(raised.value)


def test_a_line_over_the_cap_is_dataset_invalid_naming_its_line(tmp_path: Path) -> None:
    huge = json.dumps({"text": "x" * data.MAX_LINE_BYTES})
    message = _refusal(_dataset(tmp_path, GOOD, huge, GOOD))
    assert f"line 2: {len(huge)} bytes, over the {data.MAX_LINE_BYTES}-byte limit" in message
    assert "1 invalid line" in message and "pvc://claim/train.jsonl" in message


def test_a_line_at_the_cap_is_read(tmp_path: Path) -> None:
    text = "x" * (data.MAX_LINE_BYTES - len(json.dumps({"text": ""})))
    line = json.dumps({"text": text})
    assert len(line) == data.MAX_LINE_BYTES
    assert [n for n, _ in data.read_jsonl(_dataset(tmp_path, GOOD, line))] == [1, 2]


@pytest.mark.parametrize("opening", ["[", '{"a":'])
def test_deeply_nested_json_is_dataset_invalid_not_a_crash(tmp_path: Path, opening: str) -> None:
    message = _refusal(_dataset(tmp_path, GOOD, opening * 100_000, GOOD))
    assert "line 2: JSON nested too deeply" in message


def test_moderate_nesting_is_judged_by_the_format_not_refused_as_deep(tmp_path: Path) -> None:
    records = data.read_jsonl(_dataset(tmp_path, json.dumps({"text": "a", "meta": [[[[1]]]]})))
    assert records[0][1]["meta"] == [[[[1]]]]
