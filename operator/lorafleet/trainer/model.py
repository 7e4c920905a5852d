"""The model side of a run: which precision the hardware allows, where the base model comes from, its tokenizer,
and the base model loaded (4-bit for QLoRA) with LoRA adapters attached by peft.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lorafleet.contracts.trainer import TrainerConfig
from lorafleet.trainer.batches import packing_mode
from lorafleet.trainer.errors import (
    BASE_MODEL_INVALID,
    FSDP_NEEDS_GPU,
    LORA_TARGETS_INVALID,
    PRECISION_UNSUPPORTED,
    QLORA_NEEDS_GPU,
    TrainerError,
)


def precision_for(config: TrainerConfig) -> str:
    """fp32, bf16 or fp16; PrecisionUnsupported or QLoRANeedsGPU when the hardware cannot."""
    cuda = torch.cuda.is_available()
    if config.method == "qlora" and not cuda:
        raise TrainerError(
            QLORA_NEEDS_GPU,
            "method qlora quantizes the base model to 4 bits with bitsandbytes, which needs a CUDA GPU, and none "
            "is visible; set resources.gpusPerNode >= 1 or use method lora",
        )
    if config.distributed.strategy == "fsdp" and not cuda:
        raise TrainerError(
            FSDP_NEEDS_GPU,
            "distributed strategy fsdp needs GPUs (accelerate's FSDP has no CPU backend); use ddp on CPU",
        )
    wanted = config.training.precision
    if wanted == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else ("fp16" if config.method == "qlora" else "fp32")
    if wanted == "fp16" and not cuda:
        raise TrainerError(PRECISION_UNSUPPORTED, "precision fp16 needs a GPU; use bf16, fp32 or auto on CPU")
    if wanted == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise TrainerError(PRECISION_UNSUPPORTED, "precision bf16 is not supported by this GPU; use fp16 or auto")
    return wanted


def model_source(config: TrainerConfig) -> tuple[str, dict[str, Any]]:
    """Where from_pretrained loads the base model: the local folder, or the hub when the BaseModel allows it."""
    base = config.base_model
    local = Path(base.local_dir)
    if (local / "config.json").is_file():
        return str(local), {"local_files_only": not base.allow_public_download}
    if base.uri.startswith("hf://") and base.allow_public_download:
        from lorafleet.uris import parse

        location = parse(base.uri)
        return location.authority, {"revision": location.revision} if location.revision else {}
    raise TrainerError(
        BASE_MODEL_INVALID,
        f"no model in {local} (config.json missing) for base model {base.name} ({base.uri})",
    )


def check_qlora_dependencies() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise TrainerError(
            QLORA_NEEDS_GPU, "method qlora needs the bitsandbytes package, which this trainer image lacks"
        ) from e


def load_tokenizer(config: TrainerConfig) -> Any:
    source, kwargs = model_source(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise TrainerError(BASE_MODEL_INVALID, f"cannot load the tokenizer of {config.base_model.name}: {e}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(config: TrainerConfig, precision: str) -> Any:
    """The base model with LoRA adapters (peft), ready for the Trainer."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    source, kwargs = model_source(config)
    kwargs["attn_implementation"] = attention_implementation(
        model_class(source, kwargs), flatten=packing_mode(config) == "flatten"
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if config.method == "qlora":
        check_qlora_dependencies()
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,  # FSDP shards uniform storage
        )
        if config.distributed.nodes * config.distributed.processes_per_node == 1:
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise TrainerError(BASE_MODEL_INVALID, f"cannot load base model {config.base_model.name}: {e}") from e
    # No KV cache in training; also, transformers detects packed rows (flatten) only without one.
    model.config.use_cache = False
    if config.method == "qlora":
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model,
            use_gradient_checkpointing=config.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    lora = config.lora
    targets: list[str] = list(lora.target_modules)
    parameters: list[str] = []
    if lora.target_modules == ["all-linear"]:
        targets, parameters = linear_targets(model, experts=lora.target_experts)
    if parameters and lora.dropout:
        raise TrainerError(
            LORA_TARGETS_INVALID,
            "lora.targetExperts: expert weights are adapted as parameters (peft's ParamWrapper), which allows no "
            "LoRA dropout; set lora.dropout: 0",
        )
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        target_parameters=parameters or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, peft_config)
    except ValueError as e:
        hint = "; set lora.dropout: 0 to adapt expert weights" if "lora_dropout" in str(e) else ""
        raise TrainerError(LORA_TARGETS_INVALID, f"lora.targetModules {lora.target_modules}: {e}{hint}") from e
    return peft_model


# -- per-model choices ---------------------------------------------------------------------------------------------


def model_class(source: str, kwargs: dict[str, Any]) -> type | None:
    """The transformers class from_pretrained will build for the model's config (None: remote code, or unknown)."""
    from transformers import AutoConfig

    hub = {k: v for k, v in kwargs.items() if k in ("local_files_only", "revision")}
    try:
        model_config = AutoConfig.from_pretrained(source, **hub)
        mapped = AutoModelForCausalLM._model_mapping[type(model_config)]
    except (KeyError, OSError, ValueError):
        return None
    return mapped if isinstance(mapped, type) else None


def attention_implementation(cls: type | None, *, flatten: bool) -> str:
    """Attention kernels for a model class: flash-attention for flattened packing (installed, and the class has
    it), else SDPA where the class supports it, else eager (MPT, GPT-J: forcing SDPA on them fails to load).
    Unknown classes get SDPA, as transformers itself would try first."""
    if cls is None:
        return "sdpa"
    if flatten and getattr(cls, "_supports_flash_attn", False):
        return "flash_attention_2"
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"


def is_expert_module(path: str, module: Any, parent: Any) -> bool:
    """A mixture-of-experts expert or router: anything under an `experts` container, or the gate/router that
    picks experts (a child of a class named ...Moe...Block / ...MoE...)."""
    parts = path.split(".")
    if "experts" in parts[:-1] or parts[-1] == "experts":
        return True
    return parts[-1] in ("gate", "router") and "moe" in type(parent).__name__.lower()


def linear_targets(model: Any, *, experts: bool) -> tuple[list[str], list[str]]:
    """What `all-linear` adapts: (target modules, target parameters) for peft.

    Every linear layer (nn.Linear, GPT-2's Conv1D) but the output head, as peft's all-linear, except in mixture-of-
    experts models: there the experts and their router are left alone unless `experts`; then the experts' weights
    (stacked parameters in transformers 5, which peft adapts through its ParamWrapper) are targeted too.
    Leaf names where unambiguous (short adapter configs, as peft writes), full paths where a dense layer shares its
    name with an expert's.
    """
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    modules = dict(model.named_modules())
    dense: list[str] = []
    expert_leaves: set[str] = set()
    parameters: set[str] = set()
    for path, module in modules.items():
        parent = modules.get(path.rpartition(".")[0]) if path else None
        expert = bool(path) and is_expert_module(path, module, parent)
        if expert and experts and path.split(".")[-1] == "experts":
            parameters |= {name for name, _ in module.named_parameters(recurse=False)}
        if not isinstance(module, torch.nn.Linear | Conv1D) or module is head:
            continue
        if expert:
            expert_leaves.add(path.rsplit(".", 1)[-1])
            if experts:
                dense.append(path)  # experts and routers kept as nn.Linear (older layouts): plain targets
        else:
            dense.append(path)
    leaves = {p.rsplit(".", 1)[-1] for p in dense}
    clash = leaves & expert_leaves if not experts else set()
    targets = sorted({p if p.rsplit(".", 1)[-1] in clash else p.rsplit(".", 1)[-1] for p in dense})
    return targets, sorted(parameters)


def decoder_layer_classes(model: Any) -> list[str]:
    """The class names of the model's transformer layers (FSDP wraps each), from peft's wrapper or the model."""
    names = getattr(model, "_no_split_modules", None) or getattr(
        getattr(model, "base_model", None) and model.get_base_model(), "_no_split_modules", None
    )
    return list(names or [])
