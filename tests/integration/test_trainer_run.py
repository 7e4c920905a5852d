"""Real training runs of lorafleet.trainer on the tiny Llama (CPU, tens of steps each). No cluster needed.

Invariants:
* training works: the loss on a memorizable dataset drops by far, and the published adapter (peft format,
  safetensors only) loads with peft, changes the model's output and answers the memorized questions;
* the CLI writes one JSON status the operator reads, JSON progress lines, and the lineage manifest;
* a run stopped by SIGTERM checkpoints and exits 3; a run killed with SIGKILL loses only the steps since its last
  checkpoint; either way the resumed run ends with the same adapter as an uninterrupted one (max abs difference
  RESUME_TOLERANCE on every LoRA weight);
* each bad input exits 2 with its documented reason; torchrun with 2 gloo processes trains and keeps exit codes.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lorafleet.contracts.serving import ENGINE_MODEL_DIR
from tests.trainer_fixtures import (  # noqa: F401
    MEMORIZE_CHAT,
    MEMORIZE_QA,
    TrainerEnv,
    adapter_tensors,
    cli,
    max_difference,
    tiny_adapter_dir,
    tiny_model_dir,
    train_in_process,
    trainer_env,
    wait_for_event,
)

# Resumed and uninterrupted runs do the same float operations in the same order on CPU; allow for rounding only.
RESUME_TOLERANCE = 1e-5
# Same hyperparameters for the uninterrupted run and the interrupted ones (dropout exercises the RNG restore).
RESUME_RUN = {"maxSteps": 60, "checkpointInterval": 10, "loggingSteps": 1, "learningRate": 5e-3}
RESUME_LORA = {"dropout": 0.1}


async def _resolved_by_vllm_filesystem_resolver(adapter_dir: Path) -> None:
    """vLLM's own filesystem resolver (run in-process, as in a pod whose --model is ENGINE_MODEL_DIR) accepts it."""
    from vllm.plugins.lora_resolvers.filesystem_resolver import FilesystemResolver

    request = await FilesystemResolver(str(adapter_dir.parent)).resolve_lora(ENGINE_MODEL_DIR, adapter_dir.name)
    assert request is not None and request.lora_path == str(adapter_dir)


# -- training works ------------------------------------------------------------------------------------------


def test_loss_drops_and_adapter_changes_the_model(tiny_model_dir: Path, tiny_adapter_dir: Path) -> None:  # noqa: F811
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = json.loads((tiny_adapter_dir / "manifest.json").read_text())
    curve = manifest["metrics"]["lossCurve"]
    first, last = curve[0][1], curve[-1][1]
    assert last < first / 4, f"loss went from {first} to {last} only"
    # peft's format, safetensors only.
    assert sorted(p.name for p in tiny_adapter_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
    ]
    config = json.loads((tiny_adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    # The value vLLM's resolver plugins compare with its --model; the base model's URI stays in the lineage.
    assert config["base_model_name_or_path"] == ENGINE_MODEL_DIR
    assert manifest["baseModel"]["uri"].startswith(("s3://", "pvc://", "/", "file://")), manifest["baseModel"]
    asyncio.run(_resolved_by_vllm_filesystem_resolver(tiny_adapter_dir))

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompt = tokenizer.apply_chat_template(
        MEMORIZE_CHAT[0]["messages"][:2], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        base_logits = base(**prompt).logits
    model = PeftModel.from_pretrained(base, str(tiny_adapter_dir))
    model.eval()
    with torch.no_grad():
        tuned_logits = model(**prompt).logits
    assert float((tuned_logits - base_logits).abs().max()) > 1.0

    right = 0
    for (_question, answer), sample in zip(MEMORIZE_QA, MEMORIZE_CHAT, strict=True):
        ids = tokenizer.apply_chat_template(
            sample["messages"][:2], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        right += text.strip() == answer
    assert right >= 6, f"only {right}/8 memorized answers"


def test_cli_run_status_progress_lines_and_lineage(trainer_env: TrainerEnv) -> None:  # noqa: F811
    """Completion format with an eval file, packing, gradient accumulation and checkpointing, linear decay."""
    env = trainer_env
    lines = [{"prompt": f"Q: {q}\nA:", "completion": f" {a}"} for q, a in MEMORIZE_QA]
    config = env.config(
        lines,
        name="cli",
        dataset={"format": "completion", "evalUri": env.dataset(lines[:3], "eval.jsonl")},
        maxSteps=12,
        batchSize=2,
        gradientAccumulationSteps=2,
        packing=True,
        gradientCheckpointing=True,
        lrScheduler="linear",
        warmupRatio=0.1,
        loggingSteps=4,
        checkpointInterval=6,
    )
    proc = cli(env, config)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    events = [json.loads(line) for line in stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["dataset", "start"] and kinds[-2:] == ["published", "done"]
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in progress] == [1, 4, 8, 12]
    assert all({"loss", "learningRate", "etaSeconds", "totalSteps"} <= e.keys() for e in progress)
    assert "tokensPerSecond" in progress[-1]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [6, 12]
    assert [e["step"] for e in events if e["event"] == "eval"] == [6, 12]

    status = env.status(config)
    assert set(status) == {"version", "progress", "metrics", "artifact", "tokensTrained"}  # no evaluation configured
    assert isinstance(status["tokensTrained"], int) and status["tokensTrained"] > 0
    assert status["progress"]["step"] == 12 and status["progress"]["totalSteps"] == 12
    assert {"trainLoss", "evalLoss", "tokensPerSecond", "trainSeconds", "wallSeconds"} <= status["metrics"].keys()
    assert status["artifact"]["uri"] == "s3://artifacts/lorafleet/adapters/cli/v1"
    manifest_raw = (env.adapter_dir(config) / "manifest.json").read_bytes()
    import hashlib

    assert status["artifact"]["digest"] == "sha256:" + hashlib.sha256(manifest_raw).hexdigest()
    manifest = json.loads(manifest_raw)
    assert manifest["dataset"]["uri"] == config.dataset.uri and len(manifest["dataset"]["sha256"]) == 64
    assert manifest["dataset"]["eval"]["samples"] == 3
    assert manifest["hyperparameters"]["training"]["packing"] is True
    assert manifest["hyperparameters"]["job"]["uid"] == "uid-cli"
    assert len(manifest["metrics"]["lossCurve"]) == 4 and len(manifest["metrics"]["evalLossCurve"]) >= 2
    assert manifest["baseModel"]["name"] == "tiny" and manifest["trainerImage"] == config.image


def test_a_retry_after_publishing_does_not_train_again(trainer_env: TrainerEnv) -> None:  # noqa: F811
    env = trainer_env
    config = env.config(name="again", maxSteps=4, checkpointInterval=100)
    first = train_in_process(env, config)
    second = train_in_process(env, config)
    assert second.skipped and second.artifact.digest == first.artifact.digest
    assert second.metrics["trainLoss"] == pytest.approx(first.metrics["trainLoss"])


# -- checkpoint and resume -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:  # noqa: F811
    env = TrainerEnv(tmp_path_factory.mktemp("uninterrupted"), tiny_model_dir)
    config = env.config(name="baseline", lora=RESUME_LORA, **RESUME_RUN)
    train_in_process(env, config)
    return adapter_tensors(env.adapter_dir(config))


def test_sigterm_checkpoints_and_the_retry_resumes(trainer_env: TrainerEnv, uninterrupted: dict[str, Any]) -> None:  # noqa: F811
    env = trainer_env
    config = env.config(name="sigterm", lora=RESUME_LORA, **RESUME_RUN)
    proc = cli(env, config)
    wait_for_event(proc, lambda e: e["event"] == "progress" and e["step"] >= 15)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr
    status = env.status(config)
    assert status["error"]["reason"] == "Interrupted"
    stopped_at = status["progress"]["step"]
    assert 15 <= stopped_at < 60
    assert f"step {stopped_at}/60" in status["error"]["message"]
    assert env.sink(config).latest_checkpoint() == stopped_at  # the checkpoint is at the very step it stopped

    retry = cli(env, config)
    stdout, stderr = retry.communicate(timeout=300)
    assert retry.returncode == 0, stderr
    events = [json.loads(line) for line in stdout.splitlines()]
    assert {"event": "resume", "step": stopped_at}.items() <= next(e for e in events if e["event"] == "resume").items()
    assert min(e["step"] for e in events if e["event"] == "progress") > stopped_at
    assert env.status(config)["progress"]["step"] == 60
    assert max_difference(adapter_tensors(env.adapter_dir(config)), uninterrupted) <= RESUME_TOLERANCE


def test_sigkill_loses_only_the_steps_since_the_last_checkpoint(
    trainer_env: TrainerEnv,  # noqa: F811
    uninterrupted: dict[str, Any],
) -> None:
    env = trainer_env
    config = env.config(name="sigkill", lora=RESUME_LORA, **RESUME_RUN)
    proc = cli(env, config)
    wait_for_event(proc, lambda e: e["event"] == "checkpoint" and e["step"] == 20)
    proc.kill()
    proc.wait(timeout=60)
    latest = env.sink(config).latest_checkpoint()
    assert latest is not None and 20 <= latest < 60
    result = train_in_process(env, config)
    assert result.progress["step"] == 60
    assert max_difference(adapter_tensors(env.adapter_dir(config)), uninterrupted) <= RESUME_TOLERANCE


# -- bad input -----------------------------------------------------------------------------------------------

LONG = "one two three four five six seven eight nine ten eleven twelve " * 8

BAD_DATASETS = {
    "bad-json": (["{not json"], {}, "DatasetInvalid", "line 1: invalid JSON"),
    "missing-field": ([{"msgs": []}], {}, "DatasetInvalid", 'line 1: missing field "messages"'),
    "unknown-role": (
        [MEMORIZE_CHAT[0], {"messages": [{"role": "robot", "content": "x"}]}],
        {},
        "DatasetInvalid",
        'line 2: message 1 has unknown role "robot"',
    ),
    "empty": ([], {}, "DatasetEmpty", "has no samples"),
    "all-overlong-dropped": (
        [{"text": LONG}],
        {"dataset": {"format": "text", "overlong": "drop"}, "maxSequenceLength": 16},
        "DatasetEmpty",
        "1 longer than training.maxSequenceLength=16",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DATASETS))
def test_bad_dataset_exits_2_with_its_reason(trainer_env: TrainerEnv, case: str) -> None:  # noqa: F811
    from lorafleet.trainer.main import main

    lines, extra, reason, fragment = BAD_DATASETS[case]
    config = trainer_env.config(lines, name=case, **extra)
    assert main(["--config", str(trainer_env.write_config(config))]) == 2
    status = trainer_env.status(config)
    assert status["error"]["reason"] == reason
    assert fragment in status["error"]["message"]
    assert not trainer_env.adapter_dir(config).exists()


def test_missing_dataset_and_base_model(trainer_env: TrainerEnv) -> None:  # noqa: F811
    from lorafleet.trainer.main import main

    config = trainer_env.config(name="nodata")
    config.dataset.uri = "s3://datasets/missing.jsonl"
    assert main(["--config", str(trainer_env.write_config(config))]) == 2
    assert trainer_env.status(config)["error"]["reason"] == "DatasetNotFound"
    config = trainer_env.config(name="nomodel")
    config.base_model.local_dir = str(trainer_env.root / "empty")
    assert main(["--config", str(trainer_env.write_config(config))]) == 2
    assert trainer_env.status(config)["error"]["reason"] == "BaseModelInvalid"


def test_version_of_another_job_is_never_overwritten(trainer_env: TrainerEnv) -> None:  # noqa: F811
    from lorafleet.trainer.main import main

    config = trainer_env.config(name="taken")
    folder = trainer_env.root / "other-adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    trainer_env.sink(config).publish_adapter(folder, {"hyperparameters": {"job": {"uid": "someone-else"}}})
    assert main(["--config", str(trainer_env.write_config(config))]) == 2
    assert trainer_env.status(config)["error"]["reason"] == "AdapterVersionExists"


@pytest.mark.skipif(os.environ.get("CUDA_VISIBLE_DEVICES") not in (None, ""), reason="a GPU may be visible")
def test_qlora_on_cpu_exits_2(trainer_env: TrainerEnv) -> None:  # noqa: F811
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    from lorafleet.trainer.main import main

    config = trainer_env.config(name="qlora")
    config.method = "qlora"
    assert main(["--config", str(trainer_env.write_config(config))]) == 2
    status = trainer_env.status(config)
    assert status["error"]["reason"] == "QLoRANeedsGPU" and "gpusPerNode" in status["error"]["message"]


def test_bad_config_exits_2_without_loading_torch(tmp_path: Path) -> None:
    status = tmp_path / "status.json"
    path = tmp_path / "trainer.json"
    path.write_text(json.dumps({"job": {"name": "x"}}))
    proc = subprocess.run(
        [sys.executable, "-m", "lorafleet.trainer", "--config", str(path), "--status-file", str(status)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    error = json.loads(status.read_text())["error"]
    assert error["reason"] == "ConfigInvalid" and "job.namespace" in error["message"]


def test_validate_only(trainer_env: TrainerEnv) -> None:  # noqa: F811
    from lorafleet.trainer.main import main

    good = trainer_env.config(name="valid")
    assert main(["--validate-only", "--config", str(trainer_env.write_config(good))]) == 0
    bad = trainer_env.config(["{"], name="invalid")
    assert main(["--validate-only", "--config", str(trainer_env.write_config(bad))]) == 2


# -- distributed -----------------------------------------------------------------------------------------------


def test_two_gloo_processes_train_and_keep_exit_codes(trainer_env: TrainerEnv) -> None:  # noqa: F811
    env = trainer_env
    config = env.config(name="ddp", maxSteps=10, batchSize=2, checkpointInterval=5)
    config.distributed.processes_per_node = 2
    config.distributed.backend = "gloo"
    launch = ("--standalone", "--nproc-per-node=2", "-m", "lorafleet.trainer")
    proc = cli(env, config, *launch, module="lorafleet.trainer.launch")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    start = next(e for e in events if e["event"] == "start")
    assert start["worldSize"] == 2
    assert sum(e["event"] == "published" for e in events) == 1  # rank 0 publishes, rank 1 does not report
    status = env.status(config)
    assert status["progress"]["step"] == 10 and status["artifact"]["uri"].endswith("/adapters/ddp/v1")
    assert sorted(p.name for p in env.checkpoints_dir(config).iterdir()) == ["checkpoint-10", "checkpoint-5"]

    bad = env.config(["{"], name="ddp-bad")
    bad.distributed.processes_per_node = 2
    bad.distributed.backend = "gloo"
    proc = cli(env, bad, *launch, module="lorafleet.trainer.launch")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr
    assert env.status(bad)["error"]["reason"] == "DatasetInvalid"


def test_fsdp_on_cpu_exits_2(trainer_env: TrainerEnv) -> None:  # noqa: F811
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    from lorafleet.trainer.main import main

    config = trainer_env.config(name="fsdp")
    config.distributed.strategy = "fsdp"
    assert main(["--config", str(trainer_env.write_config(config))]) == 2
    assert trainer_env.status(config)["error"]["reason"] == "FSDPNeedsGPU"


class StopAtStep:
    """A StopSignal whose SIGTERM 'arrives' during optimizer step `step` (the callback asks once per step)."""

    def __init__(self, step: int) -> None:
        self.step, self.asked, self.in_loop = step, 0, False

    @property
    def requested(self) -> int | None:
        self.asked += 1
        return signal.SIGTERM if self.asked >= self.step else None


def test_resume_mid_epoch_with_length_grouped_packing(tmp_path: Path, tiny_model_dir: Path) -> None:  # noqa: F811
    """Packing on CPU groups samples by length with a seeded sampler: a resume two epochs in replays its order."""
    from lorafleet.trainer.errors import Interrupted
    from lorafleet.trainer.progress import ProgressReporter
    from lorafleet.trainer.train import run

    lines = [{"text": " ".join(["word"] * n)} for n in range(1, 17)]  # 16 samples of 16 lengths
    settings = {"maxSteps": 20, "batchSize": 2, "packing": True, "checkpointInterval": 100, "lora": RESUME_LORA}
    whole = TrainerEnv(tmp_path / "whole", tiny_model_dir)
    config = whole.config(lines, name="packed", dataset={"format": "text"}, **settings)
    train_in_process(whole, config)

    parts = TrainerEnv(tmp_path / "parts", tiny_model_dir)
    config = parts.config(lines, name="packed", dataset={"format": "text"}, **settings)
    with pytest.raises(Interrupted):
        run(config, reporter=ProgressReporter(enabled=False), stop=StopAtStep(11), sink=parts.sink(config))  # type: ignore[arg-type]
    assert parts.sink(config).latest_checkpoint() == 11  # mid-way through the second epoch (8 steps each)
    train_in_process(parts, config)
    difference = max_difference(adapter_tensors(parts.adapter_dir(config)), adapter_tensors(whole.adapter_dir(config)))
    assert difference <= RESUME_TOLERANCE


def test_a_failed_upload_is_retried_without_training_again(trainer_env: TrainerEnv) -> None:  # noqa: F811
    """The last step is checkpointed before publishing: a retry after a failed upload resumes there, trains
    nothing and publishes the same adapter."""
    from lorafleet.trainer.errors import UPLOAD_FAILED, TrainerError
    from lorafleet.trainer.progress import ProgressReporter
    from lorafleet.trainer.sink import LocalSink
    from lorafleet.trainer.train import StopSignal, run

    class BrokenStore(LocalSink):
        def publish_adapter(self, local_dir: Path, lineage: dict[str, Any]) -> Any:
            raise TrainerError(UPLOAD_FAILED, "the store went away")

    env = trainer_env
    config = env.config(name="upload", maxSteps=6, checkpointInterval=100)
    with pytest.raises(TrainerError, match="went away"):
        run(config, reporter=ProgressReporter(enabled=False), stop=StopSignal(), sink=BrokenStore(config, env.store))
    assert env.sink(config).latest_checkpoint() == 6
    out = io.StringIO()
    result = run(config, reporter=ProgressReporter(out, tty=False), stop=StopSignal(), sink=env.sink(config))
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert not [e for e in events if e["event"] == "progress"]  # nothing trained again
    assert result.progress["step"] == 6 and result.metrics["trainLoss"] > 0 and result.artifact is not None
