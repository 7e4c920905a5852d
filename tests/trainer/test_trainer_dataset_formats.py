"""Every dataset file format trains, and multi-turn chat trains every assistant turn.

Invariants: a ShareGPT JSON array, an Alpaca JSON array, Dolly JSON Lines (fields mapped), CSV, Parquet and a
save_to_disk folder each load into examples and train the tiny model to a published adapter; in a multi-turn
ShareGPT conversation exactly the assistant turns (with their end-of-turn marker) are trained, the system and user
turns masked, as for OpenAI-shaped chat; a broken record stops the run with DatasetInvalid naming its record; the
`lorafleet dataset check` command shows the masked prompt and trained completion of the first sample.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lorafleet.api.finetunejob import Dataset
from lorafleet.trainer import data
from lorafleet.trainer.errors import DATASET_INVALID
from tests.trainer_fixtures import TrainerEnv, need_training_stack, train_in_process
from tests.unit.test_dataset_files import SHAREGPT, save_to_disk

IM_END = "<|im_end|>"
ALPACA = [
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {"instruction": "Translate to French.", "input": "thank you", "output": "Merci."},
]
DOLLY = [{"instruction": "What colour is the sky?", "context": "", "response": "Blue.", "category": "open_qa"}]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    need_training_stack()
    from lorafleet_dev.tiny_model import build_tokenizer

    return build_tokenizer()


def trained_text(example: data.Example, tokenizer: Any) -> str:
    ids = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != data.IGNORE_INDEX]
    return str(tokenizer.decode(ids, skip_special_tokens=False))


def test_a_sharegpt_conversation_trains_every_assistant_turn_like_openai_chat(tmp_path: Path, tokenizer: Any) -> None:
    share = tmp_path / "sharegpt.json"
    share.write_text(json.dumps([SHAREGPT]))
    dataset = Dataset.model_validate(
        {"uri": "s3://data/sharegpt.json", "format": "chat", "roles": {"bot": "assistant"}}
    )
    (example,), _ = data.load_examples(share, dataset, tokenizer, max_length=256, completion_only=True)
    assert trained_text(example, tokenizer) == f"Paris.{IM_END}\nRome.{IM_END}\n"
    openai = tmp_path / "openai.jsonl"
    messages = data.parse_record(SHAREGPT, dataset).messages
    openai.write_text(json.dumps({"messages": list(messages)}) + "\n")
    (same,), _ = data.load_examples(openai, dataset, tokenizer, max_length=256, completion_only=True)
    assert (same.input_ids, same.labels) == (example.input_ids, example.labels)


def _write_format(env: TrainerEnv, kind: str) -> tuple[str, dict[str, Any]]:
    """The dataset's URI in the local store and its spec, for each file format."""
    folder = env.store / "datasets"
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "sharegpt-json":
        (folder / "sharegpt.json").write_text(json.dumps([SHAREGPT] * 4))
        return "s3://datasets/sharegpt.json", {"format": "chat", "roles": {"bot": "assistant"}}
    if kind == "alpaca-json":
        (folder / "alpaca.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(ALPACA * 2, indent=4).encode())
        return "s3://datasets/alpaca.json", {"format": "instruction"}
    if kind == "dolly-jsonl":
        (folder / "dolly.jsonl").write_text("\r\n".join(json.dumps(r) for r in DOLLY * 4))
        return "s3://datasets/dolly.jsonl", {
            "format": "instruction",
            "fields": {"input": "context", "output": "response"},
        }
    if kind == "csv":
        (folder / "train.csv").write_text("prompt,completion\nThe capital of France is, Paris.\nOne two, three.\n")
        return "s3://datasets/train.csv", {"format": "completion"}
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([{"text": "The sky is blue."}] * 4), folder / "train.parquet")
        return "s3://datasets/train.parquet", {"format": "text"}
    save_to_disk(folder / "saved", [{"text": "Grass is green."}] * 4)
    return "s3://datasets/saved", {"format": "text", "fileFormat": "datasets"}


@pytest.mark.parametrize("kind", ["sharegpt-json", "alpaca-json", "dolly-jsonl", "csv", "parquet", "datasets"])
def test_each_file_format_trains(trainer_env: TrainerEnv, kind: str) -> None:
    if kind in ("parquet", "datasets"):
        pytest.importorskip("pyarrow")
    uri, spec = _write_format(trainer_env, kind)
    config = trainer_env.config(dataset={"uri": uri, **spec}, name=f"fmt-{kind}", maxSteps=2, batchSize=2)
    train_in_process(trainer_env, config)
    assert (trainer_env.adapter_dir(config) / "adapter_model.safetensors").is_file()
    lineage = json.loads((trainer_env.adapter_dir(config) / "manifest.json").read_text())
    assert json.dumps(lineage).count(uri) >= 1


def test_a_broken_record_stops_the_run_naming_it(trainer_env: TrainerEnv) -> None:
    folder = trainer_env.store / "datasets"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.json").write_text(json.dumps([ALPACA[0], {"instruction": "no output"}]))
    config = trainer_env.config(dataset={"uri": "s3://datasets/broken.json", "format": "instruction"}, name="broken")
    from lorafleet.trainer.errors import TrainerError

    with pytest.raises(TrainerError) as raised:
        train_in_process(trainer_env, config)
    assert raised.value.reason == DATASET_INVALID
    assert 'record 2: missing field "output"' in str(raised.value)


def test_the_check_command_shows_the_mask(tmp_path: Path, tokenizer: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from lorafleet.cli import main

    tokenizer.save_pretrained(tmp_path / "model")
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA))
    assert main(["dataset", "check", str(path), "--format", "instruction", "--model", str(tmp_path / "model")]) == 0
    out = capsys.readouterr().out
    assert "valid samples: 2 of 2" in out and "tokens: " in out
    first = out.split("first sample (record 1):\n", 1)[1]
    assert first.startswith("--- masked ---\n<s><|im_start|>user\nWhat is the capital of France?")
    assert f"--- trained ---\nParis.{IM_END}\n" in first
