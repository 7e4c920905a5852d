"""The trainer's contract with the operator: exit codes, the final status object, the config model.

Invariants: the status is one JSON object of at most 4096 bytes with exactly the keys finetunejob_status reads;
non-finite numbers never reach it; in a distributed run the first error written wins; each reason maps to its
documented exit code; torchrun's wrapper turns worker failures back into those codes; trainer.config imports no
torch and renders as before when the new fields keep their defaults.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lorafleet.trainer import errors
from lorafleet.trainer.config import DistributedSettings
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
    assert errors.Interrupted("x").exit_code == 3


def test_exit_code_matches_podfailurepolicy() -> None:
    from lorafleet.resources.finetunejob import EXIT_INVALID_INPUT

    assert errors.EXIT_INVALID_INPUT == EXIT_INVALID_INPUT


def test_reasons_are_condition_reasons() -> None:
    from lorafleet.resources.status import _REASON

    names = [v for k, v in vars(errors).items() if k.isupper() and isinstance(v, str)]
    assert names and all(_REASON.match(name) for name in names)


def test_status_has_the_keys_the_operator_reads() -> None:
    from lorafleet.resources.status import _report_artifact, _report_error, _report_metrics, _report_progress

    status = build_status(
        progress={"step": 40, "totalSteps": 40, "epoch": 20.0, "loss": 0.123456789},
        metrics={"trainLoss": 0.12, "evalLoss": float("nan"), "tokensPerSecond": 1234.5678901},
        artifact={"uri": "s3://a/adapters/x/v1", "digest": "sha256:" + "0" * 64, "sizeBytes": 10, "extra": 1},
    )
    report = json.loads(encode(status))
    assert _report_progress(report) == {"step": 40, "totalSteps": 40, "epoch": 20.0, "loss": 0.123457}
    assert _report_metrics(report) == {"trainLoss": 0.12, "tokensPerSecond": 1234.57}
    assert _report_artifact(report) == {"uri": "s3://a/adapters/x/v1", "digest": "sha256:" + "0" * 64, "sizeBytes": 10}
    failed = json.loads(encode(build_status(error=("DatasetInvalid", "line 3: invalid JSON"))))
    assert _report_error(failed) == ("DatasetInvalid", "line 3: invalid JSON")


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
    assert read_status(path) == {"error": {"reason": "DatasetInvalid", "message": "first"}}
    assert write_status(path, build_status(error=("TrainingFailed", "third")))
    assert read_status(path) == {"error": {"reason": "TrainingFailed", "message": "third"}}
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


def test_shutdown_timeout_default_only_where_torchrun_has_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    pytest.importorskip("torch")
    from torch.distributed.run import get_args_parser

    from lorafleet.trainer.launch import with_shutdown_timeout

    monkeypatch.delenv("LORAFLEET_SHUTDOWN_TIMEOUT", raising=False)
    args = ["--standalone", "-m", "lorafleet.trainer"]
    current = get_args_parser()  # torch 2.13 has --shutdown-timeout
    assert with_shutdown_timeout(args, current) == ["--shutdown-timeout=100", *args]
    assert with_shutdown_timeout(["--shutdown-timeout=5", *args], current) == ["--shutdown-timeout=5", *args]
    monkeypatch.setenv("LORAFLEET_SHUTDOWN_TIMEOUT", "40")
    assert with_shutdown_timeout(args, current)[0] == "--shutdown-timeout=40"
    # torchrun of torch 2.11 (as in CUDA images) has no such option: passing it would fail every launch.
    older = argparse.ArgumentParser()
    older.add_argument("--standalone", action="store_true")
    older.add_argument("-m", action="store_true")
    older.add_argument("training_script")
    assert with_shutdown_timeout(args, older) == args
    older.parse_args(with_shutdown_timeout(args, older))


def test_strategy_is_not_rendered_while_default() -> None:
    assert "strategy" not in DistributedSettings().model_dump(by_alias=True)
    fsdp = DistributedSettings(strategy="fsdp")
    assert fsdp.model_dump(by_alias=True)["strategy"] == "fsdp"
    assert DistributedSettings.model_validate(fsdp.model_dump(by_alias=True)).strategy == "fsdp"


@pytest.mark.parametrize("module", ["lorafleet.trainer.config", "lorafleet.trainer", "lorafleet.trainer.main"])
def test_operator_side_imports_no_torch(module: str) -> None:
    code = f"import sys, {module}; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"
