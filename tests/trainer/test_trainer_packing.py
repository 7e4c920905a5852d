"""Padding-free packing: several samples flattened into one row (transformers' DataCollatorWithFlattening).

Invariant: the flattened batch gives the model exactly what separate sequences give it: the same logits at
every position (no attention across samples: position ids restart per sample and the mask follows them) and the
same loss over the trained tokens, as does the padded batch the trainer uses without packing.

transformers detects packed rows from the position ids only when no KV cache is in play, which is why the trainer
sets ``use_cache=False`` on the model (with a cache, attention silently crosses samples).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lorafleet.api.finetunejob import Dataset
from lorafleet.trainer import data
from tests.trainer_fixtures import MEMORIZE_CHAT, tiny_model_dir, write_jsonl  # noqa: F401

TOL = 1e-4


@pytest.fixture(scope="module")
def model_and_examples(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    model.eval()
    path = write_jsonl(tmp_path_factory.mktemp("pack") / "d.jsonl", MEMORIZE_CHAT[:4])
    dataset = Dataset.model_validate({"uri": "s3://data/d.jsonl", "format": "chat"})
    examples, _ = data.load_examples(path, dataset, tokenizer, max_length=128, completion_only=True)
    assert len({len(e) for e in examples}) > 1  # mixed lengths, or padding would not matter
    return model, tokenizer, examples


def separate_loss(model: Any, examples: list[data.Example]) -> tuple[float, list[Any]]:
    import torch

    total, count, logits = 0.0, 0, []
    with torch.no_grad():
        for e in examples:
            out = model(input_ids=torch.tensor([e.input_ids]))
            logits.append(out.logits[0])
            labels = torch.tensor(e.labels[1:])
            losses = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels, ignore_index=-100, reduction="sum")
            total += float(losses)
            count += int((labels != -100).sum())
    return total / count, logits


def test_flattened_batch_equals_separate_sequences(model_and_examples: Any) -> None:
    import torch
    from transformers import DataCollatorWithFlattening

    model, _, examples = model_and_examples
    expected_loss, expected_logits = separate_loss(model, examples)
    batch = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)([e.features() for e in examples])
    assert batch["input_ids"].shape == (1, sum(len(e) for e in examples)) and "attention_mask" not in batch
    with torch.no_grad():
        out = model(**batch, use_cache=False)
    assert abs(float(out.loss) - expected_loss) < TOL
    start = 0
    for e, logits in zip(examples, expected_logits, strict=True):
        assert torch.allclose(out.logits[0, start : start + len(e)], logits, atol=TOL)
        start += len(e)


def test_padded_batch_equals_separate_sequences(model_and_examples: Any) -> None:
    import torch
    from transformers import DataCollatorForSeq2Seq

    model, tokenizer, examples = model_and_examples
    expected_loss, _ = separate_loss(model, examples)
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)([e.features() for e in examples])
    padding = int((batch["attention_mask"] == 0).sum())
    assert padding > 0
    with torch.no_grad():
        out = model(**batch)
    assert abs(float(out.loss) - expected_loss) < TOL


def test_length_grouped_sampler_is_seeded_per_epoch() -> None:
    pytest.importorskip("torch")
    import random

    from lorafleet.trainer.batches import LengthGroupedSampler

    lengths = [(i * 37) % 101 + 1 for i in range(203)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3, megabatch=10)
    first = list(sampler)
    assert sorted(first) == list(range(203)) and list(sampler) == first and len(sampler) == 203
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(second) == list(range(203))
    again = LengthGroupedSampler(lengths, batch_size=8, seed=3, megabatch=10)
    again.set_epoch(1)
    assert list(again) == second

    batches = sampler.batches()
    assert all(len(b) == 8 for b in batches[:-1]) and len(batches[-1]) == 203 % 8  # only the last one is short
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest batch first
    # Batch order is shuffled, not sorted by length.
    tops = [max(lengths[i] for i in b) for b in batches[1:-1]]
    assert tops != sorted(tops) and tops != sorted(tops, reverse=True)

    def padding(order: list[int]) -> int:
        chunks = [order[i : i + 8] for i in range(0, len(order), 8)]
        return sum(max(lengths[j] for j in b) * len(b) - sum(lengths[j] for j in b) for b in chunks)

    shuffled = list(range(203))
    random.Random(0).shuffle(shuffled)
    assert padding(first) < padding(shuffled) / 5
