"""Status of a FineTuneJob from its BaseModel, its batch/v1 Job and the trainer's report."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from lorafleet.api.common import Condition
from lorafleet.api.evaluation import Evaluation, EvaluationStatus
from lorafleet.api.finetunejob import ArtifactStatus, FineTuneJobPhase, FineTuneJobStatus, TrainingProgress
from lorafleet.api.objects import BaseModelObject, FineTuneJobObject
from lorafleet.config import Pricing
from lorafleet.contracts.base import clip, is_reason
from lorafleet.contracts.evaluation import EvaluationResult, metric_results, missed_bars, score_line
from lorafleet.contracts.trainer import TrainerReport
from lorafleet.resources.adapter_guard import DELETION_BLOCKED
from lorafleet.resources.conditions import ConditionType, Reason, rfc3339
from lorafleet.resources.status.common import Cond, Obj, base_model_problem, dig, merge_conditions, ready_triplet
from lorafleet.resources.stores import RenderError
from lorafleet.resources.usage import usage_status
from lorafleet.serving.families import lora_refusal
from lorafleet.storage.manifest import check_relative_path

TERMINAL = ("Succeeded", "Failed")


@dataclass(frozen=True)
class FineTuneJobObserved:
    """What the controller found for a FineTuneJob."""

    base_model: BaseModelObject | None  # None: not found
    job: Obj | None = None  # the training Job (batch/v1) as read back; None: not created (yet)
    report: TrainerReport | None = None  # the trainer's final report or live progress, artifact verified
    render_error: RenderError | None = None  # why the children could not be rendered; matters while no Job exists
    conflict: str | None = None  # children's names held by objects it does not control: nothing was applied
    # Why the reported artifact was refused (adapter_guard): (reason, message); Degraded says it once Succeeded,
    # and a job with quality bars (spec.evaluation.require) ends Failed with it: there is nothing to judge.
    artifact_problem: tuple[str, str] | None = None
    pricing: Pricing | None = None  # the operator's prices, for status.usage.estimatedCost


def job_completed(job: Obj | None) -> bool:
    """Whether the training Job succeeded (Complete, or SuccessCriteriaMet while its last pods terminate)."""
    return job is not None and _job_condition(job, "Complete", "SuccessCriteriaMet") is not None


def gated(ftj: FineTuneJobObject) -> bool:
    """Whether the job's outcome waits on quality bars (spec.evaluation.require)."""
    return ftj.spec.evaluation is not None and bool(ftj.spec.evaluation.require)


def evaluation_status(
    spec: Evaluation | None, result: EvaluationResult | None, artifact_uri: str | None
) -> EvaluationStatus | None:
    """status.evaluation: the metrics in the spec's order, the score column, and the operator's own judgement
    of the bars (missed_bars; a pass flag from the pod is never read). None without a result."""
    if result is None:
        return None
    rows = metric_results(result, spec.metrics if spec is not None else ())
    missed = missed_bars(result, spec.require if spec is not None else ())
    return EvaluationStatus(
        metrics=rows,
        score=score_line(rows),
        passed=not missed,
        message=clip("; ".join(missed)) if missed else None,
        predictions_uri=_predictions_uri(artifact_uri, result.predictions_file),
    )


def _predictions_uri(artifact_uri: str | None, path: str | None) -> str | None:
    """The predictions file inside the recorded version folder; a path that would leave it is not shown."""
    if artifact_uri is None or not path or len(path) > 256:
        return None
    try:
        check_relative_path(path)
    except ValueError:
        return None
    return f"{artifact_uri.rstrip('/')}/{path}"


def _quality_outcome(
    ftj: FineTuneJobObject, observed: FineTuneJobObserved, artifact: ArtifactStatus | None, job_name: str | None
) -> tuple[FineTuneJobPhase, str, str]:
    """The outcome of a completed Job whose spec requires quality bars, judged on the evaluation in the adapter's
    verified manifest (observed.report's, once its artifact is verified): Succeeded, Failed BelowQualityBar or
    NotEvaluated (the adapter is kept and recorded), Failed with the artifact problem, or Running while the
    manifest is read."""
    spec = ftj.spec.evaluation
    assert spec is not None
    if artifact is None:
        if observed.artifact_problem is not None:
            reason, message = observed.artifact_problem
            return "Failed", reason, f"{message}; the quality bars (spec.evaluation.require) cannot be judged"
        return (
            "Running",
            Reason.VERIFYING_ADAPTER,
            f'training Job "{job_name}" succeeded; reading the adapter\'s manifest to judge spec.evaluation.require',
        )
    result = observed.report.evaluation if observed.report is not None else None
    if result is None:
        return (
            "Failed",
            Reason.NOT_EVALUATED,
            f"the adapter's manifest at {artifact.uri} holds no evaluation, so spec.evaluation.require cannot be "
            "judged (a trainer image without evaluation? see spec.image); the adapter is kept",
        )
    missed = missed_bars(result, spec.require)
    if missed:
        return (
            "Failed",
            Reason.BELOW_QUALITY_BAR,
            clip(f"the adapter misses spec.evaluation.require: {'; '.join(missed)}; it is kept at {artifact.uri}"),
        )
    message = f'training Job "{job_name}" succeeded and the adapter reached every quality bar; stored at {artifact.uri}'
    return "Succeeded", Reason.SUCCEEDED, message


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

    evaluation = old.evaluation
    usage = old.usage

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
            if gated(ftj):
                phase, reason, message = _quality_outcome(ftj, observed, artifact, job_name)
        elif failed is not None:
            artifact = None  # a failed Job's report names no adapter the operator records
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

    if phase in TERMINAL:
        # Judged once, on the pass that ends the job or records its artifact (the report's evaluation is then the
        # verified manifest's: controllers.finetunejob.verified_report); without an artifact, the report's own,
        # except where bars decide the outcome.
        ends_now = old.phase not in TERMINAL or (artifact is not None and old.artifact is None)
        if ends_now or (artifact is None and evaluation is None):
            evaluation = _evaluation(ftj, report, artifact)
        tokens = report.tokens_trained if report is not None else None
        if usage is None or (usage.tokens_trained is None and tokens is not None):  # a report read late
            usage = usage_status(ftj.spec.resources, start_time, completion_time, tokens, observed.pricing)

    ready = Cond("True" if phase == "Succeeded" else "False", reason, message)
    progressing = Cond(
        "True"
        if reason in (Reason.JOB_CREATING, Reason.JOB_SUSPENDED, Reason.JOB_RUNNING, Reason.VERIFYING_ADAPTER)
        else "False",
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
        # Failed with a recorded artifact: a quality bar missed (the adapter is kept, for a person to look at).
        artifact=artifact if phase in TERMINAL else None,
        metrics=metrics,
        evaluation=evaluation if phase in TERMINAL else None,
        usage=usage if phase in TERMINAL else None,
        observed_generation=ftj.generation,
        conditions=_lora_servable(conditions, observed.base_model, ftj.generation, now),
    )


def _evaluation(
    ftj: FineTuneJobObject, report: TrainerReport | None, artifact: ArtifactStatus | None
) -> EvaluationStatus | None:
    if report is None or (artifact is None and gated(ftj)):
        return None
    return evaluation_status(ftj.spec.evaluation, report.evaluation, artifact.uri if artifact is not None else None)


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
