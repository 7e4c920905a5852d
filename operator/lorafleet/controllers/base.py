"""Plumbing shared by the three controllers: settings, the clock, status writing and transition events.

Each controller's reconcile is: read inputs -> render desired children (pure) -> apply -> read children ->
compute status (pure) -> write it once. Handlers only pick where the status goes.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from lorafleet import API_VERSION, GROUP, VERSION, k8s
from lorafleet.config import OperatorSettings
from lorafleet.controllers.observability import observe
from lorafleet.resources.conditions import set_condition, transitions
from lorafleet.resources.status import status_patch
from lorafleet.resources.stores import RenderError

Obj = dict[str, Any]
log = logging.getLogger("lorafleet.controllers")

# Read once at import; runtime.run() loads the client config before importing the handler modules.
SETTINGS = OperatorSettings()
EVENT_INSTANCE = os.environ.get("POD_NAME") or os.uname().nodename
MANAGED_CHILDREN = {"app.kubernetes.io/managed-by": "lorafleet"}


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def apply_all(children: list[Obj]) -> None:
    for child in children:
        k8s.apply(child, field_manager=SETTINGS.field_manager)


def get_custom(kind: str, name: str, namespace: str) -> Obj | None:
    return k8s.get(API_VERSION, kind, name, namespace)


def with_render_error(status: Obj, error: RenderError | None, generation: int | None, when: datetime) -> Obj:
    """Overlay a render error (the inputs exist but cannot be turned into children yet) on a status."""
    if error is None:
        return status
    conditions = status.get("conditions") or []
    for type_, value in (("Ready", "False"), ("Progressing", "False"), ("Degraded", "True")):
        conditions = set_condition(
            conditions,
            type=type_,
            status=value,  # type: ignore[arg-type]
            reason=error.reason,
            message=error.message,
            generation=generation,
            now=when,
        )
    return {**status, "conditions": conditions}


def transition_event(body: Obj, type_: str, status: str, reason: str, message: str, when: datetime) -> Obj:
    """A core/v1 Event about `body` (pure). Posted by us rather than kopf.event(), which works only inside
    kopf's own tasks and so not from the resync thread."""
    meta = body["metadata"]
    healthy = (type_ == "Degraded") == (status == "False")
    stamp = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": body.get("apiVersion", API_VERSION),
            "kind": body["kind"],
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
        },
        "type": "Normal" if healthy else "Warning",
        "reason": reason,
        "message": f"{type_}={status}: {message}"[:1024],
        "source": {"component": "lorafleet-operator"},
        "reportingComponent": "lorafleet-operator",
        "reportingInstance": EVENT_INSTANCE,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


def post_transition_events(body: Obj, old_status: Obj | None, new_status: Obj) -> None:
    """One Kubernetes Event per condition transition; a failing Event never fails the reconcile."""
    for type_, status, reason, message in transitions(
        (old_status or {}).get("conditions"), new_status.get("conditions") or []
    ):
        try:
            k8s.apply(transition_event(body, type_, status, reason, message, now()), SETTINGS.field_manager)
        except ApiException as exc:
            if exc.status == 403 and "being terminated" in str(exc.body):
                continue  # its namespace is going away, and the Event with it
            log.warning("could not post event %s for %s: %s", reason, body["metadata"]["name"], exc)
        except Exception:  # events are best effort; the status carries the truth
            log.warning("could not post event %s for %s", reason, body["metadata"]["name"], exc_info=True)


def write_status(body: Obj, status: Obj, patch: kopf.Patch | None) -> None:
    """Through the handler's patch for the object being handled (kopf 916), else the status subresource."""
    post_transition_events(body, body.get("status"), status)
    # Merge patches keep keys they do not mention: null out what the new status dropped.
    change = status_patch(body.get("status"), status)
    if patch is not None:
        patch.status.update(change)
        return
    meta = body["metadata"]
    k8s.patch_status(body.get("apiVersion", API_VERSION), body["kind"], meta["name"], meta["namespace"], change)


Reconciler = Callable[[Obj], Obj]


def reconcile_and_write(reconcile: Reconciler, body: Obj, patch: kopf.Patch | None) -> None:
    with observe(body["kind"]), k8s.temporary_on_conflict():
        status = reconcile(body)
        write_status(body, status, patch)


def reconcile_by_name(reconcile: Reconciler, kind: str, name: str, namespace: str) -> None:
    """Reconcile another object (a dependent or an owner) from a handler of something it depends on."""
    body = get_custom(kind, name, namespace)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return
    try:
        reconcile_and_write(reconcile, body, None)
    except kopf.TemporaryError as exc:
        # The object's own handlers and the resync loop retry; the triggering handler has nothing to retry.
        log.warning("reconciling %s %s/%s failed, will resync: %s", kind, namespace, name, exc)
    except ApiException as exc:
        if exc.status != 404:  # deleted meanwhile (with its namespace, say): nothing left to reconcile
            raise


def register_reconciler(plural: str, reconcile: Reconciler) -> None:
    """Reconcile a kind when it is created or changed and when the operator starts (resume)."""

    @kopf.on.resume(GROUP, VERSION, plural, id="reconcile-resume")
    @kopf.on.create(GROUP, VERSION, plural, id="reconcile-create")
    @kopf.on.update(GROUP, VERSION, plural, id="reconcile-update")
    def handle(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        reconcile_and_write(reconcile, dict(body), patch)


def reconcile_owner(reconcile: Reconciler, kind: str, child: kopf.Body) -> None:
    """A child changed (finished, failed, deleted): reconcile its controller at once, restoring it if need be."""
    owner = controller_owner(dict(child), kind)
    if owner:
        reconcile_by_name(reconcile, kind, owner, child["metadata"]["namespace"])


def controller_owner(child: Obj, kind: str) -> str | None:
    for ref in (child.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == kind and ref.get("apiVersion") == API_VERSION:
            return str(ref["name"])
    return None
