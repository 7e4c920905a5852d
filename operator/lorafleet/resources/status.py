"""Status of each lorafleet kind, computed from the custom resource and its children.

Pure functions, called once per reconcile pass: dicts in (as kopf hands them over), a `.status` dict out
(camelCase keys, no None values). Conditions keep their lastTransitionTime while their status holds,
so the result can be compared with the previous status and the differences turned into Events
(see conditions.transitions).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from lorafleet.resources.common import Obj
from lorafleet.resources.conditions import ConditionStatus, ConditionType, Reason, rfc3339, set_condition

# metav1.Condition's reason pattern; anything else from outside (trainer) is replaced.
_REASON = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
# Events' note is capped at 1 KiB; messages taken from outside are cut to fit.
_MAX_MESSAGE = 1024
_ADAPTER_STATES = ("Pending", "Loading", "Loaded", "Failed")
_TERMINAL = ("Succeeded", "Failed")

FineTuneJobPhase = Literal["Pending", "Running", "Succeeded", "Failed"]
AdapterDeploymentPhase = Literal["Pending", "Progressing", "Ready", "Degraded"]


@dataclass(frozen=True)
class ResolvedAdapter:
    """An adapter that can be served now: the Deployment builder renders these."""

    name: str
    uri: str
    digest: str | None
    store: Obj | None


@dataclass(frozen=True)
class _Cond:
    status: ConditionStatus
    reason: str
    message: str


# -- helpers ---------------------------------------------------------------------------------------


def _dig(obj: Obj | None, *path: str) -> Any:
    cur: Any = obj
    for key in path:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(key)
    return cur


def _compact(d: Obj) -> Obj:
    return {k: v for k, v in d.items() if v is not None}


def _clip(message: str) -> str:
    return message if len(message) <= _MAX_MESSAGE else message[: _MAX_MESSAGE - 3] + "..."


def _time(value: Any) -> str | None:
    """Kubernetes times arrive as RFC3339 strings from kopf, as datetimes from the python client."""
    if isinstance(value, datetime):
        return rfc3339(value)
    return value if isinstance(value, str) and value else None


def _number(value: Any) -> float | None:
    # JSON from a container may hold NaN/Infinity, which the API server would refuse in status.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _conditions(obj: Obj, generation: int | None, now: datetime, conds: dict[str, _Cond]) -> list[Obj]:
    """Set the given conditions (by type) on top of the object's current ones."""
    result: list[Obj] = list(_dig(obj, "status", "conditions") or [])
    for type_, c in conds.items():
        result = set_condition(
            result,
            type=type_,
            status=c.status,
            reason=c.reason,
            message=c.message,
            generation=generation,
            now=now,
        )
    return result


def _ready_triplet(
    obj: Obj, generation: int | None, now: datetime, *, ready: _Cond, progressing: _Cond, degraded: _Cond
) -> list[Obj]:
    return _conditions(
        obj,
        generation,
        now,
        {
            ConditionType.READY: ready,
            ConditionType.PROGRESSING: progressing,
            ConditionType.DEGRADED: degraded,
        },
    )


def _base_model_problem(name: str, base_model: Obj | None, waiter: str) -> _Cond | None:
    """Why a dependant must wait for its BaseModel, or None when the BaseModel is Ready."""
    if base_model is None:
        return _Cond("False", Reason.BASE_MODEL_NOT_FOUND, f'BaseModel "{name}" not found; the {waiter} once it exists')
    phase = _dig(base_model, "status", "phase")
    if phase != "Ready":
        ready = _dig(base_model, "status", "conditions") or []
        detail = next((c.get("message") for c in ready if c.get("type") == ConditionType.READY), None)
        suffix = f": {detail}" if detail else ""
        return _Cond(
            "False",
            Reason.BASE_MODEL_NOT_READY,
            f'BaseModel "{name}" is not Ready (phase {phase or "Pending"}){suffix}; the {waiter} once it is',
        )
    return None


# -- BaseModel -------------------------------------------------------------------------------------


def basemodel_secret_names(bm: Obj) -> list[str]:
    """Secrets a BaseModel references, for the controller to look up before calling basemodel_status."""
    store = _dig(bm, "spec", "source", "store") or {}
    names = [_dig(store, "credentialsSecretRef", "name"), _dig(store, "caBundleSecretRef", "name")]
    return [n for n in dict.fromkeys(names) if isinstance(n, str) and n]


@dataclass(frozen=True)
class ArtifactCheck:
    """What the operator found in the artifact store for a version folder (read by the controller)."""

    digest: str | None = None
    size_bytes: int | None = None
    revision: str | None = None
    rank: int | None = None  # an adapter's LoRA rank, from the lineage the trainer wrote
    # (reason, message) when the version could not be verified; transient unless reason is DigestMismatch.
    problem: tuple[str, str] | None = None


def basemodel_status(
    bm: Obj,
    *,
    default_store_configured: bool,
    missing_secret: str | None,
    now: datetime,
    source_check: ArtifactCheck | None = None,
) -> Obj:
    """Checks the API server cannot make (operator configuration, referenced Secrets, the stored manifest).

    A missing Secret or manifest leaves the BaseModel Pending (fixing them needs no spec change); a missing
    store or a digest other than the pinned one is Failed: only a spec edit or the operator's configuration
    can fix it. An s3:// model is Ready only once its manifest was read and its digest recorded.
    """
    generation = _dig(bm, "metadata", "generation")
    source = _dig(bm, "spec", "source") or {}
    uri = str(source.get("uri", ""))
    old = _dig(bm, "status") or {}
    digest, size, revision = old.get("digest"), old.get("sizeBytes"), old.get("resolvedRevision")
    phase: Literal["Pending", "Ready", "Failed"]
    if uri.startswith("s3://") and not source.get("store") and not default_store_configured:
        phase, ready = (
            "Failed",
            _Cond(
                "False",
                Reason.STORE_NOT_CONFIGURED,
                f"source {uri} is in an object store, but spec.source.store is not set and the operator has no "
                "default artifact store (Helm value artifactStore); set one of them",
            ),
        )
    elif missing_secret:
        phase, ready = (
            "Pending",
            _Cond(
                "False",
                Reason.SECRET_NOT_FOUND,
                f'Secret "{missing_secret}" referenced by spec.source.store not found; the model is checked '
                "again once it exists",
            ),
        )
    elif source_check is not None and source_check.problem is not None:
        reason, message = source_check.problem
        phase = "Failed" if reason == Reason.DIGEST_MISMATCH else "Pending"
        ready = _Cond("False", reason, _clip(message))
    elif source_check is not None:
        phase, ready = "Ready", _Cond("True", Reason.VERIFIED, f"manifest of {uri} read; digest {source_check.digest}")
        digest, size, revision = source_check.digest, source_check.size_bytes, source_check.revision
    else:
        phase, ready = "Ready", _Cond("True", Reason.SOURCE_VALID, f"source {uri} is valid")
    return _compact(
        {
            "phase": phase,
            "resolvedRevision": revision,
            "digest": digest,
            "sizeBytes": size,
            "observedGeneration": generation,
            "conditions": _conditions(bm, generation, now, {ConditionType.READY: ready}),
        }
    )


# -- FineTuneJob -----------------------------------------------------------------------------------


def _job_condition(job: Obj, *types: str) -> Obj | None:
    for c in _dig(job, "status", "conditions") or []:
        if c.get("type") in types and c.get("status") == "True":
            return dict(c)
    return None


def _report_progress(report: Obj | None) -> Obj | None:
    raw = _dig(report, "progress")
    if not isinstance(raw, dict):
        return None
    step = _int(raw.get("step"))
    return _compact(
        {
            "step": step if step is not None else 0,
            "totalSteps": _int(raw.get("totalSteps")),
            "epoch": _number(raw.get("epoch")),
            "loss": _number(raw.get("loss")),
        }
    )


def _report_metrics(report: Obj | None) -> dict[str, float] | None:
    raw = _dig(report, "metrics")
    if not isinstance(raw, dict):
        return None
    metrics = {str(k): _number(v) for k, v in raw.items()}
    return {k: v for k, v in metrics.items() if v is not None}


def _report_artifact(report: Obj | None) -> Obj | None:
    raw = _dig(report, "artifact")
    if not isinstance(raw, dict):
        return None
    uri, digest, size = raw.get("uri"), raw.get("digest"), _int(raw.get("sizeBytes"))
    # All three or nothing: AdapterDeployments pin the digest, a partial record is useless.
    if not (isinstance(uri, str) and isinstance(digest, str) and size is not None):
        return None
    return {"uri": uri, "digest": digest, "sizeBytes": size}


def _report_error(report: Obj | None) -> tuple[str | None, str | None]:
    raw = _dig(report, "error")
    if not isinstance(raw, dict):
        return None, None
    reason, message = raw.get("reason"), raw.get("message")
    if isinstance(reason, str) and reason and not _REASON.match(reason):
        reason = Reason.TRAINER_ERROR
    return (
        reason if isinstance(reason, str) and reason else None,
        _clip(message) if isinstance(message, str) and message else None,
    )


def _progress_text(progress: Obj | None) -> str:
    if not progress:
        return ""
    total = progress.get("totalSteps")
    text = f"step {progress.get('step', 0)}" + (f"/{total}" if total else "")
    extra = [
        f"epoch {progress['epoch']:.2f}" if "epoch" in progress else "",
        f"loss {progress['loss']:.4g}" if "loss" in progress else "",
    ]
    extra = [e for e in extra if e]
    return text + (f" ({', '.join(extra)})" if extra else "")


def finetunejob_status(
    ftj: Obj,
    *,
    base_model: Obj | None,
    job: Obj | None,
    now: datetime,
    trainer_report: Obj | None = None,
) -> Obj:
    """Status of a FineTuneJob from its BaseModel, its batch/v1 Job and the trainer's report.

    Succeeded and Failed are terminal: once recorded they stay, whatever happens to the Job. The Job,
    when it exists, wins over the BaseModel: a running Job keeps running if its BaseModel goes away.
    """
    generation = _dig(ftj, "metadata", "generation")
    old: Obj = _dig(ftj, "status") or {}
    job_name = _dig(job, "metadata", "name") or old.get("jobName")
    progress = _report_progress(trainer_report) or old.get("progress")
    metrics = _report_metrics(trainer_report) or old.get("metrics") or None
    artifact = old.get("artifact")
    start_time = old.get("startTime")
    completion_time = old.get("completionTime")
    error_reason, error_message = _report_error(trainer_report)
    old_ready: Obj = next((c for c in old.get("conditions") or [] if c.get("type") == ConditionType.READY), {})

    phase: FineTuneJobPhase
    if old.get("phase") in _TERMINAL:
        phase = old["phase"]
        if phase == "Succeeded":
            # A report read late (the pod was not readable on the pass that saw the Job complete)
            # may still record the artifact; a recorded artifact is never replaced.
            artifact = artifact or _report_artifact(trainer_report)
            reason, message = Reason.SUCCEEDED, old_ready.get("message") or "training succeeded"
        else:
            reason = old_ready.get("reason") or Reason.JOB_FAILED
            message = old_ready.get("message") or "training failed"
    elif job is not None:
        start_time = _time(_dig(job, "status", "startTime")) or start_time
        # SuccessCriteriaMet / FailureTarget (Kubernetes 1.31+) come before Complete / Failed, while
        # the remaining pods terminate; the outcome is already decided.
        done = _job_condition(job, "Complete", "SuccessCriteriaMet")
        failed = _job_condition(job, "Failed", "FailureTarget")
        if done is not None:
            phase, reason = "Succeeded", Reason.SUCCEEDED
            completion_time = (
                _time(_dig(job, "status", "completionTime")) or _time(done.get("lastTransitionTime")) or rfc3339(now)
            )
            artifact = _report_artifact(trainer_report) or artifact
            message = f'training Job "{job_name}" succeeded'
            if artifact:
                message += f"; adapter stored at {artifact['uri']}"
        elif failed is not None:
            phase = "Failed"
            completion_time = _time(failed.get("lastTransitionTime")) or rfc3339(now)
            # The trainer knows why (e.g. DatasetInvalid); the Job only says it gave up retrying.
            reason = error_reason or failed.get("reason") or Reason.JOB_FAILED
            message = error_message or _clip(failed.get("message") or f'training Job "{job_name}" failed')
        elif _job_condition(job, "Suspended") is not None:
            phase, reason = "Pending", Reason.JOB_SUSPENDED
            message = f'training Job "{job_name}" is suspended (waiting for admission to a queue)'
        elif not _dig(job, "status", "startTime"):
            # Created, but the Job controller has not started it: not Running yet (status must not run ahead).
            phase, reason = "Pending", Reason.JOB_CREATING
            message = f'training Job "{job_name}" created; waiting for the Job controller to start it'
        else:
            phase, reason = "Running", Reason.JOB_RUNNING
            active = _int(_dig(job, "status", "active")) or 0
            message = f'training Job "{job_name}" is running ({active} active pod{"s" * (active != 1)})'
            if progress:
                message += f", {_progress_text(progress)}"
    else:
        name = _dig(ftj, "spec", "baseModelRef", "name") or ""
        problem = _base_model_problem(name, base_model, "training Job starts")
        phase = "Pending"
        if problem is not None:
            reason, message = problem.reason, problem.message
        else:
            reason, message = Reason.JOB_CREATING, "creating the training Job"

    ready = _Cond("True" if phase == "Succeeded" else "False", reason, message)
    progressing = _Cond(
        "True" if reason in (Reason.JOB_CREATING, Reason.JOB_SUSPENDED, Reason.JOB_RUNNING) else "False",
        reason,
        message,
    )
    degraded = _Cond("True", reason, message) if phase == "Failed" else _Cond("False", Reason.AS_EXPECTED, "")
    return _compact(
        {
            "phase": phase,
            "jobName": job_name,
            "startTime": start_time,
            "completionTime": completion_time if phase in _TERMINAL else None,
            "progress": progress,
            "artifact": artifact if phase == "Succeeded" else None,
            "metrics": metrics,
            "observedGeneration": generation,
            "conditions": _ready_triplet(ftj, generation, now, ready=ready, progressing=progressing, degraded=degraded),
        }
    )


# -- AdapterDeployment -----------------------------------------------------------------------------


def resolve_adapters(ad: Obj, fine_tune_jobs: Mapping[str, Obj | None]) -> tuple[list[ResolvedAdapter], list[Obj]]:
    """Split spec.adapters into those servable now and status entries (Pending/Failed) for the rest.

    `fine_tune_jobs` maps FineTuneJob name to the object, None (or absent) when it does not exist.
    """
    resolved: list[ResolvedAdapter] = []
    waiting: list[Obj] = []
    for spec in _dig(ad, "spec", "adapters") or []:
        name = spec["name"]
        artifact = spec.get("artifact")
        if artifact:
            resolved.append(ResolvedAdapter(name, artifact["uri"], artifact.get("digest"), artifact.get("store")))
            continue
        ref = _dig(spec, "fineTuneJobRef", "name") or ""
        ftj = fine_tune_jobs.get(ref)
        phase = _dig(ftj, "status", "phase") or "Pending"
        stored = _dig(ftj, "status", "artifact")
        if ftj is None:
            state, reason, message = (
                "Pending",
                Reason.FINE_TUNE_JOB_NOT_FOUND,
                f'FineTuneJob "{ref}" not found; the adapter is served once it exists and has succeeded',
            )
        elif phase == "Failed":
            detail = next(
                (
                    c.get("message")
                    for c in _dig(ftj, "status", "conditions") or []
                    if c.get("type") == ConditionType.READY and c.get("message")
                ),
                None,
            )
            state, reason = "Failed", Reason.FINE_TUNE_JOB_FAILED
            message = f'FineTuneJob "{ref}" failed' + (f": {detail}" if detail else "")
        elif phase != "Succeeded":
            state, reason, message = (
                "Pending",
                Reason.FINE_TUNE_JOB_NOT_SUCCEEDED,
                f'waiting for FineTuneJob "{ref}" (phase {phase})',
            )
        elif not (isinstance(stored, dict) and stored.get("uri")):
            state, reason, message = (
                "Pending",
                Reason.ARTIFACT_NOT_RECORDED,
                f'FineTuneJob "{ref}" succeeded but has not recorded its artifact yet',
            )
        else:
            # Read it back from the store the FineTuneJob wrote to.
            store = _dig(ftj, "spec", "output", "store")
            resolved.append(ResolvedAdapter(name, stored["uri"], stored.get("digest"), store))
            continue
        waiting.append({"name": name, "state": state, "reason": reason, "message": _clip(message), "loadedReplicas": 0})
    return resolved, waiting


def _served_adapter_status(adapter: ResolvedAdapter, report: Obj | None, ready_replicas: int) -> Obj:
    entry: Obj = {"name": adapter.name, "uri": adapter.uri, "digest": adapter.digest}
    if report is not None and report.get("state") in _ADAPTER_STATES:
        loaded = _int(report.get("loadedReplicas"))
        reason, message = report.get("reason"), report.get("message")
        entry.update(
            state=report["state"],
            loadedReplicas=loaded if loaded is not None else 0,
            reason=reason if isinstance(reason, str) and _REASON.match(reason) else None,
            message=_clip(message) if isinstance(message, str) and message else None,
        )
    elif ready_replicas > 0:
        # No evidence from the pods yet: never claim Loaded.
        entry.update(
            state="Loading",
            loadedReplicas=0,
            reason=Reason.ADAPTER_LOADING,
            message="waiting for the replicas to report the adapter loaded",
        )
    else:
        entry.update(
            state="Pending",
            loadedReplicas=0,
            reason=Reason.NO_READY_REPLICAS,
            message="waiting for a ready replica to load the adapter",
        )
    return _compact(entry)


def _deployment_problem(deployment: Obj | None) -> _Cond | None:
    """A Deployment that will not get better by waiting: rollout stuck, pods not creatable, or lost."""
    conds = {c.get("type"): c for c in _dig(deployment, "status", "conditions") or []}
    progressing, available = conds.get("Progressing"), conds.get("Available")
    failure = conds.get("ReplicaFailure")
    if progressing and progressing.get("status") == "False":
        return _Cond(
            "True",
            progressing.get("reason") or Reason.PROGRESS_DEADLINE_EXCEEDED,
            _clip(progressing.get("message") or "the rollout made no progress"),
        )
    if failure and failure.get("status") == "True":
        return _Cond(
            "True",
            failure.get("reason") or "ReplicaFailure",
            _clip(failure.get("message") or "replicas could not be created"),
        )
    # Available=False is normal while a rollout is under way; it is a fault only once the rollout is
    # complete (replicas lost afterwards).
    rollout_done = progressing is not None and progressing.get("reason") == "NewReplicaSetAvailable"
    if available and available.get("status") == "False" and rollout_done:
        return _Cond(
            "True",
            available.get("reason") or Reason.MINIMUM_REPLICAS_UNAVAILABLE,
            _clip(available.get("message") or "fewer replicas available than required"),
        )
    return None


def adapterdeployment_status(
    ad: Obj,
    *,
    base_model: Obj | None,
    fine_tune_jobs: Mapping[str, Obj | None],
    deployment: Obj | None,
    service_host: str | None,
    adapter_reports: Mapping[str, Obj] | None = None,
    now: datetime,
) -> Obj:
    """Status of an AdapterDeployment from its BaseModel, FineTuneJobs, Deployment, Service and pods.

    `adapter_reports` (adapter name -> {loadedReplicas, state, reason, message}) is the evidence from
    the pods; without it an adapter is at best Loading.
    """
    generation = _dig(ad, "metadata", "generation")
    spec: Obj = _dig(ad, "spec") or {}
    desired_replicas = _int(spec.get("replicas"))
    desired_replicas = 1 if desired_replicas is None else desired_replicas
    replicas = _int(_dig(deployment, "status", "replicas")) or 0
    ready_replicas = _int(_dig(deployment, "status", "readyReplicas")) or 0
    port = _dig(spec, "service", "port") or 8000

    resolved, waiting = resolve_adapters(ad, fine_tune_jobs)
    by_name = {e["name"]: e for e in waiting}
    reports: Mapping[str, Obj] = adapter_reports or {}
    for adapter in resolved:
        by_name[adapter.name] = _served_adapter_status(adapter, reports.get(adapter.name), ready_replicas)
    adapters = [by_name[a["name"]] for a in spec.get("adapters") or [] if a.get("name") in by_name]
    failed = [a["name"] for a in adapters if a["state"] == "Failed"]
    not_loaded = [a["name"] for a in adapters if a["state"] != "Loaded"]
    loaded = len(adapters) - len(not_loaded)

    # Degraded is reported on its own merits, whatever the phase says.
    faults = [c for c in [_deployment_problem(deployment)] if c is not None]
    if failed:
        faults.append(_Cond("True", Reason.ADAPTER_FAILED, "adapters failed: " + ", ".join(failed)))
    degraded = (
        _Cond("True", faults[0].reason, "; ".join(f.message for f in faults))
        if faults
        else _Cond("False", Reason.AS_EXPECTED, "")
    )
    deployment_fault = faults[0] if faults and faults[0].reason != Reason.ADAPTER_FAILED else None

    phase: AdapterDeploymentPhase
    replica_text = f"{ready_replicas}/{desired_replicas} replicas ready"
    base_problem = _base_model_problem(_dig(spec, "baseModelRef", "name") or "", base_model, "replicas are rolled out")
    if base_problem is not None:
        phase, reason, message, moving = "Pending", base_problem.reason, base_problem.message, False
    elif desired_replicas == 0:
        # Nothing is wrong, but nothing serves either; pods may still be shutting down.
        phase, reason, moving = "Pending", Reason.SCALED_TO_ZERO, replicas > 0
        message = "spec.replicas is 0; set it to 1 or more to serve"
    elif deployment_fault is not None:
        phase, reason, message, moving = "Degraded", deployment_fault.reason, deployment_fault.message, False
    elif deployment is None:
        phase, reason, moving = "Progressing", Reason.DEPLOYMENT_CREATING, True
        message = "creating the Deployment"
    elif ready_replicas < desired_replicas:
        phase, reason, message, moving = "Progressing", Reason.REPLICAS_NOT_READY, replica_text, True
    elif failed:
        phase, reason, message, moving = "Degraded", Reason.ADAPTER_FAILED, degraded.message, False
    elif not_loaded:
        phase, reason, moving = "Progressing", Reason.ADAPTERS_NOT_LOADED, True
        message = f"{loaded}/{len(adapters)} adapters loaded; waiting for " + ", ".join(not_loaded)
    else:
        phase, reason, moving = "Ready", Reason.SERVING, False
        message = f"{replica_text}, {loaded}/{len(adapters)} adapters loaded"

    ready = _Cond("True" if phase == "Ready" else "False", reason, message)
    progressing = _Cond(
        "True" if moving else "False",
        reason if phase != "Ready" else Reason.AS_EXPECTED,
        message if phase != "Ready" else "",
    )
    return _compact(
        {
            "phase": phase,
            "replicas": replicas,
            "readyReplicas": ready_replicas,
            "endpoint": f"http://{service_host}:{port}/v1" if service_host else None,
            "adaptersReady": f"{loaded}/{len(adapters)}",
            "adapters": adapters,
            "observedGeneration": generation,
            "conditions": _ready_triplet(ad, generation, now, ready=ready, progressing=progressing, degraded=degraded),
        }
    )


# -- writing ---------------------------------------------------------------------------------------


def status_patch(old: Obj | None, new: Obj) -> Obj:
    """`new` as a JSON merge patch over `old`: keys `new` dropped are set to None (null) so they are removed.

    The status functions leave None out, and a merge patch leaves keys it does not name untouched, so an
    endpoint or a progress field that went away would otherwise stay on the object. Lists are replaced
    whole by a merge patch and need nothing.
    """
    patch: Obj = {k: None for k in (old or {}) if k not in new}
    for key, value in new.items():
        before = (old or {}).get(key)
        patch[key] = status_patch(before, value) if isinstance(value, dict) and isinstance(before, dict) else value
    return patch
