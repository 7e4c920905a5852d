"""Model families vLLM cannot serve with LoRA (lorafleet.serving.families): refused at deployment, warned at training.

Invariants:
* an AdapterDeployment of a BaseModel whose family vLLM serves without LoRA (Falcon, GPT-J, GPT-2) or not at all
  (MPT) renders nothing and says why, naming the architecture (reason LoRANotSupported); LoRA families and
  "other" (vLLM decides) render as before;
* a FineTuneJob on such a base model is not refused: it carries LoRAServable=False with the same reason, and the
  condition goes away when the BaseModel's family changes to one vLLM serves;
* the sidecar's target-module lists come from the same table.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from lorafleet.config import OperatorSettings
from lorafleet.controllers import adapterdeployment as ad_controller
from lorafleet.serving.checks import supported_target_modules
from lorafleet.serving.families import FAMILIES, lora_refusal
from tests.unit import objects

SETTINGS = OperatorSettings(store_endpoint="http://minio:9000", store_uri="s3://lorafleet")
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
NOT_SERVABLE = {"falcon": "FalconForCausalLM", "gptj": "GPTJForCausalLM", "gpt2": "GPT2LMHeadModel", "mpt": "Mpt"}


def _plan(family: str) -> tuple[object, object]:
    ad = objects.adapter_deployment_obj(objects.adapter_deployment())
    base = objects.basemodel_obj(objects.ready(objects.base_model(family=family)))
    return ad_controller.plan(ad, base, {"support": None}, SETTINGS, ranks={})


@pytest.mark.parametrize("family", sorted(NOT_SERVABLE))
def test_deployment_of_a_family_without_lora_is_refused_naming_the_architecture(family: str) -> None:
    children, error = _plan(family)
    assert children is None and error is not None
    assert error.reason == "LoRANotSupported"  # type: ignore[attr-defined]
    assert NOT_SERVABLE[family] in error.message and "vLLM 0.32" in error.message  # type: ignore[attr-defined]


@pytest.mark.parametrize("family", ["llama", "mixtral", "phi3", "gpt_neox", "other"])
def test_lora_families_and_other_render(family: str) -> None:
    children, error = _plan(family)
    assert error is None and children


def _conditions(family: str, old: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    ftj = objects.fine_tune_job()
    if old is not None:
        ftj["status"] = old
    status = objects.finetunejob_status(
        ftj, base_model=objects.ready(objects.base_model(family=family)), job=None, now=NOW
    )
    return {c["type"]: c for c in status["conditions"]}, status


def test_finetunejob_on_a_family_without_lora_is_warned_not_refused() -> None:
    conditions, status = _conditions("falcon")
    warning = conditions["LoRAServable"]
    assert warning["status"] == "False" and warning["reason"] == "LoRANotSupported"
    assert "FalconForCausalLM" in warning["message"] and "training goes ahead" in warning["message"]
    assert status["phase"] == "Pending" and conditions["Ready"]["reason"] == "JobCreating"
    later, _ = _conditions("llama", old=status)
    assert "LoRAServable" not in later


def test_target_modules_come_from_the_table() -> None:
    assert supported_target_modules("phi3") == [
        "qkv_proj",
        "o_proj",
        "gate_up_proj",
        "down_proj",
        "embed_tokens",
        "lm_head",
    ]
    assert supported_target_modules("falcon") is None and supported_target_modules("other") is None
    # The Transformers backend: transformers' layer names, and no lm_head (tests/integration/test_serving_families.py).
    assert supported_target_modules("gpt_neox") == [
        "query_key_value",
        "dense",
        "dense_h_to_4h",
        "dense_4h_to_h",
        "embed_tokens",
    ]
    assert all(lora_refusal(f.name) is None for f in FAMILIES.values() if f.lora)
