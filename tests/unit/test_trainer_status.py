"""The trainer's contract with the operator: exit codes, the final status object, the config model.

Invariants: the status is one JSON object of at most 4096 bytes with exactly the keys finetunejob_status reads;
non-finite numbers never reach it; in a distributed run the first error written wins; each reason maps to its
documented exit code; torchrun's wrapper turns worker failures back into those codes; the trainer config
(lorafleet.contracts.trainer) renders as before when the new fields keep their defaults. (That the operator side
imports no torch, and torchrun's options, are pinned in tests/trainer/test_trainer_imports.py: they need a process
and torch.)
"""

from __future__ import annotations

import json
from pathlib import Path

from lorafleet.contracts import exits as errors
from lorafleet.contracts.trainer import DistributedSettings
from lorafleet.trainer.errors import Interrupted
from lorafleet.trainer.launch import exit_code
from lorafleet.trainer.status import MAX_BYTES, build_status, encode, read_status, write_status


def test_reasons_and_exit_codes() -> None:
    assert errors.EXIT_OK == 0 and errors.EXIT_FAILED == 1
    assert errors.EXIT_INVALID_INPUT == 2 and errors.EXIT_INTERRUPTED == 3
    for reason in errors.INVALID_INPUT_REASONS:
        assert errors.exit_code_for(reason) == 2, reason
    assert errors.exit_code_for(errors.INTERRUPTED) == 3
    for reason in (errors.STORE_UNAVAILABLE, errors.UPLOAD_FAILED, errors.OUT_OF_MEMORY, errors.TRAINING_FAILED):
        assert errors.exit_code_for(reason) == 1
    assert errors.exit_code_for(None) == 0
    assert Interrupted("x").exit_code == 3


def test_exit_code_matches_podfailurepolicy() -> None:
    from lorafleet.resources.finetunejob import EXIT_INVALID_INPUT

    assert errors.EXIT_INVALID_INPUT == EXIT_INVALID_INPUT


def test_reasons_are_condition_reasons() -> None:
    from lorafleet.contracts import exits
    from lorafleet.contracts.base import is_reason

    names = [v for k, v in vars(exits).items() if k.isupper() and isinstance(v, str)]
    assert names and all(is_reason(name) for name in names)
    assert set(exits.REASONS) == set(names)


def test_status_has_the_keys_the_operator_reads() -> None:
    from datetime import UTC, datetime

    from tests.unit import objects

    status = build_status(
        progress={"step": 40, "totalSteps": 40, "epoch": 20.0, "loss": 0.123456789},
        metrics={"trainLoss": 0.12, "evalLoss": float("nan"), "tokensPerSecond": 1234.5678901},
        artifact={"uri": "s3://a/adapters/x/v1", "digest": "sha256:" + "0" * 64, "sizeBytes": 10, "extra": 1},
    )
    report = json.loads(encode(status))
    assert report["version"] == 1
    now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    base = objects.ready(objects.base_model())
    done = {"metadata": {"name": "j"}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    st = objects.finetunejob_status(objects.fine_tune_job(), base_model=base, job=done, now=now, trainer_report=report)
    assert st["progress"] == {"step": 40, "totalSteps": 40, "epoch": 20.0, "loss": 0.123457}
    assert st["metrics"] == {"trainLoss": 0.12, "tokensPerSecond": 1234.57}
    assert st["artifact"] == {"uri": "s3://a/adapters/x/v1", "digest": "sha256:" + "0" * 64, "sizeBytes": 10}
    failed = json.loads(encode(build_status(error=("DatasetInvalid", "line 3: invalid JSON"))))
    job_failed = {"metadata": {"name": "j"}, "status": {"conditions": [{"type": "Failed", "status": "True"}]}}
    st = objects.finetunejob_status(
        objects.fine_tune_job(), base_model=base, job=job_failed, now=now, trainer_report=failed
    )
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert (ready["reason"], ready["message"]) == ("DatasetInvalid", "line 3: invalid JSON")


def test_status_fits_the_termination_message() -> None:
    status = build_status(
        progress={"step": 1},
        metrics={f"metric{i:04d}": 1.0 / (i + 1) for i in range(500)},
        error=("TrainingFailed", "x" * 10_000),
    )
    text = encode(status)
    assert len(text.encode()) <= MAX_BYTES
    decoded = json.loads(text)
    assert decoded["error"]["reason"] == "TrainingFailed" and decoded["progress"] == {"step": 1}
    assert len(decoded["error"]["message"]) <= 1024


def test_write_status_keeps_the_first_error(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    assert write_status(path, build_status(error=("DatasetInvalid", "first")), keep_error=True)
    assert not write_status(path, build_status(error=("TrainingFailed", "second")), keep_error=True)
    assert read_status(path) == {"version": 1, "error": {"reason": "DatasetInvalid", "message": "first"}}
    assert write_status(path, build_status(error=("TrainingFailed", "third")))
    assert read_status(path) == {"version": 1, "error": {"reason": "TrainingFailed", "message": "third"}}
    assert not write_status(tmp_path / "missing-dir-file" / "x" / "\0", {"progress": {}})


def test_launcher_exit_codes(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    assert exit_code(None, [1, 2]) == 2
    assert exit_code(None, [1, 3]) == 3
    assert exit_code(None, [1, -15]) == 1
    write_status(path, build_status(error=("DatasetEmpty", "no samples")))
    assert exit_code(str(path), [1, 1]) == 2
    write_status(path, build_status(error=("Interrupted", "SIGTERM")))
    assert exit_code(str(path), [1]) == 3
    write_status(path, build_status(progress={"step": 1}, artifact={"uri": "u", "digest": "d", "sizeBytes": 1}))
    assert exit_code(str(path), [-15]) == 0


def test_strategy_is_not_rendered_while_default() -> None:
    assert "strategy" not in DistributedSettings().model_dump(by_alias=True)
    fsdp = DistributedSettings(strategy="fsdp")
    assert fsdp.model_dump(by_alias=True)["strategy"] == "fsdp"
    assert DistributedSettings.model_validate(fsdp.model_dump(by_alias=True)).strategy == "fsdp"


def test_a_full_evaluation_fits_beside_the_usual_report() -> None:
    from typing import get_args

    from lorafleet.api.evaluation import EvaluationMetric
    from lorafleet.contracts.evaluation import EvaluationResult
    from lorafleet.contracts.trainer import TrainerReport

    names = get_args(EvaluationMetric)
    assert len(names) == 8
    evaluation = EvaluationResult.model_validate(
        {
            "metrics": {n: {"base": 0.123456789, "adapter": 1234.56789, "examples": 5000} for n in names},
            "examples": 5000,
            "predictionsFile": "evaluation/predictions.jsonl",
        }
    )
    metrics = {k: 12345.6789 for k in ("trainLoss", "evalLoss", "tokensPerSecond", "trainSeconds", "wallSeconds")}
    metrics |= {"trainTokens": 1e9, "steps": 100000.0, "samples": 1e6}
    status = build_status(
        progress={"step": 100000, "totalSteps": 100000, "epoch": 3.0, "loss": 0.5},
        metrics=metrics,
        artifact={"uri": "s3://" + "b" * 63 + "/" + "p" * 500, "digest": "sha256:" + "0" * 64, "sizeBytes": 10},
        evaluation=evaluation,
        tokens_trained=10**12,
    )
    text = encode(status)
    assert len(text.encode()) <= MAX_BYTES
    report = TrainerReport.model_validate(json.loads(text))
    assert report.metrics is not None and report.metrics.keys() == metrics.keys() and report.tokens_trained == 10**12
    assert report.evaluation == evaluation  # compact: nothing had to be dropped
