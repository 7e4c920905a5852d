"""The trainer's side of the operator boundary, checked with the real torch and a fresh interpreter: importing the
operator-side trainer modules (config, the package, main) pulls in no torch or transformers, and the torchrun
launcher passes --shutdown-timeout only to a torchrun that has the option (torch 2.13 does, the CUDA images'
2.11 does not). Moved from tests/unit/test_trainer_status.py: a subprocess and torch have no place in the unit tier.
"""

from __future__ import annotations

import subprocess
import sys

import pytest


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


@pytest.mark.parametrize("module", ["lorafleet.contracts.trainer", "lorafleet.trainer", "lorafleet.trainer.main"])
def test_operator_side_imports_no_torch(module: str) -> None:
    code = f"import sys, {module}; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"
