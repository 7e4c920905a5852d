"""`lorafleet dataset check FILE --format ...`: what the trainer would make of a dataset file, before GPU hours are
spent on it. It reads the file exactly as the trainer does (lorafleet.trainer.data and readers) and prints how many
samples are valid, the first errors with their line or record numbers, and, given the base model's tokenizer
(--model DIR), token counts and the first sample after the chat template, split into its masked prompt and its
trained completion.

Exit codes: 0 when every record is valid and at least one sample is left to train on; 1 otherwise; 2 bad arguments.
The tokenizer needs the trainer extra (transformers); reading and validating does not.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, get_args

from pydantic import ValidationError

from lorafleet.api.common import DatasetFileFormat, DatasetFormat
from lorafleet.api.finetunejob import ChatRole, Dataset
from lorafleet.trainer import data
from lorafleet.trainer.errors import TrainerError

DEFAULT_MAX_LENGTH = 2048


@dataclass
class CheckReport:
    """What checking a file found."""

    file_format: str
    unit: str
    records: int = 0
    valid: int = 0
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0
    overlong: int = 0
    untrained: int = 0
    first: data.Sample | None = None
    first_number: int = 0
    first_parts: list[tuple[bool, str]] = field(default_factory=list)  # (trained, text) runs of the first sample

    @property
    def ok(self) -> bool:
        return self.error_count == 0 and self.valid - self.untrained > 0


def check_file(
    path: str | Path,
    dataset: Dataset,
    tokenizer: Any | None = None,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    completion_only: bool = True,
    max_errors: int = 5,
) -> CheckReport:
    """Read and validate every record (and tokenize it, given a tokenizer); never raises for a bad record."""
    source = data.open_dataset(path, dataset.file_format, str(path))
    report = CheckReport(source.format, source.unit)
    for row in source.rows:
        problem = row.error
        sample = None
        if problem is None and row.value is not None:
            report.records += 1
            try:
                sample = data.parse_record(row.value, dataset)
                rendered = (
                    data.render_sample(sample, dataset, tokenizer, completion_only=completion_only)
                    if tokenizer is not None
                    else None
                )
            except data.SampleError as e:
                problem = str(e)
        if problem is not None or sample is None:
            report.error_count += 1
            if len(report.errors) < max_errors:
                report.errors.append(f"{source.where(row.number)}: {problem}")
            continue
        report.valid += 1
        if report.first is None:
            report.first, report.first_number = sample, row.number
        if tokenizer is None or rendered is None:
            continue
        example = data.tokenize(rendered, tokenizer, row.number)
        if not report.first_parts:
            report.first_parts = _runs(example, tokenizer)
        report.longest = max(report.longest, len(example))
        report.overlong += len(example) > max_length
        fitted = data.fit(example, max_length, dataset.overlong)
        if fitted is None or fitted.trained_tokens == 0:
            report.untrained += 1
            continue
        report.tokens += len(fitted)
        report.trained_tokens += fitted.trained_tokens
    return report


def _runs(example: data.Example, tokenizer: Any) -> list[tuple[bool, str]]:
    """The example as runs of masked and trained tokens, decoded (special tokens shown)."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        trained = label != data.IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    return [(trained, str(tokenizer.decode(ids, skip_special_tokens=False))) for trained, ids in runs]


def format_report(report: CheckReport, path: str, tokenized: bool, max_length: int) -> str:
    unit = report.unit
    lines = [f"{path}: {report.file_format} ({unit} numbers below)"]
    lines.append(f"valid samples: {report.valid} of {report.valid + report.error_count}")
    if report.error_count:
        shown = len(report.errors)
        more = f" (first {shown} of {report.error_count})" if report.error_count > shown else ""
        lines.append(f"errors{more}:")
        lines += [f"  {error}" for error in report.errors]
    if tokenized:
        lines.append(
            f"tokens: {report.tokens} in all, {report.trained_tokens} trained; longest sample {report.longest}; "
            f"{report.overlong} over maxSequenceLength {max_length}; {report.untrained} with nothing left to train"
        )
    if report.first is not None:
        lines.append(f"first sample ({unit} {report.first_number}):")
        if report.first_parts:
            for trained, text in report.first_parts:
                label = "trained" if trained else "masked"
                lines.append(f"--- {label} ---")
                lines.append(text)
            lines.append("---")
        else:
            lines += [f"  {line}" for line in _describe(report.first)]
    return "\n".join(lines) + "\n"


def _describe(sample: data.Sample) -> list[str]:
    """The parsed sample, without a tokenizer (no template): its messages, or its prompt and completion."""
    if sample.messages:
        return [f"{m['role']}: {m['content']!r}" for m in sample.messages]
    if sample.instruction is not None:
        return [
            f"instruction: {sample.instruction[0]!r}",
            f"input: {sample.instruction[1]!r}",
            f"output (trained): {sample.completion!r}",
        ]
    return ([f"prompt: {sample.prompt!r}"] if sample.prompt else []) + [f"trained: {sample.completion!r}"]


# -- the command -----------------------------------------------------------------------------------------------


def _pairs(values: list[str] | None, what: str) -> dict[str, str]:
    pairs = {}
    for value in values or []:
        key, sep, name = value.partition("=")
        if not sep or not key or not name:
            raise argparse.ArgumentTypeError(f"{what} {value!r}: write KEY=NAME")
        pairs[key] = name
    return pairs


def _run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    try:
        spec = {
            "uri": "pvc://local/dataset",
            "format": args.format,
            "fileFormat": args.file_format,
            "fields": _pairs(args.field, "--field"),
            "roles": _pairs(args.role, "--role"),
            "overlong": args.overlong,
        }
        dataset = Dataset.model_validate(spec)
    except (argparse.ArgumentTypeError, ValidationError) as e:
        print(f"lorafleet dataset check: {e}", file=sys.stderr)
        return 2
    tokenizer = None
    if args.model:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            print(
                "lorafleet dataset check: --model needs the trainer extra (pip install 'lorafleet[trainer]')",
                file=sys.stderr,
            )
            return 2
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(args.model))
        except (OSError, ValueError) as e:
            print(f"lorafleet dataset check: no tokenizer in {args.model}: {e}", file=sys.stderr)
            return 2
    try:
        report = check_file(
            args.file,
            dataset,
            tokenizer,
            max_length=args.max_length,
            completion_only=not args.full_loss,
            max_errors=args.errors,
        )
    except TrainerError as e:
        print(f"lorafleet dataset check: {e.reason}: {e}", file=sys.stderr)
        return 1
    (out or sys.stdout).write(format_report(report, str(args.file), tokenizer is not None, args.max_length))
    return 0 if report.ok else 1


def register(subparsers: Any) -> None:
    """`lorafleet dataset check`."""
    dataset = subparsers.add_parser("dataset", help="check a dataset file before training on it")
    sub = dataset.add_subparsers(dest="dataset_command", required=True)
    check = sub.add_parser(
        "check",
        help="count valid samples, list the first errors, and show the first sample as it is trained",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("file", type=Path, help="the dataset file (or a save_to_disk folder)")
    check.add_argument(
        "--format", required=True, choices=get_args(DatasetFormat), help="sample format (dataset.format)"
    )
    check.add_argument(
        "--file-format",
        default="auto",
        choices=get_args(DatasetFileFormat),
        help="file format (dataset.fileFormat); default auto",
    )
    check.add_argument(
        "--field",
        action="append",
        metavar="KEY=NAME",
        help="a field mapping (dataset.fields), e.g. output=response; repeatable",
    )
    check.add_argument(
        "--role",
        action="append",
        metavar="NAME=ROLE",
        help=f"a role mapping (dataset.roles), e.g. bot=assistant ({', '.join(get_args(ChatRole))})",
    )
    check.add_argument("--model", type=Path, help="the base model's folder (its tokenizer): token counts and the mask")
    check.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="training.maxSequenceLength")
    check.add_argument("--overlong", choices=("truncate", "drop"), default="truncate", help="dataset.overlong")
    check.add_argument("--full-loss", action="store_true", help="training.completionOnlyLoss: false")
    check.add_argument("--errors", type=int, default=5, help="errors to list (default 5)")
    check.set_defaults(func=_run)
