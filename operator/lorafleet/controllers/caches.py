"""What the controllers observe, from watch-fed caches instead of live GET and LIST calls.

One informer per kind (per watched namespace when the operator watches a list of them):

* the three custom resources, whole (their changes queue the object itself, and the objects that wait for it:
  a BaseModel's FineTuneJobs and AdapterDeployments, a FineTuneJob's AdapterDeployments);
* every child kind, and pods, selected by the API server with lorafleet's managed-by label and kept as metadata
  and status only (the controllers read nothing else of them; of a ConfigMap, also a trainer's live progress):
  their changes queue their controller owner, so a child deleted or edited by hand is restored at once, and a
  trainer's progress update reconciles its FineTuneJob.

Reads fall back to the API server when no cache serves the kind (tests that call a reconcile directly, RBAC that
refuses list/watch). Our own writes are written through, so the next pass never reads an older copy of what it
just wrote; the watch event that follows is then no change.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kubernetes import client as k8s_client
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from lorafleet import API_VERSION, k8s
from lorafleet.contracts.trainer import MAX_PROGRESS_BYTES, PROGRESS_KEY
from lorafleet.controllers.informer import Change, Informer, Store, WatchTarget
from lorafleet.resources import adapterdeployment as ad_builders
from lorafleet.resources import finetunejob as ftj_builders
from lorafleet.resources.common import MANAGED_BY, MANAGED_BY_LABEL

Obj = dict[str, Any]
Kind = tuple[str, str]  # (apiVersion, kind)
log = logging.getLogger("lorafleet.controllers.caches")

CUSTOM_KINDS: tuple[Kind, ...] = (
    (API_VERSION, "BaseModel"),
    (API_VERSION, "FineTuneJob"),
    (API_VERSION, "AdapterDeployment"),
)
CHILD_KINDS: tuple[Kind, ...] = tuple(
    dict.fromkeys([*ftj_builders.CHILD_KINDS, *ad_builders.CHILD_KINDS, ("v1", "Pod")])
)
CHILD_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
SYNC_TIMEOUT = 120.0
DISCOVERY_RETRY = 15.0

_DROPPED_METADATA = ("managedFields",)


def whole(obj: Obj) -> Obj:
    """A custom resource as the controllers parse it, without managedFields."""
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k not in _DROPPED_METADATA}
    return {**obj, "metadata": meta}


def metadata_and_status(obj: Obj) -> Obj:
    """A child or pod as the controllers read it: no spec, data or rules (most of its bytes)."""
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k not in _DROPPED_METADATA}
    out: Obj = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "metadata": meta}
    if "status" in obj:
        out["status"] = obj["status"]
    # A progress ConfigMap's one key (contracts.trainer), when it fits the cap: a trainer cannot make the
    # operator hold more than that per job.
    progress = (obj.get("data") or {}).get(PROGRESS_KEY) if obj.get("kind") == "ConfigMap" else None
    if isinstance(progress, str) and len(progress.encode()) <= MAX_PROGRESS_BYTES:
        out["data"] = {PROGRESS_KEY: progress}
    return out


def watched(namespace: str, patterns: list[str]) -> bool:
    """kopf's namespace patterns: globs, and a leading ! excludes."""
    included = any(fnmatch.fnmatchcase(namespace, p) for p in patterns if not p.startswith("!"))
    excluded = any(fnmatch.fnmatchcase(namespace, p[1:]) for p in patterns if p.startswith("!"))
    return included and not excluded


class Caches:
    """The informers of one operator process, by kind; empty until `start`."""

    def __init__(self) -> None:
        self._stores: dict[Kind, Store] = {}
        self._informers: dict[Kind, list[Informer]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start(self, namespaces: Iterable[str], on_change: Callable[[Kind, Change], None]) -> None:
        """One informer per kind and namespace (a list of plain names), or per kind cluster-wide. A kind the API
        server does not serve yet (its CRD is installed after the operator) is read live and looked up again
        every DISCOVERY_RETRY seconds until its informers can start."""
        names = [n for n in namespaces if n]
        globbing = any(set(n) & set("*?[!") for n in names)
        scopes: list[str | None] = list(names) if names and not globbing else [None]
        admit = functools.partial(watched, patterns=names) if globbing else (lambda _ns: True)
        configuration = k8s_client.Configuration.get_default_copy()
        configuration.connection_pool_maxsize = (len(CUSTOM_KINDS) + len(CHILD_KINDS)) * len(scopes) + 2
        api = k8s_client.ApiClient(configuration)
        self._stop.clear()

        def start_kind(kind: Kind, late: bool = False) -> bool:
            try:
                resource: Any = k8s.resource(*kind)
            except ResourceNotFoundError:
                return False
            custom = kind in CUSTOM_KINDS
            with self._lock:
                store = self._stores.setdefault(kind, Store(whole if custom else metadata_and_status, admit))
                for scope in scopes:
                    target = WatchTarget(resource.path(namespace=scope), None if custom else CHILD_SELECTOR)
                    informer = Informer(
                        target, api, store, functools.partial(on_change, kind), f"cache-{kind[1]}", late
                    )
                    self._informers.setdefault(kind, []).append(informer)
                    informer.start()
            return True

        missing = [kind for kind in (*CUSTOM_KINDS, *CHILD_KINDS) if not start_kind(kind)]
        if missing:
            log.warning(
                "the API server does not serve %s yet: read live until it does", ", ".join(k for _, k in missing)
            )

            def retry() -> None:
                while missing and not self._stop.wait(DISCOVERY_RETRY):
                    for kind in [k for k in missing if start_kind(k, late=True)]:
                        missing.remove(kind)
                        log.info("caching %s %s from now on", *kind)

            threading.Thread(target=retry, name="cache-discovery", daemon=True).start()

    def wait_synced(self, timeout: float = SYNC_TIMEOUT) -> bool:
        """Block until every informer listed once (or found it may not); False on timeout."""
        with self._lock:
            informers = [i for group in self._informers.values() for i in group]
        return all(i.synced.wait(timeout) for i in informers)

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for group in self._informers.values():
                for informer in group:
                    informer.stop()
            self._informers.clear()
            self._stores.clear()

    def _store(self, api_version: str, kind: str) -> Store | None:
        """The store serving a kind, when every informer of it has listed and may watch."""
        with self._lock:
            informers = self._informers.get((api_version, kind))
            if not informers or any(not i.synced.is_set() or i.forbidden for i in informers):
                return None
            return self._stores[(api_version, kind)]

    def serves(self, api_version: str, kind: str) -> bool:
        return self._store(api_version, kind) is not None

    # --- reads -----------------------------------------------------------------------------------------------

    def get(self, api_version: str, kind: str, name: str, namespace: str) -> Obj | None:
        """One object, from the cache when it serves the kind, else from the API server."""
        store = self._store(api_version, kind)
        if store is None:
            return k8s.get(api_version, kind, name, namespace)
        return store.get(namespace, name)

    def select(self, api_version: str, kind: str, namespace: str, labels: Mapping[str, str]) -> list[Obj]:
        """Objects of a namespace carrying the given labels, from the cache, else listed from the API server."""
        store = self._store(api_version, kind)
        if store is None:
            selector = ",".join(f"{k}={v}" for k, v in labels.items())
            return k8s.list_(api_version, kind, namespace, selector or None)
        return store.select(namespace, labels)

    def all(self, api_version: str, kind: str, namespace: str | None = None) -> list[Obj] | None:
        """Every cached object of a kind (in a namespace); None when no cache serves the kind."""
        store = self._store(api_version, kind)
        return None if store is None else store.select(namespace)

    # --- our own writes ----------------------------------------------------------------------------------------

    def record(self, obj: Obj) -> None:
        """Write-through of an object we just wrote (the API server's answer)."""
        store = self._stores.get((str(obj.get("apiVersion")), str(obj.get("kind"))))
        if store is not None:
            store.apply("MODIFIED", obj)

    def forget(self, obj: Obj) -> None:
        """Write-through of an object we just deleted."""
        store = self._stores.get((str(obj.get("apiVersion")), str(obj.get("kind"))))
        if store is not None:
            meta = obj.get("metadata") or {}
            current = store.get(str(meta.get("namespace") or ""), str(meta.get("name") or ""))
            if current is not None:
                store.apply("DELETED", current)

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {kind: len(store) for (_, kind), store in self._stores.items()}


CACHES = Caches()
