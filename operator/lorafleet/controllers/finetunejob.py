"""FineTuneJob controller: renders the training Job from the spec and turns the Job's outcome into status."""

from __future__ import annotations

import json
from typing import Any

import kopf

from lorafleet import GROUP, VERSION, k8s
from lorafleet.config import OperatorSettings
from lorafleet.controllers.base import (
    MANAGED_CHILDREN,
    SETTINGS,
    Obj,
    apply_all,
    controller_owner,
    get_custom,
    now,
    reconcile_and_write,
    reconcile_by_name,
    with_render_error,
)
from lorafleet.resources import finetunejob as builders
from lorafleet.resources.status import finetunejob_status
from lorafleet.resources.stores import RenderError

KIND = "FineTuneJob"
TERMINAL = ("Succeeded", "Failed")


def trainer_report(pods: list[Obj]) -> Obj | None:
    """The newest JSON termination message the trainer container left (see lorafleet.trainer's status file)."""
    reports: list[tuple[str, Obj]] = []
    for pod in pods:
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            if container.get("name") != builders.TRAINER_CONTAINER:
                continue
            terminated = (container.get("state") or {}).get("terminated") or {}
            try:
                report = json.loads(terminated.get("message") or "")
            except ValueError:
                continue
            if isinstance(report, dict):
                reports.append((str(terminated.get("finishedAt") or ""), report))
    return max(reports, key=lambda r: r[0])[1] if reports else None


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
    status = finetunejob_status(body, base_model=base, job=job, now=now(), trainer_report=trainer_report(pods))
    return with_render_error(status, error if job is None else None, meta.get("generation"), now())


@kopf.index(GROUP, VERSION, "finetunejobs")
def finetunejobs_by_base_model(body: kopf.Body, **_: Any) -> dict[Any, str]:
    return {(body.metadata.namespace, body.spec["baseModelRef"]["name"]): body.metadata.name}


@kopf.on.resume(GROUP, VERSION, "finetunejobs", id="reconcile-resume")
@kopf.on.create(GROUP, VERSION, "finetunejobs", id="reconcile-create")
@kopf.on.update(GROUP, VERSION, "finetunejobs", id="reconcile-update")
@kopf.timer(GROUP, VERSION, "finetunejobs", id="resync", interval=SETTINGS.resync_seconds)
def handle(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    reconcile_and_write(reconcile, dict(body), patch)


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED_CHILDREN, id="owner")
def job_changed(body: kopf.Body, **_: Any) -> None:
    """A Job finishing, failing or being deleted is reflected (and a deleted Job restored) at once."""
    owner = controller_owner(dict(body), KIND)
    if owner:
        reconcile_by_name(reconcile, KIND, owner, body["metadata"]["namespace"])
