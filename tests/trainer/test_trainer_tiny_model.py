"""lorafleet_dev.tiny_model: the tiny Llama the trainer and serving tests share.

Invariants: it is a plain Hugging Face folder (config, safetensors weights, tokenizer with a chat template) that
loads offline; head_dim is 64 (vLLM's CPU attention refuses 16); the same seed gives the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.trainer_fixtures import need_training_stack, tiny_model_dir  # noqa: F401


def test_tiny_model_folder(tiny_model_dir: Path) -> None:  # noqa: F811
    from transformers import AutoConfig, AutoTokenizer

    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(name.endswith((".bin", ".pt")) for name in names)
    config = AutoConfig.from_pretrained(tiny_model_dir, local_files_only=True)
    assert config.model_type == "llama" and config.num_hidden_layers == 2
    assert config.hidden_size // config.num_attention_heads == 64
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    assert len(tokenizer) == config.vocab_size
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in config.eos_token_id and tokenizer.pad_token_id is not None


def test_cli_builds_the_same_weights_for_a_seed(tmp_path: Path) -> None:
    need_training_stack()
    from safetensors.torch import load_file

    from lorafleet_dev.tiny_model import main

    assert main([str(tmp_path / "a")]) == 0
    assert main([str(tmp_path / "b")]) == 0
    assert main([str(tmp_path / "c"), "--seed", "1"]) == 0
    a, b, c = (load_file(str(tmp_path / x / "model.safetensors")) for x in "abc")
    assert all(a[k].equal(b[k]) for k in a) and not all(a[k].equal(c[k]) for k in a)
    assert json.loads((tmp_path / "a/tokenizer.json").read_text()) == json.loads(
        (tmp_path / "b/tokenizer.json").read_text()
    )
