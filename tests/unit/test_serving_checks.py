"""Compatibility checks of the adapter-sync sidecar (pure functions) and its reading of vLLM's refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lorafleet.contracts.serving import DesiredAdapterSet
from lorafleet.serving.checks import (
    PERMANENT,
    Reason,
    adapter_rank,
    check_adapter_config,
    check_base_model,
    check_files,
    check_manifest,
    classify_engine_error,
    read_adapter_config,
    supported_target_modules,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
LLAMA = supported_target_modules("llama")


def desired(**kw: Any) -> DesiredAdapterSet:
    return DesiredAdapterSet.model_validate({"baseModel": "llama-8b", "maxLoraRank": 16, **kw})


def manifest(
    base: dict[str, Any] | None = None, files: tuple[str, ...] = ("adapter_config.json", "adapter_model.safetensors")
) -> dict[str, Any]:
    m: dict[str, Any] = {"kind": "adapter", "files": [{"path": p, "sha256": "0" * 64, "size": 1} for p in files]}
    if base is not None:
        m["baseModel"] = base
    return m


def lora(**kw: Any) -> dict[str, Any]:
    return {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **kw}


# -- manifest stage ---------------------------------------------------------------------------------------------


def test_a_compatible_manifest_passes() -> None:
    assert check_manifest("a", "s3://b/a/v1", D1, manifest({"name": "llama-8b"}), D1, desired()) is None


def test_a_pinned_digest_must_match() -> None:
    refusal = check_manifest("a", "s3://b/a/v1", D1, manifest({"name": "llama-8b"}), D2, desired())
    assert refusal is not None and refusal.reason == Reason.CHECKSUM_MISMATCH
    assert D1 in refusal.message and D2 in refusal.message
    assert check_manifest("a", "s3://b/a/v1", None, manifest({"name": "llama-8b"}), D2, desired()) is None


@pytest.mark.parametrize(
    ("base", "set_digest", "ok"),
    [
        ({"name": "llama-8b"}, None, True),
        ({"name": "mistral-7b"}, None, False),
        ({"name": "llama-8b", "digest": D1}, D1, True),
        ({"name": "llama-8b", "digest": D1}, D2, False),  # same name, other weights
        ({"name": "llama-8b-copy", "digest": D1}, D1, True),  # other name, same weights
        ({"name": "llama-8b", "digest": D1}, None, True),  # one digest unknown: the names decide
        ({"name": "mistral-7b", "uri": "s3://m/mistral"}, D1, False),
        (None, None, False),  # no lineage: cannot be checked
    ],
)
def test_the_base_model_must_match(base: dict[str, Any] | None, set_digest: str | None, ok: bool) -> None:
    refusal = check_base_model("a", manifest(base), desired(baseModelDigest=set_digest))
    assert (refusal is None) == ok
    if refusal is not None:
        assert refusal.reason == Reason.BASE_MODEL_MISMATCH and refusal.permanent


@pytest.mark.parametrize(
    "files",
    [
        ("adapter_config.json", "adapter_model.bin"),
        ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"),  # a pickle beside: refused
        ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt"),
        ("adapter_config.json", "weights/ADAPTER.PTH"),
        ("adapter_config.json",),
    ],
)
def test_pickles_are_refused_and_safetensors_required(files: tuple[str, ...]) -> None:
    refusal = check_files("a", files)
    assert refusal is not None and refusal.reason == Reason.UNSAFE_FORMAT and refusal.permanent


def test_a_folder_without_config_is_not_an_adapter() -> None:
    refusal = check_files("a", ["adapter_model.safetensors"])
    assert refusal is not None and refusal.reason == Reason.UNSUPPORTED_ADAPTER


def test_extra_safe_files_are_fine() -> None:
    assert check_files("a", ["README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]) is None


# -- adapter_config stage ---------------------------------------------------------------------------------------


def test_a_plain_lora_within_limits_passes() -> None:
    assert check_adapter_config("a", lora(), 16, LLAMA) is None
    assert check_adapter_config("a", lora(r=16), 16, LLAMA) is None
    assert check_adapter_config("a", lora(target_modules="model.*proj"), 16, LLAMA) is None  # regex: vLLM decides


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (lora(r=32), Reason.RANK_EXCEEDS_MAX),
        (lora(r=8, rank_pattern={"q_proj": 64}), Reason.RANK_EXCEEDS_MAX),
        (lora(target_modules=["q_proj", "input_layernorm"]), Reason.UNSUPPORTED_TARGET_MODULES),
        (lora(use_dora=True), Reason.UNSUPPORTED_ADAPTER),
        (lora(lora_bias=True), Reason.UNSUPPORTED_ADAPTER),
        (lora(modules_to_save=["embed_tokens"]), Reason.UNSUPPORTED_ADAPTER),
        (lora(peft_type="IA3"), Reason.UNSUPPORTED_ADAPTER),
        (lora(r=0), Reason.UNSUPPORTED_ADAPTER),
        (lora(r="8"), Reason.UNSUPPORTED_ADAPTER),
    ],
)
def test_incompatible_configs_are_refused(config: dict[str, Any], reason: str) -> None:
    refusal = check_adapter_config("a", config, 16, LLAMA)
    assert refusal is not None and refusal.reason == reason and refusal.permanent


def test_the_rank_message_says_what_to_do() -> None:
    refusal = check_adapter_config("a", lora(r=32), 16, LLAMA)
    assert refusal is not None
    assert "rank 32" in refusal.message and "maxLoraRank 16" in refusal.message


def test_target_modules_are_not_checked_without_a_list() -> None:
    assert check_adapter_config("a", lora(target_modules=["anything"]), 16, None) is None


def test_classification_modules_to_save_are_allowed() -> None:
    assert check_adapter_config("a", lora(modules_to_save=["score"]), 16, LLAMA) is None


def test_rank_of_a_config() -> None:
    assert adapter_rank(lora(r=8, rank_pattern={"a": 4, "b": 12})) == 12
    assert adapter_rank({"r": True}) is None


def test_read_adapter_config(tmp_path: Path) -> None:
    assert read_adapter_config("a", tmp_path)[1] is not None
    (tmp_path / "adapter_config.json").write_text("{not json")
    config, refusal = read_adapter_config("a", tmp_path)
    assert config is None and refusal is not None and refusal.reason == Reason.UNSUPPORTED_ADAPTER
    (tmp_path / "adapter_config.json").write_text(json.dumps(lora()))
    assert read_adapter_config("a", tmp_path) == (lora(), None)


def test_supported_target_modules_by_family() -> None:
    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert supported_target_modules("llama") == [*linear, "embed_tokens", "lm_head"]
    # As vLLM's classes: Llama's takes LoRA on the embeddings and the head, Mistral's (embedding_modules {}) does not.
    head = lora(target_modules=["q_proj", "lm_head"])
    assert check_adapter_config("a", head, 16, LLAMA) is None
    refusal = check_adapter_config("a", head, 16, supported_target_modules("mistral"))
    assert refusal is not None and refusal.reason == Reason.UNSUPPORTED_TARGET_MODULES
    assert supported_target_modules("other") is None
    assert supported_target_modules(None) is None


# -- vLLM's refusals --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("LoRA rank 32 is greater than max_lora_rank 16.", Reason.RANK_EXCEEDS_MAX),
        (
            "While loading /a, expected target modules in ['q_proj'] but received ['foo']. Please verify",
            Reason.UNSUPPORTED_TARGET_MODULES,
        ),
        ("vLLM does not yet support DoRA.", Reason.UNSUPPORTED_ADAPTER),
        ("Loading lora one failed: No adapter found for /adapters/one", Reason.NOT_FOUND),
        ("CUDA out of memory", Reason.LOAD_FAILED),
    ],
)
def test_engine_errors_map_to_the_same_reasons(message: str, reason: str) -> None:
    assert classify_engine_error(message) == reason


def test_transient_reasons_are_not_permanent() -> None:
    for reason in (Reason.CHECKSUM_MISMATCH, Reason.NOT_FOUND, Reason.LOAD_FAILED, Reason.STORE_UNAVAILABLE):
        assert reason not in PERMANENT


def test_full_module_paths_are_checked_by_their_last_part_as_vllm_does() -> None:
    """peft writes full paths when it expands all-linear (what lorafleet's trainer saved for the tiny Llama)."""
    full = [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj")]
    assert check_adapter_config("a", lora(target_modules=full), 16, LLAMA) is None
    refusal = check_adapter_config("a", lora(target_modules=[*full, "model.norm"]), 16, LLAMA)
    assert refusal is not None and refusal.reason == Reason.UNSUPPORTED_TARGET_MODULES
    assert "model.norm" in refusal.message and "q_proj" not in refusal.message.split("supported")[0]
