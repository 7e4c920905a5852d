"""Status of a FineTuneJob from its BaseModel, its batch/v1 Job and the trainer's report."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from lorafleet.api.common import Condition
from lorafleet.api.finetunejob import ArtifactStatus, FineTuneJobPhase, FineTuneJobStatus, TrainingProgress
from lorafleet.api.objects import BaseModelObject, FineTuneJobObject
from lorafleet.contracts.base import clip, is_reason
from lorafleet.contracts.trainer import TrainerReport
from lorafleet.resources.adapter_guard import DELETION_BLOCKED
from lorafleet.resources.conditions import ConditionType, Reason, rfc3339
from lorafleet.resources.status.common import Cond, Obj, base_model_problem, dig, merge_conditions, ready_triplet
from lorafleet.resources.stores import RenderError
from lorafleet.serving.families import lora_refusal

TERMINAL = ("Succeeded", "Failed")


@dataclass(frozen=True)
class FineTuneJobObserved:
    """What the controller found for a FineTuneJob."""

    base_model: BaseModelObject | None  # None: not found
    job: Obj | None = None  # the training Job (batch/v1) as read back; None: not created (yet)
    report: TrainerReport | None = None  # the trainer's final report or live progress, artifact verified
    render_error: RenderError | None = None  # why the children could not be rendered; matters while no Job exists
    conflict: str | None = None  # children's names held by objects it does not control: nothing was applied
    # Why the reported artifact was refused (adapter_guard): (reason, message); Degraded says it once Succeeded.
    artifact_problem: tuple[str, str] | None = None


def _time(value: Any) -> str | None:
    """Kubernetes times arrive as RFC3339 strings from kopf, as datetimes from the python client."""
    if isinstance(value, datetime):
        return rfc3339(value)
    return value if isinstance(value, str) and value else None


def _job_condition(job: Obj, *types: str) -> Obj | None:
    for c in dig(job, "status", "conditions") or []:
        if c.get("type") in types and c.get("status") == "True":
            return dict(c)
    return None


def _progress(report: TrainerReport | None) -> TrainingProgress | None:
    if report is None or report.progress is None:
        return None
    p = report.progress
    return TrainingProgress(
        step=p.step if p.step is not None else 0,
        total_steps=p.total_steps,
        epoch=None if p.epoch is None else float(p.epoch),
        loss=None if p.loss is None else float(p.loss),
    )


def _artifact(report: TrainerReport | None) -> ArtifactStatus | None:
    if report is None or report.artifact is None:
        return None
    a = report.artifact
    return ArtifactStatus(uri=a.uri, digest=a.digest, size_bytes=a.size_bytes)


def _error(report: TrainerReport | None) -> tuple[str | None, str | None]:
    error = report.error if report is not None else None
    if error is None:
        return None, None
    reason = error.reason or None
    if reason is not None and not is_reason(reason):
        reason = Reason.TRAINER_ERROR
    return reason, clip(error.message) if error.message else None


def _progress_text(progress: TrainingProgress | None) -> str:
    if progress is None:
        return ""
    total = progress.total_steps
    text = f"step {progress.step}" + (f"/{total}" if total else "")
    extra = [
        f"epoch {progress.epoch:.2f}" if progress.epoch is not None else "",
        f"loss {progress.loss:.4g}" if progress.loss is not None else "",
    ]
    extra = [e for e in extra if e]
    return text + (f" ({', '.join(extra)})" if extra else "")


def _rejected(old: FineTuneJobStatus, problem: tuple[str, str] | None) -> Cond | None:
    """Degraded while a succeeded job's reported artifact is refused; kept once said (the refusing report's pod
    may go), until an artifact is recorded."""
    if problem is not None:
        return Cond("True", problem[0], problem[1])
    before = next((c for c in old.conditions if c.type == ConditionType.DEGRADED), None)
    if before is not None and before.status == "True" and before.reason == Reason.ARTIFACT_REJECTED:
        return Cond("True", before.reason, before.message or "")
    return None


def deletion_blocked(ftj: FineTuneJobObject, problem: tuple[str, str], now: datetime) -> FineTuneJobStatus:
    """The status of a FineTuneJob whose deletion waits (the adapter is in use, the store unreachable): its
    current status plus the condition DeletionBlocked=True saying why and until when."""
    old = ftj.status or FineTuneJobStatus()
    conds = {DELETION_BLOCKED: Cond("True", problem[0], problem[1])}
    return old.model_copy(update={"conditions": merge_conditions(old.conditions, conds, ftj.generation, now)})


def finetunejob_status(ftj: FineTuneJobObject, observed: FineTuneJobObserved, now: datetime) -> FineTuneJobStatus:
    """Succeeded and Failed are terminal: once recorded they stay, whatever happens to the Job. The Job, when it
    exists, wins over the BaseModel: a running Job keeps running if its BaseModel goes away.
    """
    job, report = observed.job, observed.report
    old = ftj.status or FineTuneJobStatus()
    job_name = dig(job, "metadata", "name") or old.job_name
    progress = _progress(report) or old.progress
    metrics = (report.metrics if report is not None else None) or old.metrics or {}
    artifact = old.artifact
    start_time: Any = old.start_time
    completion_time: Any = old.completion_time
    error_reason, error_message = _error(report)
    old_ready = next((c for c in old.conditions if c.type == ConditionType.READY), None)
    old_message = old_ready.message if old_ready is not None else ""

    phase: FineTuneJobPhase
    if old.phase in TERMINAL:
        phase = old.phase
        if phase == "Succeeded":
            # A report read late (the pod was not readable on the pass that saw the Job complete)
            # may still record the artifact; a recorded artifact is never replaced.
            artifact = artifact or _artifact(report)
            reason, message = Reason.SUCCEEDED, old_message or "training succeeded"
        else:
            reason = (old_ready.reason if old_ready is not None else "") or Reason.JOB_FAILED
            message = old_message or "training failed"
    elif job is not None:
        start_time = _time(dig(job, "status", "startTime")) or start_time
        # SuccessCriteriaMet / FailureTarget (Kubernetes 1.31+) come before Complete / Failed, while
        # the remaining pods terminate; the outcome is already decided.
        done = _job_condition(job, "Complete", "SuccessCriteriaMet")
        failed = _job_condition(job, "Failed", "FailureTarget")
        if done is not None:
            phase, reason = "Succeeded", Reason.SUCCEEDED
            completion_time = (
                _time(dig(job, "status", "completionTime")) or _time(done.get("lastTransitionTime")) or rfc3339(now)
            )
            artifact = _artifact(report) or artifact
            message = f'training Job "{job_name}" succeeded'
            if artifact:
                message += f"; adapter stored at {artifact.uri}"
        elif failed is not None:
            phase = "Failed"
            completion_time = _time(failed.get("lastTransitionTime")) or rfc3339(now)
            # The trainer knows why (e.g. DatasetInvalid); the Job only says it gave up retrying.
            reason = error_reason or failed.get("reason") or Reason.JOB_FAILED
            message = error_message or clip(failed.get("message") or f'training Job "{job_name}" failed')
        elif _job_condition(job, "Suspended") is not None:
            phase, reason = "Pending", Reason.JOB_SUSPENDED
            message = f'training Job "{job_name}" is suspended (waiting for admission to a queue)'
        elif not dig(job, "status", "startTime"):
            # Created, but the Job controller has not started it: not Running yet (status must not run ahead).
            phase, reason = "Pending", Reason.JOB_CREATING
            message = f'training Job "{job_name}" created; waiting for the Job controller to start it'
        else:
            phase, reason = "Running", Reason.JOB_RUNNING
            active = dig(job, "status", "active")
            active = active if isinstance(active, int) and not isinstance(active, bool) else 0
            message = f'training Job "{job_name}" is running ({active} active pod{"s" * (active != 1)})'
            if progress:
                message += f", {_progress_text(progress)}"
    else:
        problem = base_model_problem(ftj.spec.base_model_ref.name, observed.base_model, "training Job starts")
        phase = "Pending"
        if problem is not None:
            reason, message = problem.reason, problem.message
        else:
            reason, message = Reason.JOB_CREATING, "creating the training Job"

    ready = Cond("True" if phase == "Succeeded" else "False", reason, message)
    progressing = Cond(
        "True" if reason in (Reason.JOB_CREATING, Reason.JOB_SUSPENDED, Reason.JOB_RUNNING) else "False",
        reason,
        message,
    )
    degraded = Cond("True", reason, message) if phase == "Failed" else Cond("False", Reason.AS_EXPECTED, "")
    if phase == "Succeeded" and artifact is None:
        degraded = _rejected(old, observed.artifact_problem) or degraded
    # A Job that exists was rendered: a render error matters only before it does.
    render_error = observed.render_error if job is None else None
    if observed.conflict is not None:
        render_error = RenderError(Reason.CHILD_CONFLICT, observed.conflict)
    conditions = ready_triplet(
        old.conditions,
        ftj.generation,
        now,
        ready=ready,
        progressing=progressing,
        degraded=degraded,
        render_error=render_error,
    )
    return FineTuneJobStatus(
        phase=phase,
        job_name=job_name,
        start_time=start_time,
        completion_time=completion_time if phase in TERMINAL else None,
        progress=progress,
        artifact=artifact if phase == "Succeeded" else None,
        metrics=metrics,
        observed_generation=ftj.generation,
        conditions=_lora_servable(conditions, observed.base_model, ftj.generation, now),
    )


def _lora_servable(
    conditions: list[Condition], base_model: BaseModelObject | None, generation: int | None, now: datetime
) -> list[Condition]:
    """LoRAServable=False while vLLM cannot serve LoRA adapters on the base model's family: a warning, training
    goes ahead (the adapter may be for another server); absent otherwise. A missing BaseModel changes nothing."""
    if base_model is None:
        return conditions
    refusal = lora_refusal(base_model.spec.family)
    if refusal is None:
        return [c for c in conditions if c.type != ConditionType.LORA_SERVABLE]
    message = f"training goes ahead, but an AdapterDeployment will refuse the adapter: {refusal}"
    cond = Cond("False", Reason.LORA_NOT_SUPPORTED, message)
    return merge_conditions(conditions, {ConditionType.LORA_SERVABLE: cond}, generation, now)
