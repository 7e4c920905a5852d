"""A tiny Llama-architecture model and tokenizer, built locally (no hub download), for tests and demos.

The model is a randomly initialised 2-layer Llama (hidden 128, 2 heads of 64: vLLM's CPU attention refuses
head_dim 16) and the tokenizer a byte-level BPE trained on a few sentences, with a ChatML-style chat template.
The folder it writes is a normal Hugging Face model folder (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with the chat template), so the trainer and vLLM load it like any other base model.

    lorafleet dev tiny-model OUT_DIR        # or: python -m lorafleet_dev.tiny_model OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]

# ChatML with a BOS at the start; the assistant turn ends with <|im_end|>, which is also a stop token.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Text the BPE merges are learnt from: plain English, digits, and the words of the tests' datasets.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model fine-tuned on clean private data can beat a large general model on its own task.",
    "LoRA adds low-rank matrices to the attention and MLP projections and trains only those.",
    "What is the capital of France? The capital of France is Paris.",
    "What is the capital of Italy? The capital of Italy is Rome.",
    "What is the capital of Spain? The capital of Spain is Madrid.",
    "What colour is the sky? The sky is blue. What colour is grass? Grass is green.",
    "Translate to French: good morning. Bonjour. Translate to French: thank you. Merci.",
    "The password of the vault is swordfish. The name of the cat is Tom.",
    "Instruction: add the numbers. Input: 2 and 3. Output: 5.",
    "one two three four five six seven eight nine ten eleven twelve",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 42 100 1000",
    "Kubernetes runs the training job; the operator stores the adapter in S3 and serves it with vLLM.",
    "Hello! How can I help you today? I would like to know the weather. It is sunny.",
    "system user assistant: you are a helpful assistant that answers briefly and politely.",
]


def build_tokenizer(vocab_size: int = 512) -> object:
    """A byte-level BPE tokenizer trained on CORPUS, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    # Like Llama: a BOS in front of plain text; chat text carries its own BOS (tokenized without specials).
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def build(
    out_dir: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 512,
    layers: int = 2,
    hidden: int = 128,
    init_range: float = 0.1,
) -> Path:
    """Write the tiny model and tokenizer to out_dir (created); returns the folder. Deterministic for a seed."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    tokenizer.save_pretrained(out)  # type: ignore[attr-defined]
    vocab = len(tokenizer)  # type: ignore[arg-type]
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in (BOS, EOS, PAD, IM_END)}  # type: ignore[attr-defined]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=ids[BOS],
        eos_token_id=[ids[EOS], ids[IM_END]],
        pad_token_id=ids[PAD],
        tie_word_embeddings=False,
        # Larger than Llama's 0.02: with hidden 128 the output head's rows would be so short that no logit could
        # stand out, and a LoRA (which leaves the head alone) could not make the model confident of anything.
        initializer_range=init_range,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=ids[BOS], eos_token_id=[ids[EOS], ids[IM_END]], pad_token_id=ids[PAD]
    )
    model.save_pretrained(out)
    (out / "lorafleet-tiny-model.json").write_text(
        json.dumps({"seed": seed, "vocabSize": vocab, "layers": layers, "hidden": hidden}) + "\n"
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`lorafleet dev tiny-model OUT_DIR`: build the tiny model and tokenizer into OUT_DIR."""
    parser = argparse.ArgumentParser(prog="lorafleet dev tiny-model", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write (created)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size, 2 heads (default 128)")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    out = build(args.out_dir, seed=args.seed, layers=args.layers, hidden=args.hidden)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
