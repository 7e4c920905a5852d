"""Shared pieces of the GPU benchmarks (issue #18): model shapes, a full-vocabulary word tokenizer, model folders
without weights, random LoRA adapters written straight to peft's format, and result helpers.

Nothing here downloads anything, and no weights travel: a 7B-shaped folder is a config.json and a tokenizer (vLLM
fills the weights with `--load-format dummy`; the trainer builds the model from the config on the GPU).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

# Mistral-7B-v0.3's shape (vocab 32768, no sliding window), TinyLlama-1.1B's, and tiny ones for the CPU dry run
# (head_dim 64: vLLM's CPU attention refuses smaller heads).
SHAPES: dict[str, dict[str, Any]] = {
    "mistral-7b": {
        "arch": "mistral", "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0,
    },
    "llama-1b": {
        "arch": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
        "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
        "max_position_embeddings": 4096,
    },
    "tiny-mistral": {
        "arch": "mistral", "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 2048,
    },
    "tiny-llama": {
        "arch": "llama", "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
    },
}  # fmt: skip

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
UNK, BOS, EOS = "<unk>", "<s>", "</s>"


def hf_config(shape: str, dtype: str = "bfloat16") -> Any:
    """The transformers config of a shape (LlamaConfig or MistralConfig)."""
    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    if arch == "mistral":
        from transformers import MistralConfig

        return MistralConfig(**spec, sliding_window=None, bos_token_id=1, eos_token_id=2, dtype=dtype)
    from transformers import LlamaConfig

    return LlamaConfig(**spec, bos_token_id=1, eos_token_id=2, dtype=dtype)


def lora_dims(shape: str) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA target module of a shape."""
    s = SHAPES[shape]
    h, inter = s["hidden_size"], s["intermediate_size"]
    kv = h * s["num_key_value_heads"] // s["num_attention_heads"]
    return {
        "q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
        "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
    }  # fmt: skip


def build_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer covering the whole vocabulary ("t3" is id 3), so that every id a random model emits
    decodes, and a prompt of n words is exactly n tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {UNK: 0, BOS: 1, EOS: 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=UNK, model_max_length=32768
    )


def write_model_folder(out: Path, shape: str, dtype: str = "bfloat16") -> Path:
    """config.json and the tokenizer, no weights (vLLM: --load-format dummy)."""
    out.mkdir(parents=True, exist_ok=True)
    hf_config(shape, dtype).save_pretrained(out)
    build_tokenizer(SHAPES[shape]["vocab_size"]).save_pretrained(out)
    (out / "lorafleet-shape.json").write_text(json.dumps({"shape": shape, **SHAPES[shape]}) + "\n")
    return out


def write_adapter(
    out: Path, shape: str, *, r: int = 16, seed: int = 0, base: str = "base", dtype: str = "bfloat16"
) -> Path:
    """A rank-r LoRA on every linear projection, random non-zero weights, in peft's on-disk format
    (adapter_config.json + adapter_model.safetensors, the keys peft's save_pretrained writes), built without
    loading the base model: for a 7B shape it is 84 MB and takes a second."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    tensors: dict[str, Any] = {}
    for layer in range(SHAPES[shape]["num_hidden_layers"]):
        for module, (fan_in, fan_out) in lora_dims(shape).items():
            part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{module}"
            a = torch.randn(r, fan_in, generator=gen) / math.sqrt(fan_in)
            b = torch.randn(fan_out, r, generator=gen) * 0.01
            tensors[f"{key}.lora_A.weight"] = a.to(torch_dtype).contiguous()
            tensors[f"{key}.lora_B.weight"] = b.to(torch_dtype).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
        "target_modules": list(TARGETS), "bias": "none", "base_model_name_or_path": base, "fan_in_fan_out": False,
        "use_dora": False, "use_rslora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None,
    }  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def link_adapter(src: Path, dst: Path) -> Path:
    """Another adapter folder with the same files (hard links, a copy across file systems): vLLM loads it as a
    separate adapter with its own slot and memory; its speed does not depend on the weights' values."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        target = dst / f.name
        if target.exists():
            continue
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)
    return dst


def zipf_weights(n: int, s: float = 1.0) -> list[float]:
    w = [1.0 / (k**s) for k in range(1, n + 1)]
    total = sum(w)
    return [x / total for x in w]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def prompt_text(rng: random.Random, vocab_size: int, n: int) -> str:
    return " ".join(f"t{rng.randrange(3, vocab_size)}" for _ in range(n))


class Budget:
    """A wall-clock budget: what is left, and whether a step estimated at `need` seconds still fits."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, need: float) -> bool:
        return self.left() >= need


def gpu_memory_used_mib() -> list[int] | None:
    """nvidia-smi's memory.used per GPU (MiB), or None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
        return [int(x) for x in out.split()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)
