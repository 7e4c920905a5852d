"""The contracts between the operator and its pods (lorafleet.contracts) survive a round trip, carry a version, and
tolerate the other side being older or newer.

Invariants: what a writer emits reads back equal; every contract has a `version` field and readers accept fields
and versions they do not know; the trainer config ignores unknown fields at every level (a CRD field added later
must not break an older trainer image) yet still validates what it uses; a bad value from a pod is dropped, not
allowed to hide the rest of its report; the constants the two sides share exist once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from lorafleet.config import OperatorSettings
from lorafleet.contracts import base, exits, serving, trainer
from lorafleet.contracts.stores import ObjectStore
from lorafleet.resources import finetunejob as ftj_res
from lorafleet.trainer.errors import TrainerError
from lorafleet.trainer.main import load_config
from tests.unit import objects

SETTINGS = OperatorSettings(store_endpoint="https://minio:9000", store_uri="s3://lorafleet")
DIGEST = "sha256:" + "ab" * 32

CONTRACTS: list[type[BaseModel]] = [
    trainer.TrainerConfig,
    trainer.TrainerReport,
    trainer.TrainerProgress,
    serving.DesiredAdapterSet,
    serving.ReplicaState,
]


def _rendered_config(**spec: Any) -> dict[str, Any]:
    """The trainer config as the operator renders it into the Job's pod template (mounted by the downward API)."""
    ftj = objects.as_fine_tune_job(objects.fine_tune_job(**spec))
    children = ftj_res.desired_children(ftj, objects.as_base_model(objects.ready(objects.base_model())), SETTINGS)
    job = next(c for c in children if c["kind"] == "Job")
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    return json.loads(annotations[ftj_res.CONFIG_ANNOTATION])  # type: ignore[no-any-return]


def _nested_models(model: type[BaseModel], seen: set[type[BaseModel]] | None = None) -> set[type[BaseModel]]:
    seen = set() if seen is None else seen
    if model in seen:
        return seen
    seen.add(model)
    for field in model.model_fields.values():
        for arg in _types(field.annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                _nested_models(arg, seen)
    return seen


def _types(annotation: Any) -> list[Any]:
    args = getattr(annotation, "__args__", None)
    if not args:
        return [annotation]
    return [t for a in args for t in _types(a)]


# -- every contract --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.__name__)
def test_every_contract_has_a_version_and_ignores_unknown_fields(contract: type[BaseModel]) -> None:
    assert "version" in contract.model_fields
    for model in _nested_models(contract):
        assert model.model_config.get("extra") == "ignore", model


# -- trainer config --------------------------------------------------------------------------------------------


def test_trainer_config_round_trip() -> None:
    rendered = _rendered_config()
    config = trainer.TrainerConfig.model_validate(rendered)
    assert config.render() == rendered
    assert config.version == trainer.CONFIG_VERSION
    assert rendered["version"] == trainer.CONFIG_VERSION  # writers emit the current version
    assert trainer.TrainerConfig.model_validate({**rendered, "version": 2}).render()["version"] == 2


def test_trainer_config_ignores_fields_of_a_newer_operator(tmp_path: Path) -> None:
    """A field added to the CRD (or the config) later must not break an older trainer image (spec.image)."""
    rendered = _rendered_config()
    rendered["newTopLevel"] = {"x": 1}
    rendered["dataset"]["newDatasetField"] = True
    rendered["dataset"]["fields"]["newMapping"] = "m"
    rendered["lora"]["newLoraField"] = 3
    rendered["training"]["newTrainingField"] = "x"
    rendered["output"]["store"]["newStoreField"] = "x"
    rendered["output"]["store"]["credentialsSecretRef"] = {"name": "creds", "newRefField": "x"}
    rendered["distributed"]["newDistributedField"] = 1
    path = tmp_path / "trainer.json"
    path.write_text(json.dumps(rendered))
    config = load_config(path)
    assert config.dataset.uri == "s3://datasets/support/train.jsonl"
    assert config.output.store is not None and config.output.store.credentials_secret_ref is not None
    assert config.output.store.credentials_secret_ref.name == "creds"


def test_trainer_config_still_validates_what_it_uses(tmp_path: Path) -> None:
    rendered = _rendered_config()
    rendered["lora"]["r"] = 0  # the CRD's own bound (ge=1) holds in the trainer too
    path = tmp_path / "trainer.json"
    path.write_text(json.dumps(rendered))
    with pytest.raises(TrainerError) as failure:
        load_config(path)
    assert failure.value.reason == exits.CONFIG_INVALID and "lora.r" in failure.value.message
    del rendered["lora"]
    with pytest.raises(ValidationError):
        trainer.TrainerConfig.model_validate(rendered)


def test_trainer_config_keeps_distributed_strategy_out_while_default() -> None:
    rendered = _rendered_config(resources={"nodes": 2, "gpusPerNode": 2, "strategy": "fsdp"})
    assert rendered["distributed"]["strategy"] == "fsdp"
    assert "strategy" not in _rendered_config()["distributed"]


# -- trainer report and progress -------------------------------------------------------------------------------


def test_trainer_report_round_trip() -> None:
    report = trainer.TrainerReport(
        progress=trainer.ReportProgress(step=40, total_steps=40, epoch=2.0, loss=0.12),
        metrics={"trainLoss": 0.12},
        artifact=trainer.ReportArtifact(uri="s3://a/adapters/x/v1", digest=DIGEST, size_bytes=10),
        error=trainer.ReportError(reason=exits.UPLOAD_FAILED, message="m"),
    )
    wire = report.wire()
    assert wire["version"] == trainer.REPORT_VERSION
    assert wire["artifact"] == {"uri": "s3://a/adapters/x/v1", "digest": DIGEST, "sizeBytes": 10}
    assert trainer.TrainerReport.model_validate(json.loads(json.dumps(wire))) == report


def test_trainer_report_drops_bad_values_not_the_report() -> None:
    """One odd value from a pod (NaN, a string, a bool, a partial artifact) is dropped; the rest stays."""
    report = trainer.TrainerReport.model_validate(
        {
            "version": 99,
            "progress": {"step": 3, "epoch": float("nan"), "loss": "low", "totalSteps": True, "future": 1},
            "metrics": {"a": 1, "b": float("inf"), "c": "x", "d": False},
            "artifact": {"uri": "s3://a/x", "digest": DIGEST},  # sizeBytes missing
            "error": {"reason": 5, "message": "kept"},
            "future": {"x": 1},
        }
    )
    assert report.version == 99
    assert report.progress == trainer.ReportProgress(step=3)
    assert report.metrics == {"a": 1.0}
    assert report.artifact is None
    assert report.error == trainer.ReportError(message="kept")


def test_trainer_progress_round_trip() -> None:
    progress = trainer.TrainerProgress(step=7, total_steps=100, epoch=0.5, loss=1.5, tokens_per_second=200.0)
    wire = progress.wire()
    assert wire == {"version": 1, "step": 7, "totalSteps": 100, "epoch": 0.5, "loss": 1.5, "tokensPerSecond": 200.0}
    assert trainer.TrainerProgress.model_validate(wire) == progress
    # An annotation written before the contract had a version reads as version 1.
    assert trainer.TrainerProgress.model_validate({"step": 7}).version == 1


# -- serving ---------------------------------------------------------------------------------------------------


def test_desired_adapter_set_round_trip() -> None:
    desired = serving.DesiredAdapterSet(
        base_model="tiny",
        base_model_digest=DIGEST,
        max_lora_rank=16,
        adapters=[
            serving.DesiredAdapter(name="a", uri="s3://lorafleet/adapters/a/v1", digest=DIGEST),
            serving.DesiredAdapter(
                name="b", uri="s3://lorafleet/adapters/b/v1", store=ObjectStore(endpoint="https://minio:9000")
            ),
        ],
        target_modules=["q_proj", "v_proj"],
    )
    rendered = desired.render()
    assert rendered["version"] == serving.DESIRED_VERSION  # writers emit the current version
    assert serving.DesiredAdapterSet.model_validate(json.loads(json.dumps(rendered))) == desired
    assert "targetModules" not in serving.DesiredAdapterSet(base_model="tiny", max_lora_rank=16).render()


def test_desired_adapter_set_from_a_newer_operator() -> None:
    newer = {
        "version": 2,
        "baseModel": "tiny",
        "maxLoraRank": 16,
        "routing": {"x": 1},
        "adapters": [{"name": "a", "uri": "s3://l/a", "weight": 3, "store": {"endpoint": "http://m:9000", "new": 1}}],
    }
    desired = serving.DesiredAdapterSet.model_validate(newer)
    assert desired.version == 2 and [a.name for a in desired.adapters] == ["a"]
    assert desired.adapters[0].store is not None and desired.adapters[0].store.endpoint == "http://m:9000"


def test_replica_state_round_trip() -> None:
    state = serving.ReplicaState(
        pod="p0",
        base_model="tiny",
        engine=serving.EngineState(url="http://127.0.0.1:8001", healthy=True, restarts=0, lost_adapters=0),
        desired=serving.DesiredFileState(file="/etc/lorafleet/adapters/adapters.json", adapters=1),
        ready=True,
        passes=3,
        adapters=[serving.ReplicaAdapter(name="a", state=serving.LOADED, reason="Loaded", digest=DIGEST)],
    )
    body = state.state_json()
    assert body["version"] == serving.STATE_VERSION
    assert body["adapters"] == [{"name": "a", "state": "Loaded", "reason": "Loaded", "digest": DIGEST}]
    assert serving.ReplicaState.model_validate(json.loads(json.dumps(body))) == state


def test_replica_state_from_a_newer_or_broken_sidecar() -> None:
    state = serving.ReplicaState.model_validate(
        {
            "version": 7,
            "pod": "p0",
            "engine": {"healthy": "yes", "gpu": {}},
            "adapters": [
                {"name": "a", "state": "Evicted", "newField": 1},  # a state this operator does not know
                {"name": "b", "state": "Loaded", "loadSeconds": "fast"},
                {"state": "Loaded"},  # no name: not an adapter
                "garbage",
            ],
        }
    )
    assert state.version == 7 and state.engine is not None and state.engine.healthy is None
    assert [(a.name, a.state, a.load_seconds) for a in state.adapters or []] == [
        ("a", "Pending", None),
        ("b", "Loaded", None),
    ]


# -- constants declared once -----------------------------------------------------------------------------------


def test_exit_codes_and_reasons() -> None:
    assert (exits.EXIT_OK, exits.EXIT_FAILED, exits.EXIT_INVALID_INPUT, exits.EXIT_INTERRUPTED) == (0, 1, 2, 3)
    assert all(base.is_reason(r) for r in exits.REASONS)
    assert {exits.exit_code_for(r) for r in exits.INVALID_INPUT_REASONS} == {exits.EXIT_INVALID_INPUT}
    assert exits.exit_code_for(exits.INTERRUPTED) == exits.EXIT_INTERRUPTED
    assert exits.exit_code_for(exits.TRAINING_FAILED) == exits.EXIT_FAILED


def test_message_clip() -> None:
    assert base.clip("x" * base.MAX_MESSAGE) == "x" * base.MAX_MESSAGE
    clipped = base.clip("x" * (base.MAX_MESSAGE + 1))
    assert len(clipped) == base.MAX_MESSAGE and clipped.endswith("...")


def test_shared_names_are_the_contracts() -> None:
    """The modules of either side use the contracts' objects, not copies of them."""
    from lorafleet.controllers import finetunejob as ftj_controller
    from lorafleet.resources import adapterdeployment as ad_res
    from lorafleet.serving import gateway, syncer
    from lorafleet.serving import status as serving_status
    from lorafleet.trainer import errors, progress

    assert progress.PROGRESS_KEY is trainer.PROGRESS_KEY
    assert ftj_controller.parse_progress is trainer.parse_progress
    assert ftj_res.PROGRESS_CONFIG_MAP_ENV is progress.PROGRESS_CONFIG_MAP_ENV is trainer.PROGRESS_CONFIG_MAP_ENV
    assert errors.EXIT_INVALID_INPUT is exits.EXIT_INVALID_INPUT
    assert ftj_res.EXIT_INVALID_INPUT is exits.EXIT_INVALID_INPUT
    assert (gateway.READY, gateway.STATE) == (serving.READY_PATH, serving.STATE_PATH)
    assert ad_res.GATEWAY_PORT is serving.GATEWAY_PORT
    assert syncer.LOADED is serving.LOADED and serving_status.LOADED is serving.LOADED
