"""Status of an AdapterDeployment from its BaseModel, FineTuneJobs, Deployment, Service and the replicas' own
account of their adapters (lorafleet.serving.status.aggregate)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from lorafleet.api.adapterdeployment import AdapterDeploymentPhase, AdapterDeploymentStatus, AdapterStatus
from lorafleet.api.common import ObjectStore
from lorafleet.api.objects import AdapterDeploymentObject, BaseModelObject, FineTuneJobObject
from lorafleet.contracts.base import clip, is_reason
from lorafleet.contracts.serving import ADAPTER_STATES, FAILED, LOADED, LOADING, PENDING
from lorafleet.resources.conditions import ConditionType, Reason
from lorafleet.resources.status.common import Cond, Obj, base_model_problem, condition_message, dig, ready_triplet
from lorafleet.resources.stores import RenderError
from lorafleet.serving.status import AdapterSummary


@dataclass(frozen=True)
class ResolvedAdapter:
    """An adapter that can be served now: the Deployment builder renders these."""

    name: str
    uri: str
    digest: str | None
    store: ObjectStore | None


@dataclass(frozen=True)
class AdapterDeploymentObserved:
    """What the controller found for an AdapterDeployment."""

    base_model: BaseModelObject | None  # None: not found
    # FineTuneJob name -> the object, None (or absent) when it does not exist.
    fine_tune_jobs: Mapping[str, FineTuneJobObject | None] = field(default_factory=dict)
    deployment: Obj | None = None  # the Deployment (apps/v1) as read back
    service_host: str | None = None  # the Service's in-cluster host, once the Service exists
    # Adapter name -> the replicas' evidence; None: no replica was asked. Without it an adapter is at best Loading.
    adapter_reports: Mapping[str, AdapterSummary] | None = None
    render_error: RenderError | None = None  # why the children could not be rendered
    conflict: str | None = None  # children's names held by objects it does not control: nothing was applied


def resolve_adapters(
    ad: AdapterDeploymentObject, fine_tune_jobs: Mapping[str, FineTuneJobObject | None]
) -> tuple[list[ResolvedAdapter], list[AdapterStatus]]:
    """Split spec.adapters into those servable now and status entries (Pending/Failed) for the rest."""
    resolved: list[ResolvedAdapter] = []
    waiting: list[AdapterStatus] = []
    for spec in ad.spec.adapters:
        name = spec.name
        if spec.artifact is not None:
            resolved.append(ResolvedAdapter(name, spec.artifact.uri, spec.artifact.digest, spec.artifact.store))
            continue
        ref = spec.fine_tune_job_ref.name if spec.fine_tune_job_ref is not None else ""
        ftj = fine_tune_jobs.get(ref)
        phase = ftj.status.phase if ftj is not None and ftj.status is not None else "Pending"
        stored = ftj.status.artifact if ftj is not None and ftj.status is not None else None
        if ftj is None:
            state, reason, message = (
                PENDING,
                Reason.FINE_TUNE_JOB_NOT_FOUND,
                f'FineTuneJob "{ref}" not found; the adapter is served once it exists and has succeeded',
            )
        elif phase == "Failed":
            detail = condition_message(ftj.status.conditions, ConditionType.READY) if ftj.status else None
            state, reason = FAILED, Reason.FINE_TUNE_JOB_FAILED
            message = f'FineTuneJob "{ref}" failed' + (f": {detail}" if detail else "")
        elif phase != "Succeeded":
            state, reason, message = (
                PENDING,
                Reason.FINE_TUNE_JOB_NOT_SUCCEEDED,
                f'waiting for FineTuneJob "{ref}" (phase {phase})',
            )
        elif stored is None or not stored.uri:
            state, reason, message = (
                PENDING,
                Reason.ARTIFACT_NOT_RECORDED,
                f'FineTuneJob "{ref}" succeeded but has not recorded its artifact yet',
            )
        else:
            # Read it back from the store the FineTuneJob wrote to.
            resolved.append(ResolvedAdapter(name, stored.uri, stored.digest, ftj.spec.output.store))
            continue
        waiting.append(AdapterStatus(name=name, state=state, reason=reason, message=clip(message), loaded_replicas=0))
    return resolved, waiting


def _served_adapter_status(
    adapter: ResolvedAdapter, report: AdapterSummary | None, ready_replicas: int
) -> AdapterStatus:
    # The summary is lorafleet.serving.status.aggregate's; anything else in it is not evidence.
    if report is not None and report.get("state") in ADAPTER_STATES:
        loaded, reason, message = report.get("loadedReplicas"), report.get("reason"), report.get("message")
        return AdapterStatus(
            name=adapter.name,
            uri=adapter.uri,
            digest=adapter.digest,
            state=report["state"],
            loaded_replicas=loaded if isinstance(loaded, int) and not isinstance(loaded, bool) else 0,
            reason=reason if is_reason(reason) else None,
            message=clip(message) if isinstance(message, str) and message else None,
        )
    if ready_replicas > 0:
        # No evidence from the pods yet: never claim Loaded.
        state, reason, message = (
            LOADING,
            Reason.ADAPTER_LOADING,
            "waiting for the replicas to report the adapter loaded",
        )
    else:
        state, reason, message = PENDING, Reason.NO_READY_REPLICAS, "waiting for a ready replica to load the adapter"
    return AdapterStatus(
        name=adapter.name,
        uri=adapter.uri,
        digest=adapter.digest,
        state=state,
        loaded_replicas=0,
        reason=reason,
        message=message,
    )


def _deployment_problem(deployment: Obj | None) -> Cond | None:
    """A Deployment that will not get better by waiting: rollout stuck, pods not creatable, or lost."""
    conds = {c.get("type"): c for c in dig(deployment, "status", "conditions") or []}
    progressing, available = conds.get("Progressing"), conds.get("Available")
    failure = conds.get("ReplicaFailure")
    if progressing and progressing.get("status") == "False":
        return Cond(
            "True",
            progressing.get("reason") or Reason.PROGRESS_DEADLINE_EXCEEDED,
            clip(progressing.get("message") or "the rollout made no progress"),
        )
    if failure and failure.get("status") == "True":
        return Cond(
            "True",
            failure.get("reason") or "ReplicaFailure",
            clip(failure.get("message") or "replicas could not be created"),
        )
    # Available=False is normal while a rollout is under way; it is a fault only once the rollout is
    # complete (replicas lost afterwards).
    rollout_done = progressing is not None and progressing.get("reason") == "NewReplicaSetAvailable"
    if available and available.get("status") == "False" and rollout_done:
        return Cond(
            "True",
            available.get("reason") or Reason.MINIMUM_REPLICAS_UNAVAILABLE,
            clip(available.get("message") or "fewer replicas available than required"),
        )
    return None


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def adapterdeployment_status(
    ad: AdapterDeploymentObject, observed: AdapterDeploymentObserved, now: datetime
) -> AdapterDeploymentStatus:
    """Phase, replicas, endpoint, per-adapter state and the Ready/Progressing/Degraded conditions."""
    spec = ad.spec
    deployment = observed.deployment
    desired_replicas = spec.replicas
    replicas = _count(dig(deployment, "status", "replicas"))
    ready_replicas = _count(dig(deployment, "status", "readyReplicas"))

    resolved, waiting = resolve_adapters(ad, observed.fine_tune_jobs)
    by_name = {e.name: e for e in waiting}
    reports = observed.adapter_reports or {}
    for adapter in resolved:
        by_name[adapter.name] = _served_adapter_status(adapter, reports.get(adapter.name), ready_replicas)
    adapters = [by_name[a.name] for a in spec.adapters if a.name in by_name]
    failed = [a.name for a in adapters if a.state == FAILED]
    not_loaded = [a.name for a in adapters if a.state != LOADED]
    loaded = len(adapters) - len(not_loaded)

    # Degraded is reported on its own merits, whatever the phase says.
    faults = [c for c in [_deployment_problem(deployment)] if c is not None]
    if failed:
        faults.append(Cond("True", Reason.ADAPTER_FAILED, "adapters failed: " + ", ".join(failed)))
    degraded = (
        Cond("True", faults[0].reason, "; ".join(f.message for f in faults))
        if faults
        else Cond("False", Reason.AS_EXPECTED, "")
    )
    deployment_fault = faults[0] if faults and faults[0].reason != Reason.ADAPTER_FAILED else None

    phase: AdapterDeploymentPhase
    replica_text = f"{ready_replicas}/{desired_replicas} replicas ready"
    base_problem = base_model_problem(spec.base_model_ref.name, observed.base_model, "replicas are rolled out")
    if base_problem is not None:
        phase, reason, message, moving = "Pending", base_problem.reason, base_problem.message, False
    elif observed.conflict is not None:
        phase, reason, message, moving = "Degraded", Reason.CHILD_CONFLICT, observed.conflict, False
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

    ready = Cond("True" if phase == "Ready" else "False", reason, message)
    progressing = Cond(
        "True" if moving else "False",
        reason if phase != "Ready" else Reason.AS_EXPECTED,
        message if phase != "Ready" else "",
    )
    old = ad.status or AdapterDeploymentStatus()
    host = observed.service_host
    return AdapterDeploymentStatus(
        phase=phase,
        replicas=replicas,
        ready_replicas=ready_replicas,
        endpoint=f"http://{host}:{spec.service.port}/v1" if host else None,
        adapters_ready=f"{loaded}/{len(adapters)}",
        adapters=adapters,
        observed_generation=ad.generation,
        conditions=ready_triplet(
            old.conditions,
            ad.generation,
            now,
            ready=ready,
            progressing=progressing,
            degraded=degraded,
            render_error=(
                RenderError(Reason.CHILD_CONFLICT, observed.conflict)
                if observed.conflict is not None
                else observed.render_error
            ),
        ),
    )
