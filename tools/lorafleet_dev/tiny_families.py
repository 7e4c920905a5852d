"""Tiny random-init models of each model family lorafleet documents (docs/serving.md), built offline from
transformers' config classes with the tiny tokenizer of lorafleet_dev.tiny_model.

Each is a normal Hugging Face folder (config.json, model.safetensors, tokenizer with the chat template): 2 layers,
hidden 64, 2 heads, a vocabulary of a few hundred tokens. Small enough to train on CPU in a second; they say
nothing about quality, only that each architecture loads, trains and saves an adapter peft loads back.

    python -m lorafleet_dev.tiny_families OUT_DIR FAMILY
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HIDDEN, LAYERS, HEADS = 64, 2, 2


def _llama_like(cls_name: str, **extra: Any) -> Callable[[dict[str, Any]], Any]:
    def make(ids: dict[str, Any]) -> Any:
        import transformers

        return getattr(transformers, cls_name)(
            hidden_size=HIDDEN,
            intermediate_size=HIDDEN * 2,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS,
            max_position_embeddings=512,
            **ids,
            **extra,
        )

    return make


def _config(cls_name: str, **fields: Any) -> Callable[[dict[str, Any]], Any]:
    def make(ids: dict[str, Any]) -> Any:
        import transformers

        return getattr(transformers, cls_name)(**ids, **fields)

    return make


# family (BaseModel spec.family, the config's model_type) -> its tiny config, given the tokenizer's ids.
FAMILIES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "llama": _llama_like("LlamaConfig"),
    "mistral": _llama_like("MistralConfig", sliding_window=None),
    "mixtral": _llama_like("MixtralConfig", num_local_experts=4, num_experts_per_tok=2),
    "qwen2": _llama_like("Qwen2Config"),
    "qwen3": _llama_like("Qwen3Config", head_dim=HIDDEN // HEADS),
    "qwen3_moe": _llama_like(
        "Qwen3MoeConfig", head_dim=HIDDEN // HEADS, moe_intermediate_size=HIDDEN, num_experts=4, num_experts_per_tok=2
    ),
    "gemma": _llama_like("GemmaConfig", head_dim=HIDDEN // HEADS),
    "phi3": _llama_like("Phi3Config"),
    "phi": _config(
        "PhiConfig",
        hidden_size=HIDDEN,
        intermediate_size=HIDDEN * 2,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=512,
    ),
    "falcon": _config("FalconConfig", hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS),
    "mpt": _config("MptConfig", d_model=HIDDEN, n_heads=HEADS, n_layers=LAYERS, max_seq_len=512, expansion_ratio=2),
    "gptj": _config("GPTJConfig", n_embd=HIDDEN, n_head=HEADS, n_layer=LAYERS, rotary_dim=16, n_positions=512),
    "gpt_neox": _config(
        "GPTNeoXConfig",
        hidden_size=HIDDEN,
        intermediate_size=HIDDEN * 2,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=512,
    ),
    "gpt2": _config("GPT2Config", n_embd=HIDDEN, n_head=HEADS, n_layer=LAYERS, n_positions=512),
}


def build_family(out_dir: str | Path, family: str, *, seed: int = 0) -> Path:
    """Write a tiny random-init model of `family` and the tiny tokenizer to out_dir; returns the folder."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorafleet_dev.tiny_model import BOS, EOS, IM_END, PAD, build_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer: Any = build_tokenizer(vocab_size=300)
    tokenizer.save_pretrained(out)
    token = tokenizer.convert_tokens_to_ids
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": token(BOS),
        "eos_token_id": [token(EOS), token(IM_END)],
        "pad_token_id": token(PAD),
    }
    config = FAMILIES[family](ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    model.save_pretrained(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[1] not in FAMILIES:
        print(f"usage: python -m lorafleet_dev.tiny_families OUT_DIR {{{','.join(FAMILIES)}}}", file=sys.stderr)
        return 2
    print(build_family(args[0], args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
