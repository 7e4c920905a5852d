"""Dataset files as users bring them are read into the same records, and a broken record is named by its number.

Invariants: JSON Lines, one JSON array (read in chunks: a record split across chunk boundaries reads the same),
CSV, Parquet and a save_to_disk folder give the same records as the equivalent JSON Lines; a UTF-8 byte-order mark
and CRLF line ends are accepted; every error names its line (JSON Lines, CSV) or record (arrays, Parquet, saved
datasets); a JSON array is read lazily (records before a broken tail are yielded first) and stops at a broken
record; ShareGPT's shape and role names read as chat, with dataset.roles adding names and an unknown one refused
naming the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lorafleet.api.finetunejob import Dataset
from lorafleet.trainer import data, readers
from lorafleet.trainer.errors import DATASET_INVALID, TrainerError

RECORDS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": 'Say hello, "politely".\nThanks', "output": "Hello, ünïcode ✓"},
    {"instruction": "Count", "input": "", "output": "one two three"},
]


def _records(path: Path, file_format: readers.FileFormat = "auto") -> list[tuple[int, dict[str, Any]]]:
    return data.read_records(path, file_format=file_format)


def _refusal(path: Path, file_format: readers.FileFormat = "auto") -> str:
    with pytest.raises(TrainerError) as raised:
        _records(path, file_format)
    assert raised.value.reason == DATASET_INVALID
    return str(raised.value)


def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def test_json_lines_with_bom_and_crlf(tmp_path: Path) -> None:
    text = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS) + "\r\n\r\n"
    path = _write(tmp_path / "train.jsonl", b"\xef\xbb\xbf" + text.encode())
    assert _records(path) == [(1, RECORDS[0]), (2, RECORDS[1]), (3, RECORDS[2])]


@pytest.mark.parametrize("chunk", [1, 7, 1 << 16])
def test_a_json_array_reads_the_same_records_whatever_the_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(readers, "CHUNK_CHARS", chunk)
    path = _write(tmp_path / "alpaca_data.json", "\ufeff" + json.dumps(RECORDS, indent=4, ensure_ascii=False))
    assert readers.detect_format(path) == "json"
    assert _records(path) == [(1, RECORDS[0]), (2, RECORDS[1]), (3, RECORDS[2])]
    compact = _write(tmp_path / "compact.json", json.dumps(RECORDS).replace("\n", "\r\n"))
    assert [r for _, r in _records(compact)] == RECORDS


def test_an_empty_array_has_no_records(tmp_path: Path) -> None:
    assert _records(_write(tmp_path / "empty.json", " [ ]\n")) == []


def test_a_json_array_is_read_lazily_and_stops_at_a_broken_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(readers, "CHUNK_CHARS", 64)
    good = ",\n".join(json.dumps({"text": f"sample {i}"}) for i in range(200))
    path = _write(tmp_path / "train.json", "[\n" + good + ',\n{"text": oops}, {"text": "after"}]')
    rows = readers.open_records(path).rows
    assert next(rows) == readers.Row(1, {"text": "sample 0"})
    message = _refusal(path)
    assert "1 invalid record: record 201: invalid JSON (Expecting value at line 202 column 10)" in message


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ('[{"text": "a"} {"text": "b"}]', "record 2: expected ',' or ']' after record 1 at line 1 column 16"),
        ('[{"text": "a"}, 7]', "record 2: expected a JSON object, got a number"),
        ('[{"text": "a"},', "record 2: the file ends inside the array (no closing ']')"),
        ('[{"text": "a"}] trailing', "the file: text after the array's closing ']'"),
        ('{"text": "a"}', "expected one JSON array of objects"),
    ],
)
def test_broken_arrays_are_refused_naming_the_record(tmp_path: Path, content: str, error: str) -> None:
    assert error.removeprefix("the file: ") in _refusal(_write(tmp_path / "train.json", content), "json")


def test_a_record_over_the_cap_in_an_array_is_refused_with_its_number(tmp_path: Path) -> None:
    huge = json.dumps({"text": "x" * readers.MAX_LINE_BYTES})
    path = _write(tmp_path / "train.json", f'[{{"text": "a"}}, {huge}, {{"text": "b"}}]')
    assert f"record 2: over the {readers.MAX_LINE_BYTES}-byte limit of one sample" in _refusal(path)
    deep = _write(tmp_path / "deep.json", "[" + "[" * 100_000)
    assert "JSON nested too deeply" in _refusal(deep, "json")


def test_csv_with_a_header_quoted_newlines_bom_and_crlf(tmp_path: Path) -> None:
    content = (
        "\ufeffinstruction,input,output\r\n"
        "Add the numbers.,2 and 3,5\r\n"
        '"Say hello, ""politely"".\nThanks",,"Hello, ünïcode ✓"\r\n'
        "\r\n"
        "Count,,one two three\r\n"
    )
    path = _write(tmp_path / "train.csv", content)
    got = _records(path)
    assert [n for n, _ in got] == [2, 3, 6]
    assert [r for _, r in got] == [
        RECORDS[0],
        {"instruction": RECORDS[1]["instruction"], "output": RECORDS[1]["output"]},
        {"instruction": "Count", "output": "one two three"},
    ]
    broken = _write(tmp_path / "broken.csv", "instruction,output\na,b\nc,d,e\n")
    assert "line 3: 3 cells, the header has 2" in _refusal(broken)


def test_parquet_rows_and_nested_chat(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    table = pa.Table.from_pylist([{"messages": chat, "id": 1}, {"messages": chat, "id": 2}])
    pq.write_table(table, tmp_path / "train.parquet", row_group_size=1)
    got = _records(tmp_path / "train.parquet")
    assert got == [(1, {"messages": chat, "id": 1}), (2, {"messages": chat, "id": 2})]
    _write(tmp_path / "fake.parquet", "not parquet")
    assert "not a readable Parquet file" in _refusal(tmp_path / "fake.parquet")


def save_to_disk(folder: Path, rows: list[dict[str, Any]], shards: int = 1) -> Path:
    """The layout Hugging Face datasets' Dataset.save_to_disk writes: Arrow IPC stream shards, state.json listing
    them, dataset_info.json."""
    import pyarrow as pa

    folder.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    per = -(-len(rows) // shards)
    for index, name in enumerate(names):
        table = pa.Table.from_pylist(rows[index * per : (index + 1) * per])
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "x", "_split": "train"}
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "dataset_info.json").write_text("{}")
    return folder


def test_a_saved_dataset_and_a_saved_dataset_dict(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    rows = [{"text": f"sample {i}"} for i in range(5)]
    single = save_to_disk(tmp_path / "single", rows, shards=2)
    assert readers.detect_format(single) == "datasets"
    assert _records(single) == [(i + 1, r) for i, r in enumerate(rows)]
    both = tmp_path / "dict"
    save_to_disk(both / "train", rows[:3])
    save_to_disk(both / "test", rows[3:])
    (both / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert [r for _, r in _records(both)] == rows[:3]
    assert [r for _, r in _records(both / "test")] == rows[3:]
    (both / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    (both / "train" / "state.json").unlink()
    assert "no train split (splits: ['test'])" in _refusal(both)
    (single / "state.json").write_text(json.dumps({"_data_files": [{"filename": "../escape.arrow"}]}))
    assert "state.json names an odd data file '../escape.arrow'" in _refusal(single)


def test_a_file_named_as_a_folder_format_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.jsonl", '{"text": "a"}\n')
    assert "fileFormat datasets is a folder written by save_to_disk" in _refusal(path, "datasets")


# -- chat shapes -------------------------------------------------------------------------------------------------


def chat(**extra: Any) -> Dataset:
    return Dataset.model_validate({"uri": "s3://data/d.json", "format": "chat", **extra})


SHAREGPT = {
    "id": "x",
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Capital of France?"},
        {"from": "gpt", "value": "Paris."},
        {"from": "human", "value": "And Italy?"},
        {"from": "bot", "value": "Rome."},
    ],
}


def test_sharegpt_reads_as_chat_with_default_and_spec_role_names() -> None:
    sample = data.parse_record(SHAREGPT, chat(roles={"bot": "assistant"}))
    assert [m["role"] for m in sample.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert sample.messages[4]["content"] == "Rome."
    with pytest.raises(data.SampleError, match=r'message 5 has unknown role "bot" .*\{bot: assistant\}'):
        data.parse_record(SHAREGPT, chat())
    remapped = data.parse_record(SHAREGPT, chat(roles={"bot": "assistant", "gpt": "user"}))
    assert [m["role"] for m in remapped.messages][2] == "user"


def test_mapped_fields_are_not_second_guessed() -> None:
    """With dataset.fields set, ShareGPT's names are not looked for: a missing field is an error naming it."""
    with pytest.raises(data.SampleError, match='missing field "dialog"'):
        data.parse_record(SHAREGPT, chat(fields={"messages": "dialog"}))
    mapped = {"dialog": [{"speaker": "user", "text": "hi"}, {"speaker": "assistant", "text": "yo"}]}
    got = data.parse_record(mapped, chat(fields={"messages": "dialog", "role": "speaker", "content": "text"}))
    assert [m["content"] for m in got.messages] == ["hi", "yo"]


def test_dolly_fields_map_onto_instruction() -> None:
    dolly = {"instruction": "Q?", "context": "C.", "response": "A.", "category": "closed_qa"}
    dataset = Dataset.model_validate(
        {"uri": "s3://data/d.jsonl", "format": "instruction", "fields": {"input": "context", "output": "response"}}
    )
    assert data.parse_record(dolly, dataset) == data.Sample(completion="A.", instruction=("Q?", "C."))


def test_the_check_command_without_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lorafleet.cli import main

    path = _write(tmp_path / "train.json", json.dumps([SHAREGPT, {"conversations": []}, SHAREGPT]))
    assert main(["dataset", "check", str(path), "--format", "chat", "--role", "bot=assistant"]) == 1
    out = capsys.readouterr().out
    assert "valid samples: 2 of 3" in out
    assert 'record 2: field "conversations" is empty' in out
    assert "first sample (record 1):" in out and "assistant: 'Rome.'" in out
