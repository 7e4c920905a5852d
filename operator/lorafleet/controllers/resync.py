"""Periodic resync, a safety net: every `resync_period` (minutes by default) each object is queued again, except
FineTuneJobs whose final status is written (Failed, or Succeeded with the artifact recorded: nothing about them can
change by waiting). The queue coalesces these
keys with the ones the watches add, and a pass over an object that did not change writes nothing (children are
applied only when their content hash differs, status only when it differs).

kopf's per-object timers would do this too, but kopf puts a finalizer on every object that has a timer, and
finalizers without a running operator block namespace deletion and uninstall (kopf pitfall 3). One loop
that lists each kind per interval costs a few list calls and leaves no finalizer behind.

The startup handler also starts the watch-fed caches (controllers.caches: the controllers observe from them,
and their changes queue reconciles through controllers.triggers) and, once every cache has listed, the work
queue's workers. kopf itself watches only the three custom resources.
"""

from __future__ import annotations

import contextvars
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf

from lorafleet import API_VERSION, k8s
from lorafleet.controllers import adapterdeployment, basemodel, finetunejob, liveness, triggers
from lorafleet.controllers.base import QUEUE, SETTINGS, Obj, Reconciler, enqueue, log
from lorafleet.controllers.caches import CACHES, SYNC_TIMEOUT, watched
from lorafleet.resources.status.finetunejob import TERMINAL

RECONCILERS: tuple[Reconciler[Any], ...] = (basemodel.RECONCILER, finetunejob.RECONCILER, adapterdeployment.RECONCILER)
TRAINER_POD_LABEL = "lorafleet.io/finetunejob"  # on every training pod: the FineTuneJob it trains for

_stop = threading.Event()


# A Succeeded FineTuneJob may still record its artifact on a later pass (the trainer's report or the store's
# manifest was not readable when the Job completed): it is resynced until the artifact is recorded, or for this
# long after completion (a job whose trainer reported no artifact never gets one).
ARTIFACT_GRACE = timedelta(hours=1)


def finished(obj: Obj, now: datetime) -> bool:
    """A FineTuneJob whose final status is written for its current generation: the resync skips it."""
    if obj.get("kind") != finetunejob.KIND:
        return False
    status = obj.get("status") or {}
    if status.get("phase") not in TERMINAL or status.get("observedGeneration") != obj["metadata"].get("generation"):
        return False
    if status.get("phase") == "Failed" or status.get("artifact"):
        return True
    try:
        completed = datetime.fromisoformat(str(status.get("completionTime")).replace("Z", "+00:00"))
    except ValueError:
        return False
    return now - completed > ARTIFACT_GRACE


def resync_once(namespaces: list[str] | None = None) -> int:
    """Queue every object that may still change; returns how many were queued. Failures are logged, never raised."""
    queued = 0
    now = datetime.now(UTC)
    for reconciler in RECONCILERS:
        kind = reconciler.kind
        # Namespace patterns (kopf's globs such as team-*) are matched here against a cluster-wide list.
        globbing = any(set(n) & set("*?[!") for n in namespaces or [])
        scopes: list[str | None] = list(namespaces) if namespaces and not globbing else [None]  # None: all
        for namespace in scopes:
            try:
                cached = CACHES.all(API_VERSION, kind, namespace)
                objects = cached if cached is not None else k8s.list_(API_VERSION, kind, namespace)
            except Exception as exc:
                log.warning("resync: listing %s failed: %s", kind, exc)
                continue
            for obj in objects:
                meta = obj["metadata"]
                if globbing and not watched(meta.get("namespace", ""), namespaces or []):
                    continue
                if meta.get("deletionTimestamp") or finished(obj, now):
                    continue
                enqueue(kind, meta["namespace"], meta["name"])
                queued += 1
    return queued


def _loop(interval: float, namespaces: list[str]) -> None:
    while not _stop.wait(interval):
        resync_once(namespaces)


@kopf.on.startup(id="resync")
def start(settings: kopf.OperatorSettings, **_: Any) -> None:
    _stop.clear()
    CACHES.start(SETTINGS.namespaces, triggers.on_change)
    if not CACHES.wait_synced():
        log.warning("some caches did not list within %.0f s: those kinds are read live meanwhile", SYNC_TIMEOUT)
    # kopf.event() needs kopf's context variables (settings, the event queue): run the loops in a copy of the
    # startup handler's context, where they are set.
    QUEUE.start(runner=lambda loop: contextvars.copy_context().run(loop))
    # What exists already (kopf's "resume"): every object not finished, from the caches just listed.
    resync_once(list(SETTINGS.namespaces))
    context = contextvars.copy_context()
    args = (SETTINGS.resync_period, list(SETTINGS.namespaces))
    threading.Thread(target=context.run, args=(_loop, *args), name="resync", daemon=True).start()


@kopf.on.probe(id="queue")
def queue_health(**_: Any) -> dict[str, float]:
    """The work queue's depth, overdue keys and seconds since a reconcile finished (in /healthz's answer); fails
    /healthz when the queue has stopped moving (lorafleet.controllers.liveness)."""
    reason = liveness.stalled(QUEUE.snapshot(), SETTINGS.stall_seconds)
    if reason is not None:
        # kopf's /healthz answers 200 whatever its probes return; it answers 500 only when a probe handler has
        # failed for good (kopf/_core/engines/activities.py:142-146). PermanentError, not a plain exception: kopf
        # would retry that inside the same request after 60 s (ErrorsMode.TEMPORARY), and /healthz would hang.
        raise kopf.PermanentError(reason)
    return QUEUE.health()


@kopf.on.cleanup(id="resync")
def stop(**_: Any) -> None:
    _stop.set()
    QUEUE.stop()
    CACHES.stop()
