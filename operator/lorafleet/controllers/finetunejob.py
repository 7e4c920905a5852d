"""FineTuneJob controller: renders the training Job from the spec and turns the Job's outcome into status."""

from __future__ import annotations

import json
from typing import Any

import kopf

from lorafleet import GROUP, VERSION, k8s
from lorafleet.api.finetunejob import FineTuneJobSpec
from lorafleet.config import OperatorSettings
from lorafleet.controllers import artifacts
from lorafleet.controllers.base import (
    MANAGED_CHILDREN,
    SETTINGS,
    Obj,
    apply_all,
    get_custom,
    log,
    now,
    reconcile_owner,
    register_reconciler,
    with_render_error,
)
from lorafleet.resources import finetunejob as builders
from lorafleet.resources.status import finetunejob_status
from lorafleet.resources.stores import RenderError

KIND = "FineTuneJob"
TERMINAL = ("Succeeded", "Failed")


PROGRESS_ANNOTATION = "lorafleet.io/progress"


def _json_object(text: str | None) -> Obj | None:
    try:
        value = json.loads(text or "")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def trainer_report(pods: list[Obj]) -> Obj | None:
    """What the trainer last said: its newest JSON termination message (final status), else the live progress
    it posts on its running pod (annotation lorafleet.io/progress)."""
    finals: list[tuple[str, Obj]] = []
    live: list[tuple[str, Obj]] = []
    for pod in pods:
        progress = _json_object(((pod.get("metadata") or {}).get("annotations") or {}).get(PROGRESS_ANNOTATION))
        if progress is not None:
            live.append((str((pod.get("metadata") or {}).get("creationTimestamp") or ""), {"progress": progress}))
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            if container.get("name") != builders.TRAINER_CONTAINER:
                continue
            terminated = (container.get("state") or {}).get("terminated") or {}
            report = _json_object(terminated.get("message"))
            if report is not None:
                finals.append((str(terminated.get("finishedAt") or ""), report))
    for reports in (finals, live):
        if reports:
            return max(reports, key=lambda r: r[0])[1]
    return None


def verified_report(body: Obj, report: Obj | None) -> Obj | None:
    """The trainer's report with its artifact replaced by what the store's manifest says, or dropped until the
    manifest can be read (the status then says the artifact is not recorded yet)."""
    claimed = (report or {}).get("artifact")
    if not report or not claimed or (body.get("status") or {}).get("artifact"):
        return report
    spec = FineTuneJobSpec.model_validate(body["spec"])
    check = artifacts.check_version(spec.output.store, body["metadata"]["namespace"], claimed["uri"], claimed["digest"])
    if check.problem is not None:
        log.warning("adapter %s of %s not verified: %s", claimed.get("uri"), body["metadata"]["name"], check.problem[1])
        return {k: v for k, v in report.items() if k != "artifact"}
    return {**report, "artifact": {"uri": claimed["uri"], "digest": check.digest, "sizeBytes": check.size_bytes}}


def plan(body: Obj, base: Obj | None, settings: OperatorSettings) -> tuple[list[Obj], RenderError | None]:
    """Children to apply now (pure). Rendered whole or not at all: nothing while the BaseModel is missing or
    not Ready, and nothing once the job has finished, so a finished job is never restarted."""
    if (body.get("status") or {}).get("phase") in TERMINAL:
        return [], None
    if not base or (base.get("status") or {}).get("phase") != "Ready":
        return [], None  # the status says what we wait for
    try:
        return builders.desired_children(body, base, settings), None
    except RenderError as exc:
        return [], exc


def reconcile(body: Obj) -> Obj:
    meta = body["metadata"]
    namespace = meta["namespace"]
    names = builders.names(meta["name"])
    base = get_custom("BaseModel", body["spec"]["baseModelRef"]["name"], namespace)
    children, error = plan(body, base, SETTINGS)
    apply_all(children)
    job = k8s.get("batch/v1", "Job", names.job, namespace)
    pods = k8s.list_("v1", "Pod", namespace, f"job-name={names.job}") if job else []
    report = verified_report(body, trainer_report(pods))
    status = finetunejob_status(body, base_model=base, job=job, now=now(), trainer_report=report)
    return with_render_error(status, error if job is None else None, meta.get("generation"), now())


@kopf.index(GROUP, VERSION, "finetunejobs")
def finetunejobs_by_base_model(body: kopf.Body, **_: Any) -> dict[Any, str]:
    return {(body.metadata.namespace, body.spec["baseModelRef"]["name"]): body.metadata.name}


register_reconciler("finetunejobs", reconcile)


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED_CHILDREN, id="owner")
def job_changed(body: kopf.Body, **_: Any) -> None:
    """A Job finishing, failing or being deleted is reflected (and a deleted Job restored) at once."""
    reconcile_owner(reconcile, KIND, body)


def _deletes_its_adapter(spec: kopf.Spec, **_: Any) -> bool:
    return bool((spec.get("output") or {}).get("deletionPolicy") == "Delete")


# Only FineTuneJobs with deletionPolicy: Delete get this handler, and so kopf's finalizer: the others can be
# deleted with or without a running operator.
@kopf.on.delete(GROUP, VERSION, "finetunejobs", id="delete-adapter", when=_deletes_its_adapter)
def delete_adapter(body: kopf.Body, **_: Any) -> None:
    artifact = (body.get("status") or {}).get("artifact")
    if not artifact:
        return  # nothing was stored
    spec = FineTuneJobSpec.model_validate(dict(body.spec))
    with k8s.temporary_on_conflict():
        try:
            removed = artifacts.delete_version(spec.output.store, body.metadata.namespace or "", artifact["uri"])
        except artifacts.StoreError as exc:
            raise kopf.TemporaryError(f"could not delete {artifact['uri']}: {exc}", delay=30) from exc
    kopf.info(body, reason="AdapterDeleted", message=f"deleted {artifact['uri']} ({removed} objects)")
