"""Periodic resync: every object of every kind is reconciled from the level every `resync_seconds`.

kopf's per-object timers would do this too, but kopf puts a finalizer on every object that has a timer, and
finalizers without a running operator block namespace deletion and uninstall (kopf pitfall 3). One loop
that lists each kind per interval costs a few list calls and leaves no finalizer behind.
"""

from __future__ import annotations

import contextvars
import fnmatch
import threading
from collections.abc import Callable
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from lorafleet import API_VERSION, k8s
from lorafleet.controllers import adapterdeployment, basemodel, finetunejob
from lorafleet.controllers.base import SETTINGS, Obj, log, reconcile_and_write

RECONCILERS: tuple[tuple[str, Callable[[Obj], Obj]], ...] = (
    (basemodel.KIND, basemodel.reconcile),
    (finetunejob.KIND, finetunejob.reconcile),
    (adapterdeployment.KIND, adapterdeployment.reconcile),
)

_stop = threading.Event()


def resync_once(namespaces: list[str] | None = None) -> int:
    """Reconcile every object once; returns how many were reconciled. Failures are logged, never raised."""
    done = 0
    for kind, reconcile in RECONCILERS:
        # Namespace patterns (kopf's globs such as team-*) are matched here against a cluster-wide list.
        globbing = any(set(n) & set("*?[!") for n in namespaces or [])
        scopes: list[str | None] = list(namespaces) if namespaces and not globbing else [None]  # None: all
        for namespace in scopes:
            try:
                objects = k8s.list_(API_VERSION, kind, namespace)
            except Exception as exc:
                log.warning("resync: listing %s failed: %s", kind, exc)
                continue
            for obj in objects:
                if globbing and not _watched(obj["metadata"].get("namespace", ""), namespaces or []):
                    continue
                if obj["metadata"].get("deletionTimestamp"):
                    continue
                try:
                    reconcile_and_write(reconcile, obj, None)
                    done += 1
                except ApiException as exc:
                    if exc.status != 404:  # deleted since the list: nothing to do
                        log.warning("resync of %s %s failed: %s", kind, obj["metadata"].get("name"), exc)
                except Exception as exc:  # one broken object must not stop the others
                    log.warning("resync of %s %s failed: %s", kind, obj["metadata"].get("name"), exc)
    return done


def _watched(namespace: str, patterns: list[str]) -> bool:
    """kopf's namespace patterns: globs, and a leading ! excludes."""
    included = any(fnmatch.fnmatchcase(namespace, p) for p in patterns if not p.startswith("!"))
    excluded = any(fnmatch.fnmatchcase(namespace, p[1:]) for p in patterns if p.startswith("!"))
    return included and not excluded


def _loop(interval: float, namespaces: list[str]) -> None:
    while not _stop.wait(interval):
        resync_once(namespaces)


@kopf.on.startup(id="resync")
def start(**_: Any) -> None:
    _stop.clear()
    # kopf.event() needs kopf's context variables (settings, the event queue): run the loop in a copy of the
    # startup handler's context, where they are set.
    context = contextvars.copy_context()
    args = (SETTINGS.resync_seconds, list(SETTINGS.namespaces))
    threading.Thread(target=context.run, args=(_loop, *args), name="resync", daemon=True).start()


@kopf.on.cleanup(id="resync")
def stop(**_: Any) -> None:
    _stop.set()
