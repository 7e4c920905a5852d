"""Status computed from a custom resource and its children never lies and never flaps.

Invariants pinned here: every branch of each kind's phase/condition table; Ready, Progressing and
Degraded are always present (BaseModel: Ready) with observedGeneration; the result has only the status
model's camelCase keys and no None values; Succeeded/Failed FineTuneJobs stay terminal; an adapter is
Loaded only on evidence from the pods; lastTransitionTime holds across passes while a status holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel as PydanticModel

from lorafleet.api.adapterdeployment import AdapterDeploymentStatus, AdapterStatus
from lorafleet.api.basemodel import BaseModelStatus
from lorafleet.api.common import Condition, ObjectStore
from lorafleet.api.finetunejob import ArtifactStatus, FineTuneJobStatus, TrainingProgress
from lorafleet.resources.conditions import get_condition, rfc3339
from lorafleet.resources.status import ResolvedAdapter, basemodel_secret_names, resolve_adapters, status_patch
from tests.unit.objects import (
    adapter_deployment_obj,
    adapterdeployment_status,
    basemodel_obj,
    basemodel_status,
    fine_tune_jobs,
    finetunejob_status,
)

Obj = dict[str, Any]
NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=3)
DIGEST = "sha256:" + "a" * 64
DIGEST2 = "sha256:" + "b" * 64
STORE = {"endpoint": "https://minio.storage.svc:9000", "credentialsSecretRef": {"name": "minio-creds"}}


# -- shape checks ----------------------------------------------------------------------------------


def _aliases(model: type[PydanticModel]) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


def _no_none(value: Any) -> None:
    assert value is not None
    if isinstance(value, dict):
        for v in value.values():
            _no_none(v)
    elif isinstance(value, list):
        for v in value:
            _no_none(v)


def assert_shape(status: Obj, model: type[PydanticModel], types: tuple[str, ...]) -> None:
    """Only the API model's camelCase keys, no None, parses, and carries the given condition types."""
    _no_none(status)
    assert set(status) <= _aliases(model)
    model.model_validate(status)
    for c in status["conditions"]:
        assert set(c) <= _aliases(Condition)
        assert c["observedGeneration"] == 7
    assert [c["type"] for c in status["conditions"]] == list(types)
    for entry in status.get("adapters", []):
        assert set(entry) <= _aliases(AdapterStatus)
    if "progress" in status:
        assert set(status["progress"]) <= _aliases(TrainingProgress)
    if "artifact" in status:
        assert set(status["artifact"]) == _aliases(ArtifactStatus)


TRIPLET = ("Ready", "Progressing", "Degraded")
OK = ("False", "AsExpected")


def T(reason: str) -> tuple[str, str]:
    return "True", reason


def F(reason: str) -> tuple[str, str]:
    return "False", reason


def cond_of(status: Obj, type: str) -> tuple[str, str]:
    c = get_condition(status["conditions"], type)
    assert c is not None
    return c["status"], c["reason"]


# -- builders --------------------------------------------------------------------------------------


def base_model(
    name: str = "llama",
    *,
    phase: str | None = "Ready",
    uri: str = "s3://models/llama",
    store: Obj | None = None,
    status: Obj | None = None,
) -> Obj:
    source: Obj = {"uri": uri}
    if store is not None:
        source["store"] = store
    st: Obj = dict(status or {})
    if phase is not None:
        st["phase"] = phase
    return {
        "apiVersion": "lorafleet.io/v1alpha1",
        "kind": "BaseModel",
        "metadata": {"name": name, "namespace": "ns", "generation": 7},
        "spec": {"source": source},
        "status": st,
    }


def ftj(name: str = "ft", *, base: str = "llama", status: Obj | None = None, output_store: Obj | None = None) -> Obj:
    output: Obj = {"adapterName": "support", "version": "v1"}
    if output_store is not None:
        output["store"] = output_store
    return {
        "apiVersion": "lorafleet.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "ns", "generation": 7},
        "spec": {
            "baseModelRef": {"name": base},
            "output": output,
            "dataset": {"uri": "s3://data/train.jsonl", "format": "chat"},
        },
        "status": status or {},
    }


def ftj_in(
    phase: str,
    *,
    artifact: Obj | None = None,
    ready_message: str = "",
    output_store: Obj | None = None,
    name: str = "ft",
) -> Obj:
    """A FineTuneJob as an AdapterDeployment sees it."""
    status: Obj = {
        "phase": phase,
        "conditions": [
            {
                "type": "Ready",
                "status": "True" if phase == "Succeeded" else "False",
                "reason": phase,
                "message": ready_message,
            }
        ],
    }
    if artifact is not None:
        status["artifact"] = artifact
    return ftj(name, status=status, output_store=output_store)


def artifact(uri: str = "s3://adapters/adapters/support/v1", digest: str = DIGEST) -> Obj:
    return {"uri": uri, "digest": digest, "sizeBytes": 1234}


def job(
    *,
    active: int = 0,
    conditions: Sequence[tuple[str, str, str, str]] = (),
    start: str | None = "2025-03-01T11:00:00Z",
    completion: str | None = None,
) -> Obj:
    st: Obj = {
        "active": active,
        "conditions": [
            {"type": t, "status": s, "reason": r, "message": m, "lastTransitionTime": "2025-03-01T11:30:00Z"}
            for t, s, r, m in conditions
        ],
    }
    if start:
        st["startTime"] = start
    if completion:
        st["completionTime"] = completion
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "ft-train", "namespace": "ns"}, "status": st}


def from_job(name: str, ref: str) -> Obj:
    return {"name": name, "fineTuneJobRef": {"name": ref}}


def from_artifact(
    name: str, uri: str = "s3://adapters/x/v1", digest: str | None = DIGEST2, store: Obj | None = None
) -> Obj:
    art: Obj = {"uri": uri}
    if digest:
        art["digest"] = digest
    if store:
        art["store"] = store
    return {"name": name, "artifact": art}


def ad(*adapters: Obj, replicas: int = 2, port: int | None = None, status: Obj | None = None) -> Obj:
    spec: Obj = {"baseModelRef": {"name": "llama"}, "adapters": list(adapters), "replicas": replicas}
    if port is not None:
        spec["service"] = {"port": port}
    return {
        "apiVersion": "lorafleet.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": "serve", "namespace": "ns", "generation": 7},
        "spec": spec,
        "status": status or {},
    }


def deployment(replicas: int = 2, ready: int = 2, conditions: list[tuple[str, str, str]] | None = None) -> Obj:
    if conditions is None:
        conditions = [
            ("Available", "True", "MinimumReplicasAvailable"),
            ("Progressing", "True", "NewReplicaSetAvailable"),
        ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "serve-vllm"},
        "status": {
            "replicas": replicas,
            "readyReplicas": ready,
            "conditions": [{"type": t, "status": s, "reason": r, "message": f"{t} {r}"} for t, s, r in conditions],
        },
    }


def loaded(n: int = 2) -> Obj:
    return {"state": "Loaded", "loadedReplicas": n}


# -- BaseModel -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bm", "default_store", "missing", "phase", "ready", "reason", "in_message"),
    [
        pytest.param(
            base_model(), True, None, "Ready", "True", "SourceValid", "s3://models/llama", id="s3-default-store"
        ),
        pytest.param(base_model(store=STORE), False, None, "Ready", "True", "SourceValid", "", id="s3-own-store"),
        pytest.param(
            base_model(uri="pvc://weights/llama"),
            False,
            None,
            "Ready",
            "True",
            "SourceValid",
            "",
            id="pvc-needs-no-store",
        ),
        pytest.param(
            base_model(), False, None, "Failed", "False", "StoreNotConfigured", "artifactStore", id="s3-no-store"
        ),
        pytest.param(
            base_model(store=STORE),
            True,
            "minio-creds",
            "Pending",
            "False",
            "SecretNotFound",
            '"minio-creds"',
            id="secret-missing",
        ),
    ],
)
def test_basemodel_status(
    bm: Obj, default_store: bool, missing: str | None, phase: str, ready: str, reason: str, in_message: str
) -> None:
    st = basemodel_status(bm, default_store_configured=default_store, missing_secret=missing, now=NOW)
    assert_shape(st, BaseModelStatus, ("Ready",))
    assert st["phase"] == phase
    assert st["observedGeneration"] == 7
    c = st["conditions"][0]
    assert (c["status"], c["reason"]) == (ready, reason)
    assert in_message in c["message"]


def test_basemodel_keeps_storage_fields_and_transition_time() -> None:
    stored = {"digest": DIGEST, "sizeBytes": 99, "resolvedRevision": "abc"}
    first = basemodel_status(base_model(status=stored), default_store_configured=True, missing_secret=None, now=NOW)
    assert {k: first[k] for k in stored} == stored
    again = basemodel_status(base_model(status=first), default_store_configured=True, missing_secret=None, now=LATER)
    assert again == first


def test_basemodel_secret_names() -> None:
    store = {**STORE, "caBundleSecretRef": {"name": "ca", "key": "ca.pem"}}
    assert basemodel_secret_names(basemodel_obj(base_model(store=store))) == ["minio-creds", "ca"]
    assert basemodel_secret_names(basemodel_obj(base_model())) == []


# -- FineTuneJob -----------------------------------------------------------------------------------

FAILED_BACKOFF = ("Failed", "True", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
SUCCEEDED_OLD = {
    "phase": "Succeeded",
    "jobName": "ft-train",
    "artifact": artifact(),
    "completionTime": "2025-03-01T11:30:00Z",
    "conditions": [{"type": "Ready", "status": "True", "reason": "Succeeded", "message": "done"}],
}
FAILED_OLD = {
    "phase": "Failed",
    "jobName": "ft-train",
    "completionTime": "2025-03-01T11:30:00Z",
    "conditions": [{"type": "Ready", "status": "False", "reason": "DatasetInvalid", "message": "line 3 is not JSON"}],
}


@pytest.mark.parametrize(
    ("old", "bm", "j", "report", "phase", "ready", "progressing", "degraded"),
    [
        pytest.param(
            {}, None, None, None, "Pending", F("BaseModelNotFound"), F("BaseModelNotFound"), OK, id="base-model-missing"
        ),
        pytest.param(
            {},
            base_model(phase="Pending"),
            None,
            None,
            "Pending",
            F("BaseModelNotReady"),
            F("BaseModelNotReady"),
            OK,
            id="base-model-not-ready",
        ),
        pytest.param(
            {}, base_model(), None, None, "Pending", F("JobCreating"), T("JobCreating"), OK, id="job-creating"
        ),
        pytest.param(
            {}, base_model(), job(active=1), None, "Running", F("JobRunning"), T("JobRunning"), OK, id="running-active"
        ),
        pytest.param(
            {},
            base_model(),
            job(active=0, start=None),
            None,
            "Pending",
            F("JobCreating"),
            T("JobCreating"),
            OK,
            id="created-not-started-yet",
        ),
        pytest.param(
            {},
            base_model(),
            job(active=0),
            None,
            "Running",
            F("JobRunning"),
            T("JobRunning"),
            OK,
            id="running-between-pods",
        ),
        pytest.param(
            {},
            None,
            job(active=1),
            None,
            "Running",
            F("JobRunning"),
            T("JobRunning"),
            OK,
            id="job-wins-over-missing-base",
        ),
        pytest.param(
            {},
            base_model(),
            job(conditions=[("Suspended", "True", "JobSuspended", "")], start=None),
            None,
            "Pending",
            F("JobSuspended"),
            T("JobSuspended"),
            OK,
            id="suspended-in-queue",
        ),
        pytest.param(
            {},
            base_model(),
            job(conditions=[("Complete", "True", "", "")], completion="2025-03-01T11:45:00Z"),
            None,
            "Succeeded",
            T("Succeeded"),
            F("Succeeded"),
            OK,
            id="complete",
        ),
        pytest.param(
            {},
            base_model(),
            job(active=1, conditions=[("SuccessCriteriaMet", "True", "", "")]),
            None,
            "Succeeded",
            T("Succeeded"),
            F("Succeeded"),
            OK,
            id="success-criteria-met",
        ),
        pytest.param(
            {},
            base_model(),
            job(conditions=[FAILED_BACKOFF]),
            None,
            "Failed",
            F("BackoffLimitExceeded"),
            F("BackoffLimitExceeded"),
            T("BackoffLimitExceeded"),
            id="failed-backoff",
        ),
        pytest.param(
            {},
            base_model(),
            job(conditions=[("Failed", "True", "DeadlineExceeded", "too slow")]),
            None,
            "Failed",
            F("DeadlineExceeded"),
            F("DeadlineExceeded"),
            T("DeadlineExceeded"),
            id="failed-deadline",
        ),
        pytest.param(
            {},
            base_model(),
            job(active=1, conditions=[("FailureTarget", "True", "PodFailurePolicy", "")]),
            None,
            "Failed",
            F("PodFailurePolicy"),
            F("PodFailurePolicy"),
            T("PodFailurePolicy"),
            id="failure-target",
        ),
        pytest.param(
            {},
            base_model(),
            job(conditions=[FAILED_BACKOFF]),
            {"error": {"reason": "DatasetInvalid", "message": "line 3 is not JSON"}},
            "Failed",
            F("DatasetInvalid"),
            F("DatasetInvalid"),
            T("DatasetInvalid"),
            id="trainer-reason-wins",
        ),
        pytest.param(
            {},
            base_model(),
            job(conditions=[FAILED_BACKOFF]),
            {"error": {"reason": "not camel case!", "message": "boom"}},
            "Failed",
            F("TrainerError"),
            F("TrainerError"),
            T("TrainerError"),
            id="trainer-reason-sanitised",
        ),
        pytest.param(
            {},
            base_model(),
            job(conditions=[("Failed", "False", "", ""), ("Complete", "False", "", "")], active=1),
            None,
            "Running",
            F("JobRunning"),
            T("JobRunning"),
            OK,
            id="false-conditions-are-not-terminal",
        ),
        pytest.param(
            SUCCEEDED_OLD, None, None, None, "Succeeded", T("Succeeded"), F("Succeeded"), OK, id="succeeded-is-terminal"
        ),
        pytest.param(
            FAILED_OLD,
            base_model(),
            None,
            None,
            "Failed",
            F("DatasetInvalid"),
            F("DatasetInvalid"),
            T("DatasetInvalid"),
            id="failed-is-terminal",
        ),
        pytest.param(
            FAILED_OLD,
            base_model(),
            job(active=1),
            None,
            "Failed",
            F("DatasetInvalid"),
            F("DatasetInvalid"),
            T("DatasetInvalid"),
            id="failed-ignores-new-job",
        ),
    ],
)
def test_finetunejob_phases(
    old: Obj,
    bm: Obj | None,
    j: Obj | None,
    report: Obj | None,
    phase: str,
    ready: tuple[str, str],
    progressing: tuple[str, str],
    degraded: tuple[str, str],
) -> None:
    st = finetunejob_status(ftj(status=old), base_model=bm, job=j, now=NOW, trainer_report=report)
    assert_shape(st, FineTuneJobStatus, TRIPLET)
    assert st["phase"] == phase
    assert st["observedGeneration"] == 7
    assert cond_of(st, "Ready") == ready
    assert cond_of(st, "Progressing") == progressing
    assert cond_of(st, "Degraded") == degraded
    if j is not None or old:
        assert st["jobName"] == "ft-train"
    assert ("completionTime" in st) == (phase in ("Succeeded", "Failed"))


def test_finetunejob_base_model_messages() -> None:
    st = finetunejob_status(ftj(), base_model=None, job=None, now=NOW)
    msg = get_condition(st["conditions"], "Ready")["message"]  # type: ignore[index]
    assert '"llama"' in msg and "starts once it exists" in msg
    bm = base_model(
        phase="Failed",
        status={
            "conditions": [{"type": "Ready", "status": "False", "reason": "StoreNotConfigured", "message": "no store"}]
        },
    )
    st = finetunejob_status(ftj(), base_model=bm, job=None, now=NOW)
    msg = get_condition(st["conditions"], "Ready")["message"]  # type: ignore[index]
    assert "phase Failed" in msg and "no store" in msg


def test_finetunejob_times() -> None:
    running = finetunejob_status(ftj(), base_model=base_model(), job=job(active=1), now=NOW)
    assert running["startTime"] == "2025-03-01T11:00:00Z"
    done = finetunejob_status(
        ftj(status=running),
        base_model=base_model(),
        job=job(conditions=[("Complete", "True", "", "")], completion="2025-03-01T11:45:00Z"),
        now=NOW,
    )
    assert (done["startTime"], done["completionTime"]) == ("2025-03-01T11:00:00Z", "2025-03-01T11:45:00Z")
    # SuccessCriteriaMet comes before completionTime is set: the condition's time stands in.
    early = finetunejob_status(
        ftj(), base_model=base_model(), job=job(conditions=[("SuccessCriteriaMet", "True", "", "")]), now=NOW
    )
    assert early["completionTime"] == "2025-03-01T11:30:00Z"
    failed = finetunejob_status(ftj(), base_model=base_model(), job=job(conditions=[FAILED_BACKOFF]), now=NOW)
    assert failed["completionTime"] == "2025-03-01T11:30:00Z"
    # A datetime (python client) is formatted like a string from kopf.
    j = job(active=1)
    j["status"]["startTime"] = datetime(2025, 3, 1, 11, 0, tzinfo=UTC)
    assert finetunejob_status(ftj(), base_model=base_model(), job=j, now=NOW)["startTime"] == "2025-03-01T11:00:00Z"


REPORT = {
    "progress": {"step": 40, "totalSteps": 100, "epoch": 0.4, "loss": 1.25},
    "metrics": {"train_loss": 1.1, "eval_loss": float("nan"), "flag": True, "runtime": 12},
    "artifact": artifact(),
}


def test_finetunejob_trainer_report_fills_fields() -> None:
    done_job = job(conditions=[("Complete", "True", "", "")], completion="2025-03-01T11:45:00Z")
    st = finetunejob_status(ftj(), base_model=base_model(), job=done_job, now=NOW, trainer_report=REPORT)
    assert_shape(st, FineTuneJobStatus, TRIPLET)
    assert st["progress"] == {"step": 40, "totalSteps": 100, "epoch": 0.4, "loss": 1.25}
    assert st["metrics"] == {"train_loss": 1.1, "runtime": 12.0}  # NaN and bool dropped
    assert st["artifact"] == artifact()
    assert artifact()["uri"] in get_condition(st["conditions"], "Ready")["message"]  # type: ignore[index]


def test_finetunejob_running_progress_in_message_and_kept() -> None:
    st = finetunejob_status(ftj(), base_model=base_model(), job=job(active=2), now=NOW, trainer_report=REPORT)
    assert "artifact" not in st  # only a Succeeded job has an artifact
    msg = get_condition(st["conditions"], "Ready")["message"]  # type: ignore[index]
    assert "2 active pods" in msg and "step 40/100" in msg and "loss 1.25" in msg
    again = finetunejob_status(ftj(status=st), base_model=base_model(), job=job(active=2), now=LATER)
    assert again["progress"] == st["progress"] and again["metrics"] == st["metrics"]


@pytest.mark.parametrize(
    "report",
    [
        pytest.param({"artifact": {"uri": "s3://a/b", "digest": DIGEST}}, id="no-size"),
        pytest.param({"artifact": "s3://a/b"}, id="not-a-dict"),
        pytest.param({"progress": "half", "metrics": [1]}, id="junk"),
        pytest.param({}, id="empty"),
    ],
)
def test_finetunejob_partial_report_ignored(report: Obj) -> None:
    done_job = job(conditions=[("Complete", "True", "", "")])
    st = finetunejob_status(ftj(), base_model=base_model(), job=done_job, now=NOW, trainer_report=report)
    assert_shape(st, FineTuneJobStatus, TRIPLET)
    assert st["phase"] == "Succeeded"
    assert not {"artifact", "progress", "metrics"} & set(st)


def test_finetunejob_terminal_records_late_artifact_but_never_replaces_it() -> None:
    old = {**SUCCEEDED_OLD}
    del old["artifact"]
    st = finetunejob_status(ftj(status=old), base_model=None, job=None, now=NOW, trainer_report=REPORT)
    assert st["artifact"] == artifact()
    other = {**REPORT, "artifact": artifact(digest=DIGEST2)}
    again = finetunejob_status(ftj(status=st), base_model=None, job=None, now=NOW, trainer_report=other)
    assert again["artifact"]["digest"] == DIGEST


def test_finetunejob_transition_time_stable_then_flips() -> None:
    first = finetunejob_status(
        ftj(), base_model=base_model(), job=job(active=1), now=NOW, trainer_report={"progress": {"step": 1}}
    )
    second = finetunejob_status(
        ftj(status=first),
        base_model=base_model(),
        job=job(active=1),
        now=LATER,
        trainer_report={"progress": {"step": 2}},
    )
    times = {c["type"]: c["lastTransitionTime"] for c in second["conditions"]}
    assert set(times.values()) == {rfc3339(NOW)}
    done = finetunejob_status(
        ftj(status=second), base_model=base_model(), job=job(conditions=[("Complete", "True", "", "")]), now=LATER
    )
    times = {c["type"]: c["lastTransitionTime"] for c in done["conditions"]}
    assert times == {"Ready": rfc3339(LATER), "Progressing": rfc3339(LATER), "Degraded": rfc3339(NOW)}


# -- AdapterDeployment: resolve_adapters -----------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "jobs", "resolved", "entry"),
    [
        pytest.param(
            from_artifact("a", store=STORE),
            {},
            ResolvedAdapter("a", "s3://adapters/x/v1", DIGEST2, ObjectStore.model_validate(STORE)),
            None,
            id="artifact",
        ),
        pytest.param(
            from_artifact("a", digest=None),
            {},
            ResolvedAdapter("a", "s3://adapters/x/v1", None, None),
            None,
            id="artifact-without-digest",
        ),
        pytest.param(
            from_job("a", "ft"),
            {"ft": ftj_in("Succeeded", artifact=artifact(), output_store=STORE)},
            ResolvedAdapter("a", artifact()["uri"], DIGEST, ObjectStore.model_validate(STORE)),
            None,
            id="fine-tune-job-succeeded",
        ),
        pytest.param(
            from_job("a", "ft"),
            {"ft": None},
            None,
            ("Pending", "FineTuneJobNotFound", '"ft" not found'),
            id="fine-tune-job-missing",
        ),
        pytest.param(
            from_job("a", "ft"),
            {},
            None,
            ("Pending", "FineTuneJobNotFound", '"ft" not found'),
            id="fine-tune-job-not-looked-up",
        ),
        pytest.param(
            from_job("a", "ft"),
            {"ft": ftj_in("Running")},
            None,
            ("Pending", "FineTuneJobNotSucceeded", 'waiting for FineTuneJob "ft" (phase Running)'),
            id="fine-tune-job-running",
        ),
        pytest.param(
            from_job("a", "ft"),
            {"ft": ftj(status={})},
            None,
            ("Pending", "FineTuneJobNotSucceeded", "(phase Pending)"),
            id="fine-tune-job-no-status",
        ),
        pytest.param(
            from_job("a", "ft"),
            {"ft": ftj_in("Failed", ready_message="OOM")},
            None,
            ("Failed", "FineTuneJobFailed", 'FineTuneJob "ft" failed: OOM'),
            id="fine-tune-job-failed",
        ),
        pytest.param(
            from_job("a", "ft"),
            {"ft": ftj_in("Succeeded")},
            None,
            ("Pending", "ArtifactNotRecorded", "not recorded"),
            id="succeeded-without-artifact",
        ),
    ],
)
def test_resolve_adapters(
    spec: Obj, jobs: dict[str, Obj | None], resolved: ResolvedAdapter | None, entry: tuple[str, str, str] | None
) -> None:
    got, waiting = resolve_adapters(adapter_deployment_obj(ad(spec)), fine_tune_jobs(jobs))
    assert got == ([resolved] if resolved else [])
    if entry is None:
        assert waiting == {}
    else:
        ((name, w),) = waiting.items()
        assert (name, w.state, w.reason, w.loaded_replicas) == ("a", entry[0], entry[1], 0)
        assert entry[2] in (w.message or "")


# -- AdapterDeployment: status ---------------------------------------------------------------------

SUCCEEDED = {"ft": ftj_in("Succeeded", artifact=artifact())}
UNAVAILABLE = ("Available", "False", "MinimumReplicasUnavailable")
ROLLING = [UNAVAILABLE, ("Progressing", "True", "ReplicaSetUpdated")]
STUCK = [UNAVAILABLE, ("Progressing", "False", "ProgressDeadlineExceeded")]
LOST = [UNAVAILABLE, ("Progressing", "True", "NewReplicaSetAvailable")]
CANNOT_CREATE = [("ReplicaFailure", "True", "FailedCreate"), ("Progressing", "True", "ReplicaSetUpdated")]


@pytest.mark.parametrize(
    ("spec", "bm", "jobs", "dep", "reports", "phase", "ready", "progressing", "degraded"),
    [
        pytest.param(
            ad(from_job("a", "ft")),
            None,
            SUCCEEDED,
            deployment(),
            {"a": loaded()},
            "Pending",
            F("BaseModelNotFound"),
            F("BaseModelNotFound"),
            OK,
            id="base-model-missing",
        ),
        pytest.param(
            ad(),
            base_model(phase="Pending"),
            {},
            None,
            None,
            "Pending",
            F("BaseModelNotReady"),
            F("BaseModelNotReady"),
            OK,
            id="base-model-not-ready",
        ),
        pytest.param(
            ad(replicas=0),
            base_model(),
            {},
            deployment(0, 0),
            None,
            "Pending",
            F("ScaledToZero"),
            F("ScaledToZero"),
            OK,
            id="scaled-to-zero",
        ),
        pytest.param(
            ad(replicas=0),
            base_model(),
            {},
            deployment(1, 1),
            None,
            "Pending",
            F("ScaledToZero"),
            T("ScaledToZero"),
            OK,
            id="scaling-to-zero",
        ),
        pytest.param(
            ad(from_job("a", "ft")),
            base_model(),
            SUCCEEDED,
            None,
            None,
            "Progressing",
            F("DeploymentCreating"),
            T("DeploymentCreating"),
            OK,
            id="no-deployment",
        ),
        pytest.param(
            ad(from_job("a", "ft")),
            base_model(),
            SUCCEEDED,
            deployment(2, 1, ROLLING),
            None,
            "Progressing",
            F("ReplicasNotReady"),
            T("ReplicasNotReady"),
            OK,
            id="rolling-out-available-false-is-not-degraded",
        ),
        pytest.param(ad(), base_model(), {}, deployment(), None, "Ready", T("Serving"), OK, OK, id="no-adapters"),
        pytest.param(
            ad(from_job("a", "ft")),
            base_model(),
            SUCCEEDED,
            deployment(),
            None,
            "Progressing",
            F("AdaptersNotLoaded"),
            T("AdaptersNotLoaded"),
            OK,
            id="no-evidence-never-ready",
        ),
        pytest.param(
            ad(from_job("a", "ft"), from_artifact("b")),
            base_model(),
            SUCCEEDED,
            deployment(),
            {"a": loaded(), "b": loaded()},
            "Ready",
            T("Serving"),
            OK,
            OK,
            id="all-loaded",
        ),
        pytest.param(
            ad(from_job("a", "ft"), from_artifact("b")),
            base_model(),
            SUCCEEDED,
            deployment(),
            {"a": loaded(), "b": {"state": "Loading", "loadedReplicas": 1}},
            "Progressing",
            F("AdaptersNotLoaded"),
            T("AdaptersNotLoaded"),
            OK,
            id="one-loading",
        ),
        pytest.param(
            ad(from_job("a", "ft"), from_artifact("b")),
            base_model(),
            {"ft": ftj_in("Running")},
            deployment(),
            {"b": loaded()},
            "Progressing",
            F("AdaptersNotLoaded"),
            T("AdaptersNotLoaded"),
            OK,
            id="waiting-for-training",
        ),
        pytest.param(
            ad(from_job("a", "ft"), from_artifact("b")),
            base_model(),
            SUCCEEDED,
            deployment(),
            {"a": loaded(), "b": {"state": "Failed", "reason": "DigestMismatch", "message": "x"}},
            "Degraded",
            F("AdapterFailed"),
            F("AdapterFailed"),
            T("AdapterFailed"),
            id="adapter-failed-on-pods",
        ),
        pytest.param(
            ad(from_job("a", "ft"), from_artifact("b")),
            base_model(),
            {"ft": ftj_in("Failed")},
            deployment(),
            {"b": loaded()},
            "Degraded",
            F("AdapterFailed"),
            F("AdapterFailed"),
            T("AdapterFailed"),
            id="fine-tune-job-failed",
        ),
        pytest.param(
            ad(from_job("a", "ft")),
            base_model(),
            {"ft": ftj_in("Failed")},
            deployment(2, 0, ROLLING),
            None,
            "Progressing",
            F("ReplicasNotReady"),
            T("ReplicasNotReady"),
            T("AdapterFailed"),
            id="adapter-failed-while-rolling-out",
        ),
        pytest.param(
            ad(),
            base_model(),
            {},
            deployment(2, 1, STUCK),
            None,
            "Degraded",
            F("ProgressDeadlineExceeded"),
            F("ProgressDeadlineExceeded"),
            T("ProgressDeadlineExceeded"),
            id="progress-deadline-exceeded",
        ),
        pytest.param(
            ad(),
            base_model(),
            {},
            deployment(2, 1, LOST),
            None,
            "Degraded",
            F("MinimumReplicasUnavailable"),
            F("MinimumReplicasUnavailable"),
            T("MinimumReplicasUnavailable"),
            id="replicas-lost-after-rollout",
        ),
        pytest.param(
            ad(),
            base_model(),
            {},
            deployment(0, 0, CANNOT_CREATE),
            None,
            "Degraded",
            F("FailedCreate"),
            F("FailedCreate"),
            T("FailedCreate"),
            id="replica-failure",
        ),
        pytest.param(
            ad(from_job("a", "ft")),
            base_model(),
            {"ft": ftj_in("Failed")},
            deployment(2, 1, STUCK),
            None,
            "Degraded",
            F("ProgressDeadlineExceeded"),
            F("ProgressDeadlineExceeded"),
            T("ProgressDeadlineExceeded"),
            id="deployment-fault-before-adapter-fault",
        ),
    ],
)
def test_adapterdeployment_phases(
    spec: Obj,
    bm: Obj | None,
    jobs: dict[str, Obj | None],
    dep: Obj | None,
    reports: dict[str, Obj] | None,
    phase: str,
    ready: tuple[str, str],
    progressing: tuple[str, str],
    degraded: tuple[str, str],
) -> None:
    st = adapterdeployment_status(
        spec,
        base_model=bm,
        fine_tune_jobs=jobs,
        deployment=dep,
        service_host="serve.ns.svc",
        adapter_reports=reports,
        now=NOW,
    )
    assert_shape(st, AdapterDeploymentStatus, TRIPLET)
    assert st["phase"] == phase
    assert st["observedGeneration"] == 7
    assert cond_of(st, "Ready") == ready
    assert cond_of(st, "Progressing") == progressing
    assert cond_of(st, "Degraded") == degraded


@pytest.mark.parametrize(
    ("reports", "ready_replicas", "expected"),
    [
        pytest.param(None, 2, ("Loading", "AdapterLoading", 0), id="no-reports-ready-replicas"),
        pytest.param(None, 0, ("Pending", "NoReadyReplicas", 0), id="no-reports-no-replicas"),
        pytest.param({}, 2, ("Loading", "AdapterLoading", 0), id="not-in-reports"),
        pytest.param({"a": {"state": "Bogus"}}, 2, ("Loading", "AdapterLoading", 0), id="unknown-state-ignored"),
        pytest.param({"a": {"state": "Loaded", "loadedReplicas": 2}}, 2, ("Loaded", None, 2), id="loaded"),
        pytest.param(
            {"a": {"state": "Loading", "loadedReplicas": 1, "reason": "Downloading"}},
            2,
            ("Loading", "Downloading", 1),
            id="loading",
        ),
        pytest.param(
            {"a": {"state": "Failed", "reason": "bad reason!", "message": "m"}},
            2,
            ("Failed", None, 0),
            id="bad-reason-dropped",
        ),
    ],
)
def test_adapter_state_needs_evidence(
    reports: dict[str, Obj] | None, ready_replicas: int, expected: tuple[str, str | None, int]
) -> None:
    st = adapterdeployment_status(
        ad(from_job("a", "ft")),
        base_model=base_model(),
        fine_tune_jobs=SUCCEEDED,
        deployment=deployment(2, ready_replicas),
        service_host=None,
        adapter_reports=reports,
        now=NOW,
    )
    (entry,) = st["adapters"]
    assert (entry["state"], entry.get("reason"), entry["loadedReplicas"]) == expected
    assert (entry["uri"], entry["digest"]) == (artifact()["uri"], DIGEST)


def test_adapterdeployment_fields() -> None:
    spec = ad(from_artifact("z"), from_job("a", "missing"), from_job("m", "ft"), replicas=3, port=9000)
    st = adapterdeployment_status(
        spec,
        base_model=base_model(),
        fine_tune_jobs=SUCCEEDED,
        deployment=deployment(3, 3),
        service_host="serve.ns.svc",
        adapter_reports={"z": loaded(3), "m": loaded(3)},
        now=NOW,
    )
    assert_shape(st, AdapterDeploymentStatus, TRIPLET)
    assert [a["name"] for a in st["adapters"]] == ["z", "a", "m"]  # spec order
    assert st["adaptersReady"] == "2/3"
    assert (st["replicas"], st["readyReplicas"]) == (3, 3)
    assert st["endpoint"] == "http://serve.ns.svc:9000/v1"
    assert "waiting for a" in get_condition(st["conditions"], "Ready")["message"]  # type: ignore[index]
    bare = adapterdeployment_status(
        ad(), base_model=base_model(), fine_tune_jobs={}, deployment=None, service_host=None, now=NOW
    )
    assert "endpoint" not in bare
    assert (bare["replicas"], bare["readyReplicas"]) == (0, 0)
    assert (bare["adaptersReady"], bare["adapters"]) == ("0/0", [])
    default_port = adapterdeployment_status(
        ad(), base_model=base_model(), fine_tune_jobs={}, deployment=None, service_host="h", now=NOW
    )
    assert default_port["endpoint"] == "http://h:8000/v1"


def test_adapterdeployment_degraded_message_names_failed_adapters() -> None:
    spec = ad(from_job("a", "ft"), from_artifact("b"), from_artifact("c"))
    st = adapterdeployment_status(
        spec,
        base_model=base_model(),
        fine_tune_jobs={"ft": ftj_in("Failed")},
        deployment=deployment(),
        service_host=None,
        adapter_reports={"b": {"state": "Failed"}, "c": loaded()},
        now=NOW,
    )
    msg = get_condition(st["conditions"], "Degraded")["message"]  # type: ignore[index]
    assert "a, b" in msg and "c" not in msg.split(":")[1]


def test_adapterdeployment_transition_time_stable() -> None:
    kwargs: dict[str, Any] = {"base_model": base_model(), "fine_tune_jobs": SUCCEEDED, "service_host": None}
    first = adapterdeployment_status(ad(from_job("a", "ft")), deployment=deployment(2, 0, ROLLING), now=NOW, **kwargs)
    second = adapterdeployment_status(
        ad(from_job("a", "ft"), status=first), deployment=deployment(2, 1, ROLLING), now=LATER, **kwargs
    )
    assert second["conditions"] == [
        {**c, "message": c2["message"]} for c, c2 in zip(first["conditions"], second["conditions"], strict=True)
    ]
    ready = adapterdeployment_status(
        ad(from_job("a", "ft"), status=second),
        deployment=deployment(),
        adapter_reports={"a": loaded()},
        now=LATER,
        **kwargs,
    )
    times = {c["type"]: c["lastTransitionTime"] for c in ready["conditions"]}
    assert times == {"Ready": rfc3339(LATER), "Progressing": rfc3339(LATER), "Degraded": rfc3339(NOW)}


# -- writing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        pytest.param(None, {"phase": "Ready"}, {"phase": "Ready"}, id="first-write"),
        pytest.param(
            {"phase": "Ready", "endpoint": "http://h:8000/v1"},
            {"phase": "Pending"},
            {"phase": "Pending", "endpoint": None},
            id="dropped-key-nulled",
        ),
        pytest.param(
            {"progress": {"step": 1, "loss": 2.0}},
            {"progress": {"step": 2}},
            {"progress": {"step": 2, "loss": None}},
            id="nested-dropped-key-nulled",
        ),
        pytest.param(
            {"adapters": [{"name": "a"}, {"name": "b"}]},
            {"adapters": [{"name": "b"}]},
            {"adapters": [{"name": "b"}]},
            id="lists-replaced-whole",
        ),
        pytest.param({"metrics": 3}, {"metrics": {"x": 1.0}}, {"metrics": {"x": 1.0}}, id="type-change"),
    ],
)
def test_status_patch(old: Obj | None, new: Obj, expected: Obj) -> None:
    assert status_patch(old, new) == expected
