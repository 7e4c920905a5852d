"""Status of an AdapterDeployment from its BaseModel, FineTuneJobs, Deployment, Service and the replicas' own
account of their adapters (lorafleet.serving.status.aggregate)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from lorafleet.api.adapterdeployment import (
    AdapterDeploymentPhase,
    AdapterDeploymentStatus,
    AdapterSpec,
    AdapterStatus,
    AdapterVersionStatus,
    ArtifactRef,
)
from lorafleet.api.common import LocalObjectReference, ObjectStore
from lorafleet.api.evaluation import QualityBar
from lorafleet.api.objects import AdapterDeploymentObject, BaseModelObject, FineTuneJobObject
from lorafleet.contracts.base import clip, is_reason
from lorafleet.contracts.evaluation import missed_bars, parse_result
from lorafleet.contracts.serving import (
    ADAPTER_STATES,
    FAILED,
    LOADED,
    LOADING,
    PENDING,
    AdapterReason,
    AdapterState,
    version_key,
)
from lorafleet.resources.conditions import ConditionType, Reason
from lorafleet.resources.status.common import (
    ArtifactCheck,
    Cond,
    Obj,
    base_model_problem,
    condition_message,
    dig,
    ready_triplet,
)
from lorafleet.resources.stores import RenderError
from lorafleet.serving.status import AdapterSummary


@dataclass(frozen=True)
class ResolvedAdapter:
    """An adapter version that can be served now: the Deployment builder renders these."""

    name: str  # its name in the desired set: the served name, or version_key(served, version) in a canary
    uri: str
    digest: str | None
    store: ObjectStore | None
    served_name: str | None = None  # a canary's version: the name clients send
    version: str | None = None
    weight: int | None = None


@dataclass(frozen=True)
class VersionSource:
    """One version an adapter entry asks for (the entry itself when it has no versions)."""

    key: str  # its name in the desired set
    served_name: str
    version: str | None  # None: the entry has no versions
    weight: int | None
    fine_tune_job_ref: LocalObjectReference | None
    artifact: ArtifactRef | None
    bars: tuple[QualityBar, ...]  # the entry's requireEvaluation


@dataclass(frozen=True)
class VersionState:
    """Where one version stands (the entry's, for an adapter without versions)."""

    state: AdapterState
    reason: str | None
    message: str | None
    uri: str | None = None
    digest: str | None = None
    loaded_replicas: int = 0


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
    # Version key -> its manifest as the store holds it, for the versions whose adapter requires an evaluation.
    manifests: Mapping[str, ArtifactCheck] = field(default_factory=dict)


def version_sources(adapter: AdapterSpec) -> list[VersionSource]:
    bars = tuple(adapter.require_evaluation)
    if adapter.versions is None:
        return [
            VersionSource(adapter.name, adapter.name, None, None, adapter.fine_tune_job_ref, adapter.artifact, bars)
        ]
    return [
        VersionSource(
            version_key(adapter.name, v.name), adapter.name, v.name, v.weight, v.fine_tune_job_ref, v.artifact, bars
        )
        for v in adapter.versions
    ]


def all_versions(ad: AdapterDeploymentObject) -> list[VersionSource]:
    return [source for adapter in ad.spec.adapters for source in version_sources(adapter)]


def _resolved(source: VersionSource, uri: str, digest: str | None, store: ObjectStore | None) -> ResolvedAdapter:
    canary = source.version is not None
    return ResolvedAdapter(
        source.key,
        uri,
        digest,
        store,
        served_name=source.served_name if canary else None,
        version=source.version,
        weight=source.weight,
    )


def _locate(
    source: VersionSource, fine_tune_jobs: Mapping[str, FineTuneJobObject | None]
) -> ResolvedAdapter | VersionState:
    """Where a version's adapter is stored, or why it cannot be served yet."""
    if source.artifact is not None:
        return _resolved(source, source.artifact.uri, source.artifact.digest, source.artifact.store)
    ref = source.fine_tune_job_ref.name if source.fine_tune_job_ref is not None else ""
    ftj = fine_tune_jobs.get(ref)
    phase = ftj.status.phase if ftj is not None and ftj.status is not None else "Pending"
    stored = ftj.status.artifact if ftj is not None and ftj.status is not None else None
    if ftj is None:
        return VersionState(
            PENDING,
            Reason.FINE_TUNE_JOB_NOT_FOUND,
            f'FineTuneJob "{ref}" not found; the adapter is served once it exists and has succeeded',
        )
    if phase == "Failed":
        detail = condition_message(ftj.status.conditions, ConditionType.READY) if ftj.status else None
        return VersionState(
            FAILED, Reason.FINE_TUNE_JOB_FAILED, clip(f'FineTuneJob "{ref}" failed' + (f": {detail}" if detail else ""))
        )
    if phase != "Succeeded":
        message = f'waiting for FineTuneJob "{ref}" (phase {phase})'
        return VersionState(PENDING, Reason.FINE_TUNE_JOB_NOT_SUCCEEDED, message)
    if stored is None or not stored.uri:
        return VersionState(
            PENDING,
            Reason.ARTIFACT_NOT_RECORDED,
            f'FineTuneJob "{ref}" succeeded but has not recorded its artifact yet',
        )
    # Read it back from the store the FineTuneJob wrote to.
    return _resolved(source, stored.uri, stored.digest, ftj.spec.output.store)


def evaluation_targets(
    ad: AdapterDeploymentObject, fine_tune_jobs: Mapping[str, FineTuneJobObject | None]
) -> list[ResolvedAdapter]:
    """The versions whose manifests the controller reads for the promotion gate: stored, and their adapter
    requires an evaluation."""
    targets = []
    for source in all_versions(ad):
        located = _locate(source, fine_tune_jobs) if source.bars else None
        if isinstance(located, ResolvedAdapter):
            targets.append(located)
    return targets


def _gate(
    source: VersionSource, located: ResolvedAdapter, check: ArtifactCheck | None
) -> ResolvedAdapter | VersionState:
    """The promotion gate (spec requireEvaluation): the version is served only when the evaluation in its manifest
    reaches every bar, and then pinned to the digest of that manifest; otherwise it stays Pending, not loaded."""
    if not source.bars:
        return located
    uri, digest = located.uri, located.digest

    def pending(reason: str, message: str) -> VersionState:
        return VersionState(PENDING, reason, clip(message), uri, digest)

    if check is None:
        return pending(Reason.NOT_EVALUATED, "its manifest has not been read yet")
    if check.problem is not None:
        reason, detail = check.problem
        message = f"requireEvaluation: the manifest holding the evaluation could not be read: {detail}"
        return pending(reason, message)
    result = parse_result(check.evaluation)
    if result is None:
        message = (
            f"requireEvaluation is set, but the manifest of {located.uri} holds no evaluation: serve an adapter "
            "from a FineTuneJob with spec.evaluation, or remove requireEvaluation"
        )
        return pending(Reason.NOT_EVALUATED, message)
    missed = missed_bars(result, source.bars)
    if missed:
        message = "below the quality bar (requireEvaluation): " + "; ".join(missed)
        return pending(Reason.BELOW_QUALITY_BAR, message)
    return replace(located, digest=check.digest or located.digest)  # exactly the manifest that passed


def resolve_adapters(
    ad: AdapterDeploymentObject,
    fine_tune_jobs: Mapping[str, FineTuneJobObject | None],
    manifests: Mapping[str, ArtifactCheck] | None = None,
) -> tuple[list[ResolvedAdapter], dict[str, VersionState]]:
    """Split the versions of spec.adapters into those servable now and the states (Pending/Failed) of the rest,
    by version key. `manifests` (version key -> its manifest) feed the promotion gate; a version that requires
    an evaluation and has no manifest there is not served."""
    resolved: list[ResolvedAdapter] = []
    waiting: dict[str, VersionState] = {}
    for source in all_versions(ad):
        located = _locate(source, fine_tune_jobs)
        if isinstance(located, ResolvedAdapter):
            located = _gate(source, located, (manifests or {}).get(source.key))
        if isinstance(located, ResolvedAdapter):
            resolved.append(located)
        else:
            waiting[source.key] = located
    return resolved, waiting


def _served_state(adapter: ResolvedAdapter, report: AdapterSummary | None, ready_replicas: int) -> VersionState:
    # The summary is lorafleet.serving.status.aggregate's; anything else in it is not evidence.
    if report is not None and report.get("state") in ADAPTER_STATES:
        loaded, reason, message = report.get("loadedReplicas"), report.get("reason"), report.get("message")
        return VersionState(
            uri=adapter.uri,
            digest=adapter.digest,
            state=report["state"],
            loaded_replicas=loaded if isinstance(loaded, int) and not isinstance(loaded, bool) else 0,
            reason=reason if is_reason(reason) else None,
            message=clip(message) if isinstance(message, str) and message else None,
        )
    if ready_replicas > 0:
        # No evidence from the pods yet: never claim Loaded.
        return VersionState(
            LOADING,
            Reason.ADAPTER_LOADING,
            "waiting for the replicas to report the adapter loaded",
            adapter.uri,
            adapter.digest,
        )
    return VersionState(
        PENDING,
        Reason.NO_READY_REPLICAS,
        "waiting for a ready replica to load the adapter",
        adapter.uri,
        adapter.digest,
    )


# A version's state, worst first: the adapter takes its first version's in this order.
_WORST_FIRST: tuple[AdapterState, ...] = (FAILED, PENDING, LOADING, LOADED)


def _adapter_status(adapter: AdapterSpec, states: Mapping[str, VersionState]) -> AdapterStatus | None:
    sources = version_sources(adapter)
    if adapter.versions is None:
        one = states.get(sources[0].key)
        if one is None:
            return None
        return AdapterStatus(
            name=adapter.name,
            state=one.state,
            reason=one.reason,
            message=one.message,
            uri=one.uri,
            digest=one.digest,
            loaded_replicas=one.loaded_replicas,
        )
    versions = [
        AdapterVersionStatus(
            name=s.version or "",
            weight=s.weight or 0,
            state=v.state,
            reason=v.reason,
            message=v.message,
            uri=v.uri,
            digest=v.digest,
            loaded_replicas=v.loaded_replicas,
        )
        for s in sources
        if (v := states.get(s.key)) is not None
    ]
    if not versions:
        return None
    worst = min(versions, key=lambda v: _WORST_FIRST.index(v.state))
    split = ", ".join(f"{v.name} {v.weight}%" for v in versions)
    reason: str | None
    if worst.state == LOADED:
        reason, message = AdapterReason.LOADED, f"versions loaded: {split}"
    else:
        reason, message = worst.reason, clip(f"version {worst.name}: {worst.message or worst.state} ({split})")
    return AdapterStatus(
        name=adapter.name,
        state=worst.state,
        reason=reason,
        message=message,
        loaded_replicas=min(v.loaded_replicas for v in versions),
        versions=versions,
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


GATE_REASONS = frozenset({Reason.NOT_EVALUATED, Reason.BELOW_QUALITY_BAR})


def _gated_message(gated: list[AdapterStatus]) -> str:
    return clip(
        "not served until they pass their requireEvaluation bars: " + "; ".join(f"{a.name}: {a.message}" for a in gated)
    )


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

    resolved, states = resolve_adapters(ad, observed.fine_tune_jobs, observed.manifests)
    reports = observed.adapter_reports or {}
    for adapter in resolved:
        states[adapter.name] = _served_state(adapter, reports.get(adapter.name), ready_replicas)
    adapters = [a for a in (_adapter_status(spec_adapter, states) for spec_adapter in spec.adapters) if a is not None]
    failed = [a.name for a in adapters if a.state == FAILED]
    # Left out of the desired set by the promotion gate: waiting for a person, not for the system.
    gated = [a for a in adapters if a.state == PENDING and a.reason in GATE_REASONS]
    not_loaded = [a.name for a in adapters if a.state != LOADED]
    loaded = len(adapters) - len(not_loaded)

    # Degraded is reported on its own merits, whatever the phase says.
    deployment_fault = _deployment_problem(deployment)
    faults = [c for c in [deployment_fault] if c is not None]
    if failed:
        faults.append(Cond("True", Reason.ADAPTER_FAILED, "adapters failed: " + ", ".join(failed)))
    gate = None
    if gated:
        gate = Cond("True", gated[0].reason or Reason.NOT_EVALUATED, _gated_message(gated))
        faults.append(gate)
    degraded = (
        Cond("True", faults[0].reason, "; ".join(f.message for f in faults))
        if faults
        else Cond("False", Reason.AS_EXPECTED, "")
    )

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
    elif gate is not None:
        phase, reason, message, moving = "Degraded", gate.reason, gate.message, False
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
