"""Status conditions following the Kubernetes API conventions, as plain dicts (camelCase keys).

Pure functions: the reconcile pass passes `now` in, so results are deterministic and testable.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from lorafleet.contracts.serving import AdapterReason

ConditionStatus = Literal["True", "False", "Unknown"]
Transition = tuple[str, str, str, str]


class ConditionType:
    """Condition types every lorafleet kind reports (BaseModel reports only Ready)."""

    READY = "Ready"
    PROGRESSING = "Progressing"
    DEGRADED = "Degraded"
    # FineTuneJob, only while False: vLLM cannot serve LoRA adapters on its base model's family (a warning).
    LORA_SERVABLE = "LoRAServable"


class Reason:
    """CamelCase reasons; they also become the reason of the Events emitted on transitions."""

    AS_EXPECTED = "AsExpected"
    INVALID_SPEC = "InvalidSpec"  # the operator cannot parse the spec (the API server should have refused it)
    # BaseModel
    SOURCE_VALID = "SourceValid"
    VERIFIED = "Verified"
    DIGEST_MISMATCH = "DigestMismatch"
    MANIFEST_NOT_FOUND = "ManifestNotFound"
    STORE_UNAVAILABLE = "StoreUnavailable"
    STORE_NOT_CONFIGURED = "StoreNotConfigured"
    STORE_NOT_ALLOWED = "StoreNotAllowed"
    STORE_NOT_FOUND = "StoreNotFound"  # a storeRef names no ClusterArtifactStore or ArtifactStore of the namespace
    SECRET_NOT_FOUND = "SecretNotFound"
    # Dependencies on a BaseModel
    BASE_MODEL_NOT_FOUND = "BaseModelNotFound"
    BASE_MODEL_NOT_READY = "BaseModelNotReady"
    # FineTuneJob
    JOB_CREATING = "JobCreating"
    JOB_SUSPENDED = "JobSuspended"
    JOB_RUNNING = "JobRunning"
    SUCCEEDED = "Succeeded"
    JOB_FAILED = "JobFailed"
    TRAINER_ERROR = "TrainerError"
    ARTIFACT_REJECTED = "ArtifactRejected"  # the trainer's report named a version that is not this job's
    ADAPTER_IN_USE = "AdapterInUse"  # deletion waits for AdapterDeployments that reference the adapter
    # The Job completed; the operator reads the adapter's manifest before judging spec.evaluation.require.
    VERIFYING_ADAPTER = "VerifyingAdapter"
    # Quality bars (FineTuneJob spec.evaluation.require, AdapterDeployment requireEvaluation): a bar missed, or
    # no evaluation in the adapter's manifest to judge.
    BELOW_QUALITY_BAR = "BelowQualityBar"
    NOT_EVALUATED = "NotEvaluated"
    # AdapterDeployment
    FINE_TUNE_JOB_NOT_FOUND = "FineTuneJobNotFound"
    FINE_TUNE_JOB_NOT_SUCCEEDED = "FineTuneJobNotSucceeded"
    FINE_TUNE_JOB_FAILED = "FineTuneJobFailed"
    ARTIFACT_NOT_RECORDED = "ArtifactNotRecorded"
    DEPLOYMENT_CREATING = "DeploymentCreating"
    REPLICAS_NOT_READY = "ReplicasNotReady"
    NO_READY_REPLICAS = "NoReadyReplicas"
    ADAPTER_LOADING = AdapterReason.ADAPTER_LOADING  # as an adapter's reason, the same as the aggregation's
    ADAPTERS_NOT_LOADED = "AdaptersNotLoaded"
    ADAPTER_FAILED = "AdapterFailed"
    SCALED_TO_ZERO = "ScaledToZero"
    SERVING = "Serving"
    # AdapterDeployment refused, FineTuneJob warned: vLLM serves no LoRA on the base model's family
    LORA_NOT_SUPPORTED = "LoRANotSupported"
    # AdapterDeployment refused: vLLM's LoRA on the family (mixture of experts) needs GPUs, and it has none
    UNSUPPORTED_ON_CPU = "UnsupportedOnCPU"
    # FineTuneJob and AdapterDeployment: a child's name is held by an object they do not control (no takeover)
    CHILD_CONFLICT = "ChildConflict"
    # Reported by the Deployment controller; passed through.
    PROGRESS_DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"
    MINIMUM_REPLICAS_UNAVAILABLE = "MinimumReplicasUnavailable"


def rfc3339(value: datetime) -> str:
    """metav1.Time format: UTC, second precision, 'Z' suffix. Naive datetimes are taken as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def get_condition(conditions: list[dict[str, Any]] | None, type: str) -> dict[str, Any] | None:
    for condition in conditions or []:
        if condition.get("type") == type:
            return condition
    return None


def set_condition(
    conditions: list[dict[str, Any]],
    *,
    type: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime,
) -> list[dict[str, Any]]:
    """Return a new list with condition `type` set; the input is left untouched.

    lastTransitionTime moves only when the status flips (a new reason or message is not a transition),
    so it tells how long the object has been in that state. Order is stable: an existing condition
    keeps its place, a new one is appended.
    """
    result = [dict(c) for c in conditions]
    new: dict[str, Any] = {"type": type, "status": status, "reason": reason, "message": message}
    if generation is not None:
        new["observedGeneration"] = generation
    for i, old in enumerate(result):
        if old.get("type") != type:
            continue
        same = old.get("status") == status and old.get("lastTransitionTime")
        new["lastTransitionTime"] = old["lastTransitionTime"] if same else rfc3339(now)
        result[i] = new
        return result
    new["lastTransitionTime"] = rfc3339(now)
    result.append(new)
    return result


def transitions(old: list[dict[str, Any]] | None, new: list[dict[str, Any]]) -> list[Transition]:
    """(type, status, reason, message) of each condition whose status or reason changed, or that is new.

    Message-only changes (progress counters, replica counts) are left out so Events are not spammed.
    """
    changed: list[Transition] = []
    for condition in new:
        before = get_condition(old, condition["type"])
        if before is None or before.get("status") != condition["status"] or before.get("reason") != condition["reason"]:
            changed.append((condition["type"], condition["status"], condition["reason"], condition.get("message", "")))
    return changed


def notable_transitions(old: list[dict[str, Any]] | None, new: list[dict[str, Any]]) -> list[Transition]:
    """The transitions worth an Event: all of them once the object has conditions; on its first status only
    Ready's and Degraded=True (a problem), so creating an object posts one
    Event, not one per condition type (each Event is a write, and a burst of objects pays it N times)."""
    changes = transitions(old, new)
    if old:
        return changes
    return [t for t in changes if t[0] == "Ready" or (t[0] == "Degraded" and t[1] == "True")]
