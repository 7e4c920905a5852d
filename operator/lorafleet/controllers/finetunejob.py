"""FineTuneJob controller: renders the training Job from the spec and turns the Job's outcome into status."""

from __future__ import annotations

import json
from datetime import datetime

from lorafleet import API_VERSION, k8s
from lorafleet.api.finetunejob import FineTuneJobStatus
from lorafleet.api.objects import BaseModelObject, FineTuneJobObject, parse
from lorafleet.config import OperatorSettings
from lorafleet.contracts.evaluation import parse_result
from lorafleet.contracts.trainer import (
    PROGRESS_KEY,
    ReportArtifact,
    ReportProgress,
    TrainerReport,
    parse_progress,
)
from lorafleet.controllers import artifacts, credentials
from lorafleet.controllers.base import (
    SETTINGS,
    Obj,
    Reconciler,
    enqueue,
    get_typed,
    log,
    now,
    object_event,
    post_event,
    register_reconciler,
    sync_children,
    write_status,
)
from lorafleet.controllers.caches import CACHES
from lorafleet.controllers.store_refs import bind_basemodel, bind_finetunejob, resolve_ref
from lorafleet.resources import adapter_guard as guard
from lorafleet.resources import finetunejob as builders
from lorafleet.resources.children import conflict_message
from lorafleet.resources.conditions import Reason
from lorafleet.resources.status import FineTuneJobObserved, finetunejob_status, status_dict
from lorafleet.resources.status.finetunejob import TERMINAL, deletion_blocked, gated, job_completed
from lorafleet.resources.stores import RenderError

KIND = "FineTuneJob"


def _json_object(text: str | None) -> Obj | None:
    try:
        value = json.loads(text or "")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def trainer_report(pods: list[Obj], progress_config_map: Obj | None = None) -> TrainerReport | None:
    """What the trainer last said: its newest JSON termination message (final report), else the live progress
    it posts into its progress ConfigMap (contracts.trainer.PROGRESS_KEY). Parsed here, where it enters the
    operator: untrusted (spec.image may run anything), so capped and lenient (parse_progress)."""
    finals: list[tuple[str, Obj]] = []
    for pod in pods:
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            if container.get("name") != builders.TRAINER_CONTAINER:
                continue
            terminated = (container.get("state") or {}).get("terminated") or {}
            report = _json_object(terminated.get("message"))
            if report is not None:
                finals.append((str(terminated.get("finishedAt") or ""), report))
    if finals:
        return TrainerReport.model_validate(max(finals, key=lambda r: r[0])[1])
    live = parse_progress(((progress_config_map or {}).get("data") or {}).get(PROGRESS_KEY))
    if live is not None:
        return TrainerReport(progress=ReportProgress.model_validate(live.model_dump(exclude={"version"})))
    return None


def verified_report(
    ftj: FineTuneJobObject, report: TrainerReport | None, look_in_store: bool = False
) -> tuple[TrainerReport | None, guard.Problem | None]:
    """The trainer's report with its artifact replaced by what the store's manifest says, or dropped: until the
    manifest can be read (the status then says the artifact is not recorded yet), and for good when the report
    names another version folder than the spec's, or the manifest's lineage another FineTuneJob (the report is
    untrusted input: adapter_guard). A verified report's evaluation is the manifest's (none if it has none): that
    is what the quality bars are judged on. `look_in_store`: when the report names no artifact (or there is no
    report), read the spec's version folder anyway; a job whose outcome waits on quality bars must not wait for
    a report that never comes. The second value says why an artifact was refused."""
    if ftj.status is not None and ftj.status.artifact is not None:
        return report, None
    claimed = report.artifact if report is not None else None
    if claimed is None and not look_in_store:
        return report, None
    dropped = (report or TrainerReport()).model_copy(update={"artifact": None})
    try:
        expected = builders.output_target(ftj, SETTINGS).adapter_uri
    except RenderError as exc:
        return dropped, (guard.ARTIFACT_REJECTED, f"no version folder to record: {exc.message}")
    problem = guard.uri_problem(claimed.uri, expected) if claimed is not None else None
    if problem is None:
        # A job judged on its manifest reads the folder unpinned: the store's manifest (its lineage naming this
        # job) is the truth, whatever digest the report claims.
        digest = claimed.digest if claimed is not None and not look_in_store else None
        check = artifacts.MANIFESTS.get(ftj.spec.output.store, ftj.namespace, expected, digest)
        if check.problem is not None:
            log.warning("adapter %s of %s not verified: %s", expected, ftj.name, check.problem[1])
            if claimed is None and check.problem[0] == Reason.MANIFEST_NOT_FOUND:
                # The Job completed (the only time the store is looked in) and published nothing there.
                return dropped, (Reason.MANIFEST_NOT_FOUND, f"the training Job completed, but {check.problem[1]}")
            return dropped, None
        if check.digest is None or check.size_bytes is None:
            return dropped, None
        problem = guard.lineage_problem(expected, ftj.metadata.uid, check.job_uid)
        if problem is None:
            verified = ReportArtifact(uri=expected, digest=check.digest, size_bytes=check.size_bytes)
            evaluation = parse_result(check.evaluation)
            return dropped.model_copy(update={"artifact": verified, "evaluation": evaluation}), None
    log.warning("adapter reported for %s/%s refused: %s", ftj.namespace, ftj.name, problem[1])
    return dropped, problem


def plan(
    ftj: FineTuneJobObject, base: BaseModelObject | None, settings: OperatorSettings
) -> tuple[list[Obj] | None, RenderError | None]:
    """The desired children (pure), or None to leave the children as they are: while the BaseModel is missing or
    not Ready, while the spec cannot be rendered, and once the job has finished (it is never restarted, and its
    Job keeps the trainer's pods for the record)."""
    if ftj.status is not None and ftj.status.phase in TERMINAL:
        return None, None
    if base is None or base.status is None or base.status.phase != "Ready":
        return None, None  # the status says what we wait for
    try:
        return builders.desired_children(ftj, base, settings), None
    except RenderError as exc:
        return None, exc


def reconcile(ftj: FineTuneJobObject) -> FineTuneJobStatus:
    namespace = ftj.namespace
    names = builders.names_of(ftj)
    ftj, refused = bind_finetunejob(ftj)  # storeRef -> the store and location it stands for
    base = get_typed(BaseModelObject, ftj.spec.base_model_ref.name, namespace)
    base = bind_basemodel(base)[0] if base is not None else None
    desired, error = plan(ftj, base, SETTINGS) if refused is None else (None, refused)
    if SETTINGS.store_sts or ftj.spec.output.store_ref is not None:  # bound storeRef: a store that mints
        desired, error = _workload_credentials(ftj, base, desired, error)
    children = sync_children(ftj, desired, builders.CHILD_KINDS, builders.CREATE_ONLY)
    job = children.get("batch/v1", "Job", names.job)
    pods = CACHES.select("v1", "Pod", namespace, {"job-name": names.job}) if job else []
    progress = children.get("v1", "ConfigMap", names.progress)
    look_in_store = gated(ftj) and job_completed(job)
    report, artifact_problem = verified_report(ftj, trainer_report(pods, progress), look_in_store)
    observed = FineTuneJobObserved(
        base_model=base,
        job=job,
        report=report,
        render_error=error,
        artifact_problem=artifact_problem,
        pricing=SETTINGS.pricing,
        conflict=conflict_message(children.conflicts, KIND) if children.conflicts else None,
    )
    return finetunejob_status(ftj, observed, now())


def _workload_credentials(
    ftj: FineTuneJobObject, base: BaseModelObject | None, desired: list[Obj] | None, error: RenderError | None
) -> tuple[list[Obj] | None, RenderError | None]:
    """Minted store credentials (settings.store_sts) exist before the Job that reads them, are renewed in time
    (the FineTuneJob is queued again for then), and go once the job has finished."""
    name = builders.names_of(ftj).credentials
    if ftj.status is not None and ftj.status.phase in TERMINAL:
        credentials.remove(ftj, name)
        return desired, error
    if desired is None or base is None:
        return desired, error
    grant = builders.workload_grant(ftj, base.spec, SETTINGS)  # desired_children checked it already
    if grant is None:
        return desired, error
    try:
        ref = ftj.spec.output.store_ref
        source = credentials.cluster_store_source(resolve_ref(ref, ftj.namespace, "spec.output")) if ref else None
        renew_in = credentials.ensure(ftj, name, builders.COMPONENT, grant, source)
    except RenderError as exc:
        return None, exc
    enqueue(KIND, ftj.namespace, ftj.name, renew_in)
    return desired, error


def deletes_its_adapter(body: Obj) -> bool:
    """Only FineTuneJobs with deletionPolicy: Delete carry lorafleet's finalizer: the others can be deleted with
    or without a running operator (a finalizer nobody removes blocks namespace deletion and uninstall)."""
    return bool(((body.get("spec") or {}).get("output") or {}).get("deletionPolicy") == "Delete")


# How soon a waiting deletion looks again without a watch event (an AdapterDeployment's change queues it at once).
DELETION_RETRY_SECONDS = 30.0


def _adapter_deployments(namespace: str) -> list[Obj]:
    """Every AdapterDeployment the caches hold (all watched namespaces: a reference by URI may come from any),
    else this namespace's, listed."""
    cached = CACHES.all(API_VERSION, "AdapterDeployment")
    return cached if cached is not None else k8s.list_(API_VERSION, "AdapterDeployment", namespace)


def delete_adapter(body: Obj) -> float | None:
    """Before the FineTuneJob goes, remove the adapter version it wrote: only the version folder its spec names,
    and only when that manifest's lineage names this FineTuneJob's UID (read again now). Returns None to release
    the object, or seconds after which to look again (the finalizer stays): while AdapterDeployments reference
    the adapter or the store fails, with the condition DeletionBlocked saying why, up to
    SETTINGS.finalizer_timeout_seconds after the deletion was asked for. Then, or at once when the store's Secret
    is gone (a namespace being deleted loses its Secrets first) or the store is not allowed, it gives up with a
    Warning Event."""
    ftj, refused = bind_finetunejob(parse(FineTuneJobObject, body))
    if refused is not None:
        _warn(body, "DeletionAbandoned", f"no store to delete the adapter from: {refused.message}")
        return None
    when = now()
    deadline = guard.deletion_deadline(ftj.metadata.deletion_timestamp, when, SETTINGS.finalizer_timeout_seconds)
    try:
        uri = builders.output_target(ftj, SETTINGS).adapter_uri
    except RenderError:
        return None  # no store to write to: the trainer never published anything
    recorded = ftj.status.artifact.uri if ftj.status is not None and ftj.status.artifact is not None else None
    users = guard.referencing_deployments(
        ftj.namespace, ftj.name, [uri, *([recorded] if recorded else [])], _adapter_deployments(ftj.namespace)
    )
    if users:
        return _wait_or_give_up(body, ftj, guard.in_use_problem(uri, users, deadline), deadline, when)
    try:
        deletion = artifacts.delete_if_owned(ftj.spec.output.store, ftj.namespace, uri, ftj.metadata.uid)
    except artifacts.SecretMissing as exc:
        _warn(
            body,
            "DeletionAbandoned",
            f'Secret "{exc}" of spec.output.store is gone (is the namespace being deleted?): {uri} cannot be '
            "deleted and stays in the store; delete it by hand",
        )
        return None
    except artifacts.StoreNotAllowed as exc:
        _warn(body, "DeletionAbandoned", f"{exc}: {uri} was not deleted and stays in the store")
        return None  # the operator sends no credentials there: waiting would not change that
    except artifacts.StoreError as exc:
        return _wait_or_give_up(body, ftj, guard.store_problem(uri, str(exc), deadline), deadline, when)
    if recorded is not None and not guard.same_uri(recorded, uri):  # recorded before this check existed
        _warn(body, "AdapterNotDeleted", f"status.artifact names {recorded}, not this job's {uri}: left in place")
    foreign = guard.lineage_problem(uri, ftj.metadata.uid, deletion.owner_uid) if deletion.found else None
    if foreign is not None:
        _warn(body, "AdapterNotDeleted", f"{foreign[1]}: left in place")
    elif deletion.found:
        post_event(object_event(body, "Normal", "AdapterDeleted", f"deleted {uri} ({deletion.removed} objects)", when))
    return None


def _warn(body: Obj, reason: str, message: str) -> None:
    log.warning("%s/%s: %s", body["metadata"].get("namespace"), body["metadata"].get("name"), message)
    post_event(object_event(body, "Warning", reason, message, now()))


def _wait_or_give_up(
    body: Obj, ftj: FineTuneJobObject, problem: guard.Problem, deadline: datetime, when: datetime
) -> float | None:
    if guard.gives_up(when, deadline):
        _warn(body, "DeletionAbandoned", f"gave up after {SETTINGS.finalizer_timeout_seconds:g} s: {problem[1]}")
        return None
    write_status(body, status_dict(deletion_blocked(ftj, problem, when)))
    return min(DELETION_RETRY_SECONDS, max((deadline - when).total_seconds(), 1.0))


RECONCILER = Reconciler(
    KIND, "finetunejobs", FineTuneJobObject, reconcile, needs_cleanup=deletes_its_adapter, cleanup=delete_adapter
)
register_reconciler(RECONCILER)
