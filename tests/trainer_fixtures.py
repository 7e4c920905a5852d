"""Fixtures for the trainer's tests and for tests that need a small model or adapter (serving).

* ``tiny_model_dir`` (session): the tiny Llama of ``lorafleet_dev.tiny_model`` (random init, 2 layers, hidden 128,
  2 heads, a local BPE tokenizer with a chat template), built once in a temporary folder. No hub download.
* ``tiny_adapter_dir`` (session): a LoRA adapter (r=8, all linear layers) trained on that model for a few dozen
  steps on MEMORIZE_CHAT, in peft's format (adapter_config.json + adapter_model.safetensors).
* ``trainer_env``: a temporary workspace with a local artifact store (``LocalSink``) and helpers to write datasets
  and configs: ``trainer_env.config(dataset_lines, **training)`` returns a TrainerConfig.

The torch-dependent fixtures skip their tests when torch/transformers/peft are not installed (the trainer extra).
Register with ``pytest_plugins = ["tests.trainer_fixtures"]`` in tests/conftest.py (or import the fixtures).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# A dataset a LoRA on the tiny model memorizes in a few dozen steps.
MEMORIZE_QA = [
    ("What is the capital of France?", "Paris."),
    ("What is the capital of Italy?", "Rome."),
    ("What is the capital of Spain?", "Madrid."),
    ("What colour is the sky?", "The sky is blue."),
    ("What colour is grass?", "Grass is green."),
    ("What is the name of the cat?", "Tom."),
    ("What is the password of the vault?", "swordfish"),
    ("Translate to French: thank you.", "Merci."),
]
MEMORIZE_CHAT = [
    {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": q},
            {"role": "assistant", "content": a},
        ]
    }
    for q, a in MEMORIZE_QA
]


def need_training_stack() -> None:
    """Skip unless the trainer extra (torch, transformers, peft) is installed."""
    for module in ("torch", "transformers", "peft"):
        pytest.importorskip(module, reason="the trainer extra is not installed (pip install -e .[trainer])")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_training_stack()
    from lorafleet_dev.tiny_model import build

    return build(tmp_path_factory.mktemp("tiny-model"))


def write_jsonl(path: Path, lines: Iterable[Any]) -> Path:
    """Write objects as JSON lines; str items are written as they are (for broken lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


@dataclass
class TrainerEnv:
    """A workspace: <root>/store is the local artifact store (s3://bucket/key -> store/bucket/key)."""

    root: Path
    model_dir: Path

    @property
    def store(self) -> Path:
        return self.root / "store"

    def dataset(self, lines: Iterable[Any], name: str = "train.jsonl") -> str:
        write_jsonl(self.store / "datasets" / name, lines)
        return f"s3://datasets/{name}"

    def config(
        self,
        lines: Iterable[Any] | None = None,
        *,
        dataset: dict[str, Any] | None = None,
        lora: dict[str, Any] | None = None,
        name: str = "run",
        **training: Any,
    ) -> Any:
        from lorafleet.contracts.trainer import TrainerConfig

        uri = self.dataset(MEMORIZE_CHAT if lines is None else lines, f"{name}.jsonl")
        settings = {
            "maxSteps": 30,
            "learningRate": 1e-2,
            "batchSize": 4,
            "loggingSteps": 5,
            "checkpointInterval": 10,
            "warmupRatio": 0.0,
            **training,
        }
        if "epochs" in training:
            settings.pop("maxSteps")
        work = self.root / name
        return TrainerConfig.model_validate(
            {
                "job": {"namespace": "tests", "name": name, "uid": f"uid-{name}"},
                "baseModel": {"name": "tiny", "uri": "pvc://models/tiny", "localDir": str(self.model_dir)},
                "dataset": {"uri": uri, "format": "chat", **(dataset or {})},
                "method": "lora",
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0, **(lora or {})},
                "training": settings,
                "output": {
                    "adapterName": name,
                    "version": "v1",
                    "uri": "s3://artifacts/lorafleet",
                    "checkpointUri": f"s3://artifacts/lorafleet/checkpoints/tests/{name}",
                },
                "image": "lorafleet/trainer-cpu:test",
                "workDir": str(work / "work"),
                "statusFile": str(work / "status.json"),
            }
        )

    def write_config(self, config: Any) -> Path:
        path = Path(config.work_dir).parent / "trainer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config.model_dump(mode="json", by_alias=True)))
        return path

    def adapter_dir(self, config: Any) -> Path:
        return self.store / "artifacts" / "lorafleet" / "adapters" / config.output.adapter_name / config.output.version

    def checkpoints_dir(self, config: Any) -> Path:
        return self.store / "artifacts" / "lorafleet" / "checkpoints" / "tests" / config.job.name

    def status(self, config: Any) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(Path(config.status_file).read_text())
        return result

    def sink(self, config: Any) -> Any:
        from lorafleet.trainer.sink import LocalSink

        return LocalSink(config, self.store)


@pytest.fixture
def trainer_env(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> TrainerEnv:
    monkeypatch.setenv("LORAFLEET_LOCAL_STORE", str(tmp_path / "store"))
    return TrainerEnv(tmp_path, tiny_model_dir)


def train_in_process(env: TrainerEnv, config: Any) -> Any:
    """Run the trainer in this process (no signal handlers); returns its RunResult."""
    from lorafleet.trainer.progress import ProgressReporter
    from lorafleet.trainer.train import StopSignal, run

    return run(config, reporter=ProgressReporter(enabled=False), stop=StopSignal(), sink=env.sink(config))


@pytest.fixture(scope="session")
def tiny_adapter_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    env = TrainerEnv(tmp_path_factory.mktemp("tiny-adapter"), tiny_model_dir)
    config = env.config(name="tiny-adapter", maxSteps=40, checkpointInterval=1000)
    train_in_process(env, config)
    return env.adapter_dir(config)


# -- helpers for tests that run the trainer as a program -------------------------------------------------


def adapter_tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def max_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def cli(env: TrainerEnv, config: Any, *extra: str, module: str = "lorafleet.trainer") -> subprocess.Popen[str]:
    path = env.write_config(config)
    return subprocess.Popen(
        [sys.executable, "-m", module, *extra, "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "LORAFLEET_LOCAL_STORE": str(env.store), "PYTHONUNBUFFERED": "1"},
    )


def wait_for_event(proc: subprocess.Popen[str], predicate: Any, timeout: float = 240) -> dict[str, Any]:
    """Read the trainer's JSON lines until one satisfies predicate."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        event = json.loads(line)
        if predicate(event):
            return event
        assert time.monotonic() < deadline, "timed out waiting for the trainer"
    raise AssertionError(f"trainer exited ({proc.wait()}) first: {proc.stderr.read() if proc.stderr else ''}")
