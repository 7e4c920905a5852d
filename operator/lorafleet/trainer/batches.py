"""The data side of a run, from the store to the Trainer's batches: the dataset files fetched and parsed (parsing
itself is data.py), how packing avoids padding, the length-grouped sampler, and the collator.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

from lorafleet.contracts.trainer import TrainerConfig
from lorafleet.trainer import data
from lorafleet.trainer.progress import ProgressReporter
from lorafleet.trainer.sink import ArtifactSink, DatasetFile

# -- datasets ------------------------------------------------------------------------------------------------------


@dataclass
class Datasets:
    train: list[data.Example]
    eval: list[data.Example]
    train_file: DatasetFile
    eval_file: DatasetFile | None
    report: data.LoadReport
    eval_report: data.LoadReport | None


def load_datasets(config: TrainerConfig, tokenizer: Any, sink: ArtifactSink, work_dir: Path) -> Datasets:
    """Fetch and parse the training set and the eval set (its own file, or a split of the training set)."""
    ds, training = config.dataset, config.training
    max_length, completion_only = training.max_sequence_length, training.completion_only_loss
    train_file = sink.fetch_dataset(ds.uri, work_dir / "data")
    examples, report = data.load_examples(
        train_file.path, ds, tokenizer, max_length=max_length, completion_only=completion_only, uri=ds.uri
    )
    eval_file: DatasetFile | None = None
    eval_examples: list[data.Example] = []
    eval_report: data.LoadReport | None = None
    if ds.eval_uri:
        eval_file = sink.fetch_dataset(ds.eval_uri, work_dir / "data-eval")
        eval_examples, eval_report = data.load_examples(
            eval_file.path, ds, tokenizer, max_length=max_length, completion_only=completion_only, uri=ds.eval_uri
        )
    elif ds.eval_split:
        examples, eval_examples = data.split_eval(examples, ds.eval_split, training.seed)
    return Datasets(examples, eval_examples, train_file, eval_file, report, eval_report)


def report_datasets(reporter: ProgressReporter, config: TrainerConfig, datasets: Datasets) -> None:
    """The `dataset` event (counts), and a warning listing the lines cut or dropped for length."""
    summary: dict[str, Any] = dict(datasets.report.summary())
    reporter.event(
        "dataset",
        uri=config.dataset.uri,
        format=config.dataset.format,
        evalSamples=len(datasets.eval) or None,
        **summary,
    )
    report = datasets.report
    if report.truncated or report.dropped_overlong or report.dropped_untrained:
        reporter.event(
            "dataset",
            level="warning",
            message=f"samples over {config.training.max_sequence_length} tokens",
            truncatedLines=report.truncated[:20] or None,
            droppedLines=(report.dropped_overlong + report.dropped_untrained)[:20] or None,
        )


# -- packing and collation -----------------------------------------------------------------------------------------


def packing_mode(config: TrainerConfig, attention: str | None = None) -> str:
    """How training.packing avoids computing on padding:

    * "flatten": the samples of a batch in one row, no padding at all (DataCollatorWithFlattening); attention
      kept inside each sample by varlen kernels. Used where flash-attention is installed (GPU).
    * "group": batches of samples of similar length (LengthGroupedSampler below), padded to the longest of each
      batch, so almost no padding. Used elsewhere: with SDPA or eager attention a flattened row would need a
      dense mask over the whole row and cost attention quadratic in the row (2.6x slower than padding on CPU for
      the tiny model, see docs/benchmarks.md).
    * "off": plain padded batches in random order.

    `attention` is the loaded model's attention implementation: a model class without flash-attention (MPT, for
    one) gets "group" even where flash-attention is installed. None: before the model is loaded.
    """
    if not config.training.packing:
        return "off"
    from transformers.utils.import_utils import is_flash_attn_2_available

    flash = torch.cuda.is_available() and is_flash_attn_2_available()
    return "flatten" if flash and attention in (None, "flash_attention_2") else "group"


def collator(packing: str, tokenizer: Any, precision: str) -> Any:
    """Flattened rows for packing "flatten", else batches padded to their longest sample (labels with -100)."""
    if packing == "flatten":
        return DataCollatorWithFlattening(  # type: ignore[no-untyped-call]
            return_position_ids=True, separator_id=data.IGNORE_INDEX
        )
    multiple = 8 if precision != "fp32" else None  # tensor cores like multiples of 8
    return DataCollatorForSeq2Seq(
        tokenizer, padding=True, label_pad_token_id=data.IGNORE_INDEX, pad_to_multiple_of=multiple
    )


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Batches of samples of similar length, in random order, the same on every process and after a resume.

    Each epoch (seeded with seed + epoch): shuffle, cut into chunks of `megabatch` batches, sort each chunk by
    length and cut it into batches, then shuffle the batches, the one holding the longest sample first (an
    out-of-memory shows at once). Like transformers' LengthGroupedSampler, but that one leaves the batches of a
    chunk in descending order, uses chunks of a few batches only on small datasets, and draws from the global RNG.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, megabatch: int = 50) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.megabatch = megabatch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.megabatch * self.batch_size
        batches: list[list[int]] = []
        for start in range(0, len(order), size):
            chunk = sorted(order[start : start + size], key=lambda i: self.lengths[i], reverse=True)
            batches += [chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        # Only the very last batch may be short: it stays last so the loader's batches stay aligned.
        tail = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        if shuffled:
            longest = max(range(len(shuffled)), key=lambda i: max(self.lengths[j] for j in shuffled[i]))
            shuffled[0], shuffled[longest] = shuffled[longest], shuffled[0]
        return shuffled + tail

    def __iter__(self) -> Iterator[int]:
        return iter([i for batch in self.batches() for i in batch])
