"""Model families: every family docs/serving.md lists trains with the default LoRA settings and its adapter loads
back with peft.

Invariants:
* each family (a random-init tiny model of its transformers class, lorafleet_dev.tiny_families) trains 2 steps with
  the API's default lora settings (all-linear, dropout 0.05) and writes an adapter that peft loads onto the base
  model with the very tensors stored, changing the model's output;
* attention is chosen per class: SDPA where the class supports it, eager otherwise (MPT, GPT-J), flash-attention
  only for flattened packing and a class that has it;
* all-linear leaves a mixture-of-experts model's (Mixtral's, Qwen3-MoE's) experts and router alone;
  lora.targetExperts adapts the experts' weights, and only with dropout 0 (peft's ParamWrapper allows none), refused
  otherwise naming lora.dropout.

Offline: the models and tokenizer are built locally, nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.trainer_fixtures import TrainerEnv, adapter_tensors, need_training_stack, train_in_process

FAMILIES = [
    *("falcon", "gemma", "gpt2", "gpt_neox", "gptj", "llama", "mistral", "mixtral", "mpt", "phi", "phi3", "qwen2"),
    *("qwen3", "qwen3_moe"),
]
MOE = ("mixtral", "qwen3_moe")


def _default_lora() -> dict[str, Any]:
    from lorafleet.api.finetunejob import LoraSettings

    return LoraSettings().model_dump(mode="json", by_alias=True)


def _train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: str, **lora: Any) -> tuple[TrainerEnv, Any]:
    need_training_stack()
    from lorafleet_dev.tiny_families import build_family

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LORAFLEET_LOCAL_STORE", str(tmp_path / "store"))
    env = TrainerEnv(tmp_path, build_family(tmp_path / "model", family))
    config = env.config(name=family, lora={**_default_lora(), **lora}, maxSteps=2, batchSize=2, loggingSteps=1)
    return env, config


def _load_back(env: TrainerEnv, config: Any) -> tuple[Any, dict[str, Any]]:
    """The base model with the stored adapter loaded by peft; asserts peft loaded exactly the stored tensors."""
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    adapter = env.adapter_dir(config)
    base = AutoModelForCausalLM.from_pretrained(env.model_dir, local_files_only=True)
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
    model = PeftModel.from_pretrained(base, adapter)
    stored = adapter_tensors(adapter)
    loaded = get_peft_model_state_dict(model)
    assert stored.keys() == loaded.keys() and stored
    assert all(torch.equal(stored[k], loaded[k].to(stored[k].dtype)) for k in stored)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert not torch.allclose(before, after), "the adapter changes nothing: B stayed zero or was not loaded"
    adapter_config: dict[str, Any] = json.loads((adapter / "adapter_config.json").read_text())
    return model, adapter_config


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_with_defaults_and_the_adapter_loads_back(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env, config = _train(tmp_path, monkeypatch, family)
    assert config.lora.dropout > 0 and config.lora.target_modules == ["all-linear"]
    result = train_in_process(env, config)
    assert result.progress["step"] == 2
    _, adapter_config = _load_back(env, config)
    targets = set(adapter_config["target_modules"])
    assert targets and not adapter_config.get("target_parameters")
    if family in MOE:
        assert targets == {"q_proj", "k_proj", "v_proj", "o_proj"}  # no expert, no router


@pytest.mark.parametrize("family", MOE)
def test_experts_when_asked(family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env, config = _train(tmp_path, monkeypatch, family, targetExperts=True, dropout=0.0)
    train_in_process(env, config)
    model, adapter_config = _load_back(env, config)
    assert set(adapter_config["target_parameters"]) == {"gate_up_proj", "down_proj"}
    assert any("experts" in name and "lora" in name for name, _ in model.named_parameters())


def test_experts_with_dropout_are_refused_naming_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorafleet.trainer.errors import TrainerError

    env, config = _train(tmp_path, monkeypatch, "mixtral", targetExperts=True)
    with pytest.raises(TrainerError) as caught:
        train_in_process(env, config)
    assert "lora.dropout: 0" in str(caught.value) and "lora.targetExperts" in str(caught.value)


def test_attention_is_chosen_per_class() -> None:
    need_training_stack()
    import transformers

    from lorafleet.trainer.model import attention_implementation

    assert attention_implementation(transformers.LlamaForCausalLM, flatten=False) == "sdpa"
    assert attention_implementation(transformers.LlamaForCausalLM, flatten=True) == "flash_attention_2"
    assert attention_implementation(transformers.MptForCausalLM, flatten=False) == "eager"
    assert attention_implementation(transformers.MptForCausalLM, flatten=True) == "eager"  # no flash kernels
    assert attention_implementation(transformers.GPTJForCausalLM, flatten=False) == "eager"
    assert attention_implementation(None, flatten=False) == "sdpa"  # remote code: transformers' own first choice
