"""Plumbing shared by the three controllers: settings, the clock, children, status writing and transition events.

Each controller's reconcile is: observe (the object's inputs and its children, listed by lorafleet's owner label)
-> plan (pure: the desired children, or None to leave them as they are) -> execute (apply only the children whose
content hash differs, delete owned children no longer desired) -> status (pure) -> write it only when it changed,
with the resourceVersion it was computed from. The body is parsed into its typed model once, here, where a
handler (or the resync loop) hands it over; the controllers work on typed objects from there on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from kubernetes.client.exceptions import ApiException
from pydantic import BaseModel, ValidationError

from lorafleet import API_VERSION, FINALIZER, k8s
from lorafleet.api.objects import CustomResource, parse
from lorafleet.config import OperatorSettings
from lorafleet.contracts.base import MAX_MESSAGE
from lorafleet.controllers.caches import CACHES
from lorafleet.controllers.events import EventSink
from lorafleet.controllers.observability import observe
from lorafleet.controllers.workqueue import WorkQueue
from lorafleet.resources.children import (
    ChildKind,
    ChildPlan,
    Conflict,
    controlled_by,
    controller_of,
    diff,
    key,
    owner_labels,
    owner_selector,
    unobserved,
)
from lorafleet.resources.conditions import notable_transitions
from lorafleet.resources.status import status_dict, status_patch
from lorafleet.resources.status.invalid import invalid_spec_status
from lorafleet.storage.scrub import scrub, scrub_tree

Obj = dict[str, Any]
log = logging.getLogger("lorafleet.controllers")

# Read once at import; runtime.run() loads the client config before importing the handler modules.
SETTINGS = OperatorSettings()
EVENT_INSTANCE = os.environ.get("POD_NAME") or os.uname().nodename
MANAGED_CHILDREN = {"app.kubernetes.io/managed-by": "lorafleet"}


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


_unlistable: set[ChildKind] = set()  # kinds the operator's RBAC may not list: applied whole, never pruned


@dataclass
class Children:
    """An owner's children after a pass: as listed (unchanged ones) or as returned by their apply."""

    current: dict[tuple[str, str], Obj]
    listed: set[str]  # kinds that were listed: a child of another kind is read with a GET when asked for
    namespace: str
    conflicts: list[Conflict] = field(default_factory=list)  # names held by others: nothing was applied

    def get(self, api_version: str, kind: str, name: str) -> Obj | None:
        if kind in self.listed or (kind, name) in self.current:
            return self.current.get((kind, name))
        return CACHES.get(api_version, kind, name, self.namespace)


def observe_children(owner: CustomResource, kinds: tuple[ChildKind, ...]) -> dict[str, list[Obj]]:
    """Each child kind of the owner, selected by lorafleet's owner labels: from the watch-fed cache of the kind,
    or (no cache serves it) with one LIST per kind."""
    selector = owner_selector(owner.kind, owner.name)
    labels = owner_labels(owner.kind, owner.name)
    observed: dict[str, list[Obj]] = {}
    for api_version, kind in kinds:
        if CACHES.serves(api_version, kind):
            observed[kind] = CACHES.select(api_version, kind, owner.namespace, labels)
            continue
        if (api_version, kind) in _unlistable:
            continue
        try:
            observed[kind] = k8s.list_(api_version, kind, owner.namespace, selector)
        except ApiException as exc:
            if exc.status != 403:
                raise
            _unlistable.add((api_version, kind))
            log.warning("the operator may not list %s %s: applied every pass and never pruned", api_version, kind)
    return observed


def execute_children(plan: ChildPlan, owner_uid: str | None) -> tuple[dict[tuple[str, str], Obj], list[Conflict]]:
    """Delete what is no longer desired (first, as kubeai does), then apply what differs; returns the children and
    the names found held by others while creating (then the children this pass created are deleted again and
    nothing else is applied: a Job must never mount someone else's ConfigMap)."""
    for child in plan.delete:
        _delete_child(child)
    current = {key(c): c for c in plan.unchanged}
    created: list[Obj] = []
    for child in plan.apply:
        k = key(child)
        if k not in plan.new:
            applied = k8s.apply(child, field_manager=SETTINGS.field_manager)
        else:
            # No object of this name was seen: create it without reading first. An object the caches cannot see
            # (no lorafleet label) makes the create fail with 409 and is never changed.
            try:
                applied = k8s.apply(child, field_manager=SETTINGS.field_manager, create_only=True)
                created.append(applied)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                meta = child["metadata"]
                holder = k8s.get(child["apiVersion"], child["kind"], meta["name"], meta.get("namespace"))
                if holder is None:
                    raise  # deleted since: the retry creates it
                if not controlled_by(holder, owner_uid):
                    HELD.add(str(meta.get("namespace") or ""), k[0], k[1])
                    for undo in created:
                        _delete_child(undo)
                        current.pop(key(undo), None)
                    return current, [Conflict(k[0], k[1], controller_of(holder))]
                applied = k8s.apply(child, field_manager=SETTINGS.field_manager)  # ours, not yet in the cache
        CACHES.record(applied)
        current[k] = applied
    return current, []


def _delete_child(child: Obj) -> None:
    meta = child["metadata"]
    try:
        k8s.delete(child["apiVersion"], child["kind"], meta["name"], meta.get("namespace"))
        CACHES.forget(child)
        log.info("pruned %s %s/%s", child["kind"], meta.get("namespace"), meta["name"])
    except ApiException as exc:
        if exc.status != 403:
            raise
        log.warning("the operator may not delete %s %s: left in place", child["kind"], meta["name"])


class HeldNames:
    """Child names found held by an object lorafleet does not control (the caches cannot see it: no managed-by
    label). Such a name is read live on later passes, so a conflicted owner changes nothing instead of creating and
    undoing its other children every pass; forgotten once the name is free. Bounded: the oldest go first."""

    LIMIT = 10_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: dict[tuple[str, str, str], None] = {}

    def add(self, namespace: str, kind: str, name: str) -> None:
        with self._lock:
            self._names[(namespace, kind, name)] = None
            while len(self._names) > self.LIMIT:
                del self._names[next(iter(self._names))]

    def discard(self, namespace: str, kind: str, name: str) -> None:
        with self._lock:
            self._names.pop((namespace, kind, name), None)

    def __contains__(self, key: tuple[str, str, str]) -> bool:
        with self._lock:
            return key in self._names


HELD = HeldNames()


def cached_by_name(api_version: str, kind: str, name: str, namespace: str) -> Obj | None:
    """The object holding a name as far as the caches know (they hold only objects with lorafleet's managed-by
    label; creating a child finds any other, see execute_children); kinds no cache serves, and names found held
    by others before (HELD), are read live."""
    if CACHES.serves(api_version, kind) and (namespace, kind, name) not in HELD:
        return CACHES.get(api_version, kind, name, namespace)
    found = k8s.get(api_version, kind, name, namespace)
    if found is None:
        HELD.discard(namespace, kind, name)
    return found


def sync_children(
    owner: CustomResource,
    desired: list[Obj] | None,
    kinds: tuple[ChildKind, ...],
    create_only: frozenset[str] = frozenset(),
) -> Children:
    """Observe the owner's children, apply only the differences, prune what it no longer wants; a desired name
    held by an object the owner does not control changes nothing (Children.conflicts says which)."""
    observed = observe_children(owner, kinds)
    if desired is None:  # leave them as they are
        current = {key(c): c for items in observed.values() for c in items}
        return Children(current, set(observed), owner.namespace)
    # Only children not found among the owner's are looked up by name: on creation, or when one was deleted.
    existing = {(k, n): cached_by_name(v, k, n, owner.namespace) for v, k, n in unobserved(desired, observed)}
    plan = diff(desired, observed, owner.metadata.uid, create_only, existing)
    current, conflicts = execute_children(plan, owner.metadata.uid)
    conflicts = plan.conflicts or conflicts
    if conflicts:
        log.warning("%s %s/%s: %s", owner.kind, owner.namespace, owner.name, "; ".join(c.describe() for c in conflicts))
    return Children(current, set(observed), owner.namespace, conflicts)


def get_custom(kind: str, name: str, namespace: str) -> Obj | None:
    """One of our objects from the cache; an object the cache has not seen yet (kopf's watch told us first) is
    read from the API server."""
    body = CACHES.get(API_VERSION, kind, name, namespace)
    if body is None and CACHES.serves(API_VERSION, kind):
        body = k8s.get(API_VERSION, kind, name, namespace)
    return body


_O = TypeVar("_O", bound=CustomResource)


def get_typed(model: type[_O], name: str, namespace: str) -> _O | None:
    """Another custom resource (a dependency), read from the cache and parsed into its model; None when it does
    not exist (when it appears, triggers.dependents queues the objects that wait for it)."""
    body = CACHES.get(API_VERSION, model.KIND, name, namespace)
    return None if body is None else parse(model, body)


def transition_event(body: Obj, type_: str, status: str, reason: str, message: str, when: datetime) -> Obj:
    """A core/v1 Event about a condition transition of `body` (pure)."""
    healthy = (type_ == "Degraded") == (status == "False")
    return object_event(body, "Normal" if healthy else "Warning", reason, f"{type_}={status}: {message}", when)


def object_event(body: Obj, event_type: str, reason: str, message: str, when: datetime) -> Obj:
    """A core/v1 Event about `body` (pure). Posted by us rather than kopf.event(), which works only inside
    kopf's own tasks and so not from the work queue's threads."""
    meta = body["metadata"]
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
        "type": event_type,
        "reason": reason,
        "message": scrub(message)[:MAX_MESSAGE],
        "source": {"component": "lorafleet-operator"},
        "reportingComponent": "lorafleet-operator",
        "reportingInstance": EVENT_INSTANCE,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


def post_transition_events(body: Obj, old_status: Obj | None, new_status: Obj) -> None:
    """One Kubernetes Event per notable condition transition; a failing Event never fails the reconcile."""
    for type_, status, reason, message in notable_transitions(
        (old_status or {}).get("conditions"), new_status.get("conditions") or []
    ):
        post_event(transition_event(body, type_, status, reason, message, now()))


def post_event(event: Obj) -> None:
    """Queue the Event for EVENTS' thread (best effort: the status carries the truth)."""
    EVENTS.submit(event)


EVENT_RETRIES = (1.0, 2.0, 4.0)  # seconds between tries while the API server is unreachable or overloaded


def post_event_now(event: Obj) -> None:
    """Apply one Event (EVENTS' thread), trying again while the API server is away (a restart) or overloaded;
    a failure is logged, never raised. The apply is idempotent (the Event's name is fixed), so a retry of one
    that was stored does not post it twice."""
    name = event["involvedObject"]["name"]
    for delay in (*EVENT_RETRIES, None):
        try:
            k8s.apply(event, SETTINGS.field_manager)
            return
        except ApiException as exc:
            if exc.status == 403 and "being terminated" in str(exc.body):
                return  # its namespace is going away, and the Event with it
            if delay is None or not (exc.status == 429 or (exc.status or 0) >= 500):
                log.warning("could not post event %s for %s: %s", event["reason"], name, exc)
                return
        except Exception:
            if delay is None:
                log.warning("could not post event %s for %s", event["reason"], name, exc_info=True)
                return
        time.sleep(delay)


EVENTS = EventSink(post_event_now, SETTINGS.event_rate, SETTINGS.event_burst, SETTINGS.event_queue)


def write_status(body: Obj, status: Obj) -> bool:
    """Write the status only when it differs from the one read, as a merge patch carrying the resourceVersion
    it was computed from: a concurrent writer makes it fail with 409 (a retry from a fresh read) instead of
    regressing a condition. Events are posted only after the write succeeded, so each transition once."""
    status = scrub_tree(status)  # no credential reaches a status (issue 15: careful deputy)
    old = body.get("status")
    if (old or {}) == status:
        return False
    # Merge patches keep keys they do not mention: null out what the new status dropped.
    change = status_patch(old, status)
    meta = body["metadata"]
    written = k8s.patch_status(
        body.get("apiVersion", API_VERSION),
        body["kind"],
        meta["name"],
        meta["namespace"],
        change,
        resource_version=meta.get("resourceVersion"),
    )
    CACHES.record(written)
    post_transition_events(body, old, status)
    return True


@dataclass(frozen=True)
class Reconciler(Generic[_O]):
    """One kind's reconcile: its typed model and the pass from the typed object to its Status model."""

    kind: str
    plural: str
    model: type[_O]
    reconcile: Callable[[_O], BaseModel]
    # Seconds until the object should be looked at again although no watched object changed (a state only the
    # pods know: adapters loading, training progress); None when its next change comes as a watch event.
    poll_after: Callable[[BaseModel], float | None] = lambda _status: None
    # Work outside the cluster before the object goes (a FineTuneJob's stored adapter with deletionPolicy:
    # Delete): which objects need it (only they carry lorafleet's finalizer) and the work itself, which returns
    # None when done (the finalizer goes) or seconds after which to try again (it waits, bounded by the kind).
    needs_cleanup: Callable[[Obj], bool] = lambda _body: False
    cleanup: Callable[[Obj], float | None] | None = None


def reconcile_and_write(reconciler: Reconciler[Any], body: Mapping[str, Any]) -> bool:
    """Parse the body into its typed model (the only place it is parsed), reconcile it and write its status
    when it changed; True when it was written. An object still converging is queued again after its poll delay."""
    raw = dict(body)
    with observe(reconciler.kind), k8s.temporary_on_conflict():
        try:
            typed = parse(reconciler.model, raw)
        except ValidationError as exc:  # a spec the CRD let through: a condition names the fields, nothing renders
            return write_status(raw, invalid_spec_status(raw, exc, now()))
        status = reconciler.reconcile(typed)
        written = write_status(raw, status_dict(status))
    delay = reconciler.poll_after(status)
    if delay is not None:
        meta = raw["metadata"]
        enqueue(reconciler.kind, meta["namespace"], meta["name"], delay)
    return written


Key = tuple[str, str, str]  # (kind, namespace, name)
_RECONCILERS: dict[str, Reconciler[Any]] = {}


def reconcile_key(key: Key) -> None:
    """The work queue's only job: read the object and reconcile it. Errors go back to the queue (per-key
    exponential backoff); a 409 on the status write (someone wrote since the read) retries from a fresh read."""
    kind, namespace, name = key
    reconciler = _RECONCILERS[kind]
    body = get_custom(kind, name, namespace)
    if body is None:
        return  # gone: the garbage collector takes the children
    try:
        body = sync_finalizer(reconciler, body)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return  # going: cleaned up (if it needed it); the garbage collector takes the children
        reconcile_and_write(reconciler, body)
    except ApiException as exc:
        if exc.status != 404:  # deleted meanwhile (with its namespace, say): nothing left to reconcile
            raise


def sync_finalizer(reconciler: Reconciler[Any], body: Obj) -> Obj | None:
    """Keep lorafleet's finalizer on exactly the objects that need cleanup; on deletion, clean up, then release
    the object. Returns the object as it is now, or None once it was released. Each change of the finalizer list
    is a merge patch with the resourceVersion read, so another controller's finalizer is never dropped."""
    meta = body["metadata"]
    finalizers = list(meta.get("finalizers") or [])
    has = FINALIZER in finalizers
    deleting = bool(meta.get("deletionTimestamp"))
    want = not deleting and reconciler.needs_cleanup(body)
    if has == want:
        return body
    if deleting and reconciler.cleanup is not None:
        # An error retries with backoff; a wait looks again after its delay; the finalizer stays meanwhile.
        wait = reconciler.cleanup(body)
        if wait is not None:
            enqueue(reconciler.kind, meta["namespace"], meta["name"], wait)
            return body
    changed = [f for f in finalizers if f != FINALIZER] if has else [*finalizers, FINALIZER]
    written = k8s.patch_finalizers(
        body.get("apiVersion", API_VERSION), body["kind"], meta["name"], meta["namespace"], changed,
        str(meta.get("resourceVersion") or ""),
    )  # fmt: skip
    if deleting:
        return None
    CACHES.record(written)
    return written


QUEUE: WorkQueue[Key] = WorkQueue(reconcile_key, workers=SETTINGS.workers)


def enqueue(kind: str, namespace: str, name: str, delay: float = 0.0) -> None:
    """Ask for a reconcile of one object; duplicates coalesce and one object is never reconciled twice at once."""
    QUEUE.add((kind, namespace, name), delay)


def register_reconciler(reconciler: Reconciler[Any]) -> None:
    """Make a kind reconcilable by the queue. What queues its objects: the caches' changes (controllers.triggers)
    and the resync, which also runs once the caches have listed at start-up. kopf has no handler on the objects,
    so it never writes to them (no annotations of its own, no finalizer)."""
    _RECONCILERS[reconciler.kind] = reconciler
