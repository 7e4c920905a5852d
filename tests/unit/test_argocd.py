"""The Argo CD health check (docs/argocd/health.lua) on statuses computed by the operator's own status functions, run
in Lua 5.1 (Argo CD's gopher-lua) through lupa: Healthy when Ready/Succeeded, Progressing while Pending, Running or
Progressing (or before the operator saw the spec), Degraded when Failed/Degraded, with the Ready condition's
message. The argocd-cm and argo-cd chart snippets carry the same script for each kind."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorafleet.resources.conditions import get_condition
from lorafleet.resources.status import ArtifactCheck
from tests.unit import objects
from tests.unit.objects import adapterdeployment_status, basemodel_status, finetunejob_status

lua51 = pytest.importorskip("lupa.lua51", reason="lupa (a Lua interpreter) is needed: pip install lupa")

DOCS = Path(__file__).resolve().parents[2] / "docs" / "argocd"
SCRIPT = (DOCS / "health.lua").read_text()
KINDS = ("BaseModel", "FineTuneJob", "AdapterDeployment")
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
DIGEST = "sha256:" + "a" * 64
Obj = dict[str, Any]


def health(obj: Obj, runtime: Any = None) -> tuple[str, str]:
    lua = runtime or lua51.LuaRuntime()
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(SCRIPT)
    return str(result["status"]), str(result["message"])


def _with(obj: Obj, status: Obj) -> Obj:
    out = copy.deepcopy(obj)
    out["status"] = status
    return out


def _ready_message(status: Obj) -> str:
    ready = get_condition(status.get("conditions") or [], "Ready")
    assert ready is not None
    return str(ready.get("message") or ready["reason"])


# --- samples from the operator's status functions -------------------------------------------------------------


def _base_model_samples() -> list[tuple[str, Obj, str]]:
    bm = objects.base_model()
    ok = ArtifactCheck(digest=DIGEST, size_bytes=1024, revision="r1")
    wrong = ArtifactCheck(problem=("DigestMismatch", "the stored version differs from the pinned digest"))
    return [
        ("ready", basemodel_status(bm, default_store_configured=True, missing_secret=None, now=NOW, source_check=ok),
         "Healthy"),
        ("secret missing", basemodel_status(bm, default_store_configured=True, missing_secret="creds", now=NOW),
         "Progressing"),
        ("digest mismatch", basemodel_status(bm, default_store_configured=True, missing_secret=None, now=NOW,
                                             source_check=wrong), "Degraded"),
    ]  # fmt: skip


def _job(active: int = 0, condition: tuple[str, str] | None = None) -> Obj:
    conditions = []
    if condition:
        conditions.append({"type": condition[0], "status": "True", "reason": condition[1], "message": condition[1]})
    status: Obj = {"active": active, "conditions": conditions, "startTime": "2026-11-22T11:00:00Z"}
    if condition and condition[0] == "Complete":
        status["completionTime"] = "2026-11-22T11:30:00Z"
        status["succeeded"] = 1
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "support-train"}, "status": status}


def _fine_tune_job_samples() -> list[tuple[str, Obj, str]]:
    ftj, bm = objects.fine_tune_job(), objects.ready(objects.base_model())
    return [
        ("no base model", finetunejob_status(ftj, base_model=None, job=None, now=NOW), "Progressing"),
        ("running", finetunejob_status(ftj, base_model=bm, job=_job(active=1), now=NOW), "Progressing"),
        ("succeeded", finetunejob_status(ftj, base_model=bm, job=_job(condition=("Complete", "Completed")), now=NOW),
         "Healthy"),
        ("failed", finetunejob_status(ftj, base_model=bm, job=_job(condition=("Failed", "BackoffLimitExceeded")),
                                      now=NOW), "Degraded"),
    ]  # fmt: skip


def _deployment(ready: int, conditions: list[tuple[str, str, str]]) -> Obj:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "chat-vllm"},
        "status": {
            "replicas": 2,
            "readyReplicas": ready,
            "conditions": [{"type": t, "status": s, "reason": r, "message": f"{t} {r}"} for t, s, r in conditions],
        },
    }


def _adapter_deployment_samples() -> list[tuple[str, Obj, str]]:
    ad = objects.adapter_deployment(adapters=[])
    bm = objects.ready(objects.base_model())
    available = [("Available", "True", "MinimumReplicasAvailable"), ("Progressing", "True", "NewReplicaSetAvailable")]
    rolling = [("Available", "False", "MinimumReplicasUnavailable"), ("Progressing", "True", "ReplicaSetUpdated")]
    stuck = [("Available", "False", "MinimumReplicasUnavailable"), ("Progressing", "False", "ProgressDeadlineExceeded")]

    def status(base: Obj | None, deployment: Obj | None) -> Obj:
        return adapterdeployment_status(
            ad, base_model=base, fine_tune_jobs={}, deployment=deployment, service_host="chat.ml.svc", now=NOW
        )

    return [
        ("waiting for the base model", status(None, None), "Progressing"),
        ("replicas starting", status(bm, _deployment(0, rolling)), "Progressing"),
        ("serving", status(bm, _deployment(2, available)), "Healthy"),
        ("stuck rollout", status(bm, _deployment(0, stuck)), "Degraded"),
    ]


SAMPLES = [
    *(("BaseModel", *s) for s in _base_model_samples()),
    *(("FineTuneJob", *s) for s in _fine_tune_job_samples()),
    *(("AdapterDeployment", *s) for s in _adapter_deployment_samples()),
]
OBJECTS = {
    "BaseModel": objects.base_model(),
    "FineTuneJob": objects.fine_tune_job(),
    "AdapterDeployment": objects.adapter_deployment(adapters=[]),
}


@pytest.mark.parametrize(("kind", "case", "status", "expected"), SAMPLES, ids=[f"{s[0]}-{s[1]}" for s in SAMPLES])
def test_health_of_operator_statuses(kind: str, case: str, status: Obj, expected: str) -> None:
    obj = _with(OBJECTS[kind], status)
    assert health(obj) == (expected, _ready_message(status)), status


def test_every_phase_of_every_kind_is_covered() -> None:
    seen = {(kind, status["phase"]) for kind, _, status, _ in SAMPLES}
    assert seen == {
        ("BaseModel", "Ready"), ("BaseModel", "Pending"), ("BaseModel", "Failed"),
        ("FineTuneJob", "Pending"), ("FineTuneJob", "Running"), ("FineTuneJob", "Succeeded"), ("FineTuneJob", "Failed"),
        ("AdapterDeployment", "Pending"), ("AdapterDeployment", "Progressing"), ("AdapterDeployment", "Ready"),
        ("AdapterDeployment", "Degraded"),
    }  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_no_status_yet_is_progressing(kind: str) -> None:
    obj = copy.deepcopy(OBJECTS[kind])
    obj.pop("status", None)
    assert health(obj) == ("Progressing", "Waiting for the lorafleet operator to report a status")


def test_a_spec_change_not_yet_observed_is_progressing() -> None:
    bm = objects.base_model()
    ok = ArtifactCheck(digest=DIGEST, size_bytes=1, revision="r1")
    obj = _with(bm, basemodel_status(bm, default_store_configured=True, missing_secret=None, now=NOW, source_check=ok))
    assert health(obj)[0] == "Healthy"
    obj["metadata"]["generation"] = 2  # the user edited the spec; the status is still about generation 1
    assert health(obj) == ("Progressing", "Waiting for the lorafleet operator to observe generation 2")


def test_a_true_degraded_condition_wins_over_the_phase() -> None:
    status = {
        "phase": "Ready",
        "observedGeneration": 1,
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "Serving", "message": "serving 2 adapters"},
            {"type": "Degraded", "status": "True", "reason": "AdapterFailed", "message": "adapter sql failed"},
        ],
    }
    assert health(_with(OBJECTS["AdapterDeployment"], status)) == ("Degraded", "serving 2 adapters")


def test_the_script_also_runs_on_a_newer_lua() -> None:
    import lupa

    status, _ = health(_with(OBJECTS["FineTuneJob"], _fine_tune_job_samples()[2][1]), lupa.LuaRuntime())
    assert status == "Healthy"


def test_argocd_cm_and_chart_values_carry_the_script_for_each_kind() -> None:
    cm = yaml.safe_load((DOCS / "argocd-cm.yaml").read_text())
    values = yaml.safe_load((DOCS / "argo-cd-values.yaml").read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "argocd-cm"
    for data in (cm["data"], values["configs"]["cm"]):
        assert set(data) == {f"resource.customizations.health.lorafleet.io_{kind}" for kind in KINDS}
        for key, script in data.items():
            assert script == SCRIPT, f"{key} differs from docs/argocd/health.lua"
