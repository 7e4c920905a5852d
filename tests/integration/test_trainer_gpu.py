"""The trainer on a CUDA GPU: bf16 LoRA, QLoRA (4-bit NF4, double quantization, bitsandbytes), NCCL under torchrun,
FSDP (LoRA and QLoRA), and checkpoint/resume on the GPU. Skipped where no GPU is visible (CI has none); run them
on a GPU machine with `bash hack/gpu.sh` (packages its image lacks: `bash hack/gpu-site.sh` here first).

Invariants, as on CPU: the loss on the memorizable dataset drops by far, the adapter is published in peft's format
(safetensors only) with its lineage, and it changes the model's output and gives the memorized answers. On top:
* the run really used the GPU and the precision asked for (the trainer's "start" event);
* QLoRA's base model is quantized to 4 bits (bitsandbytes Linear4bit layers in the trained model), and its adapter
  loads on the same 4-bit base for serving-style inference;
* a run stopped by SIGTERM on the GPU resumes from its checkpoint and ends with the adapter of an uninterrupted
  run (on an H100 the difference was exactly 0; GPU_RESUME_TOLERANCE leaves room for other GPUs' kernels, far
  below the LoRA weights' size of about 0.25).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.trainer_fixtures import (  # noqa: F401
    MEMORIZE_CHAT,
    MEMORIZE_QA,
    TrainerEnv,
    adapter_tensors,
    cli,
    max_difference,
    tiny_model_dir,
    trainer_env,
    wait_for_event,
)

pytestmark = pytest.mark.gpu

GPU_RESUME_TOLERANCE = 1e-3


@pytest.fixture(autouse=True)
def need_gpu() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible (run on a GPU machine)")


def run_cli(env: TrainerEnv, config: Any, *extra: str, module: str = "lorafleet.trainer") -> list[dict[str, Any]]:
    proc = cli(env, config, *extra, module=module)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def start_event(events: list[dict[str, Any]]) -> dict[str, Any]:
    return next(e for e in events if e["event"] == "start")


def memorized(model: Any, tokenizer: Any) -> int:
    import torch

    right = 0
    for (_question, answer), sample in zip(MEMORIZE_QA, MEMORIZE_CHAT, strict=True):
        ids = tokenizer.apply_chat_template(
            sample["messages"][:2], add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(model.device)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=12, do_sample=False)
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        right += text.strip() == answer
    return right


def check_trained(env: TrainerEnv, config: Any, *, quantized_base: bool = False) -> None:
    """Loss dropped, the adapter is peft + safetensors + manifest, and on its base it gives the trained answers."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    folder = env.adapter_dir(config)
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
    ]
    manifest = json.loads((folder / "manifest.json").read_text())
    curve = manifest["metrics"]["lossCurve"]
    assert curve[-1][1] < curve[0][1] / 4, f"loss went from {curve[0][1]} to {curve[-1][1]} only"
    assert manifest["hyperparameters"]["method"] == config.method

    tokenizer = AutoTokenizer.from_pretrained(env.model_dir)
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16, "device_map": {"": 0}}
    if quantized_base:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=torch.bfloat16,
        )
    base = AutoModelForCausalLM.from_pretrained(env.model_dir, **kwargs)
    model = PeftModel.from_pretrained(base, str(folder))
    model.eval()
    right = memorized(model, tokenizer)
    assert right >= 6, f"only {right}/8 memorized answers"


def test_bf16_lora_on_the_gpu(trainer_env: TrainerEnv) -> None:  # noqa: F811
    env = trainer_env
    config = env.config(name="gpu-bf16", maxSteps=60, checkpointInterval=30, loggingSteps=10, packing=True)
    events = run_cli(env, config)
    start = start_event(events)
    assert start["device"].startswith("cuda") and start["precision"] == "bf16", start
    check_trained(env, config)


def test_qlora_trains_a_4bit_base_on_the_gpu(trainer_env: TrainerEnv) -> None:  # noqa: F811
    import bitsandbytes as bnb
    import torch

    from lorafleet.trainer.train import load_model

    env = trainer_env
    config = env.config(
        name="gpu-qlora", maxSteps=80, checkpointInterval=40, loggingSteps=10, gradientCheckpointing=True
    )
    config.method = "qlora"
    # The model the trainer builds: 4-bit NF4 Linear layers under the LoRA adapters, on the GPU.
    model = load_model(config, "bf16")
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 14, f"{len(four_bit)} Linear4bit layers (2 layers x 7 projections expected)"
    weight = four_bit[0].weight
    assert weight.quant_state.quant_type == "nf4" and weight.quant_state.nested, "NF4 with double quantization"
    assert weight.device.type == "cuda"
    del model
    torch.cuda.empty_cache()

    events = run_cli(env, config)
    start = start_event(events)
    assert start["device"].startswith("cuda") and start["method"] == "qlora" and start["precision"] == "bf16", start
    check_trained(env, config, quantized_base=True)


def test_nccl_under_torchrun(trainer_env: TrainerEnv) -> None:  # noqa: F811
    """The operator's launch path (lorafleet.trainer.launch = torchrun) with the NCCL backend, one GPU."""
    env = trainer_env
    config = env.config(name="gpu-nccl", maxSteps=60, checkpointInterval=30, loggingSteps=10)
    config.distributed.backend = "nccl"
    events = run_cli(
        env, config, "--standalone", "--nproc-per-node=1", "-m", "lorafleet.trainer", module="lorafleet.trainer.launch"
    )
    start = start_event(events)
    assert start["device"].startswith("cuda") and start["distributedType"] == "MULTI_GPU", start
    check_trained(env, config)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_fsdp(trainer_env: TrainerEnv, method: str) -> None:  # noqa: F811
    """strategy fsdp (FSDP2 through accelerate) trains and publishes a loadable adapter. One GPU here: the sharding
    is over one process, but the wrapping, the sharded state dict and the adapter export are the real path."""
    env = trainer_env
    config = env.config(name=f"gpu-fsdp-{method}", maxSteps=80, checkpointInterval=40, loggingSteps=10)
    config.method = method  # type: ignore[assignment]
    config.distributed.strategy = "fsdp"
    config.distributed.backend = "nccl"
    events = run_cli(
        env, config, "--standalone", "--nproc-per-node=1", "-m", "lorafleet.trainer", module="lorafleet.trainer.launch"
    )
    start = start_event(events)
    assert start["device"].startswith("cuda") and start["distributedType"] == "FSDP", start
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [40, 80]
    check_trained(env, config, quantized_base=method == "qlora")


def test_sigterm_on_the_gpu_resumes(trainer_env: TrainerEnv, tmp_path: Path) -> None:  # noqa: F811
    env = trainer_env
    # Long enough that the signal lands mid-run however fast the GPU is.
    run = {"maxSteps": 300, "checkpointInterval": 10, "loggingSteps": 1, "learningRate": 5e-3}
    baseline = env.config(name="gpu-baseline", **run)
    run_cli(env, baseline)

    config = env.config(name="gpu-sigterm", **run)
    proc = cli(env, config)
    wait_for_event(proc, lambda e: e["event"] == "progress" and e["step"] >= 25)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr[-4000:]
    stopped = env.status(config)["progress"]["step"]
    assert 25 <= stopped < 300
    events = run_cli(env, config)
    resume = next(e for e in events if e["event"] == "resume")
    assert resume["step"] == stopped
    reference = adapter_tensors(env.adapter_dir(baseline))
    difference = max_difference(reference, adapter_tensors(env.adapter_dir(config)))
    largest = max(float(t.abs().max()) for t in reference.values())
    print(f"resumed vs uninterrupted on the GPU: max abs difference {difference:.2e} (largest weight {largest:.2e})")
    assert difference < GPU_RESUME_TOLERANCE, difference
