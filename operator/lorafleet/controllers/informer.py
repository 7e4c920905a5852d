"""A watch-fed cache of one kind: client-go's informer in a few dozen lines.

An `Informer` LISTs its kind once (paginated, label-selected by the API server), then WATCHes from that
resourceVersion with bookmarks and applies every event to its `Store`. When a watch ends (the server's
timeoutSeconds) it resumes from the last resourceVersion it saw; when the server answers 410 Gone it lists again
and reports the difference. Each change goes to `on_change`, which queues the object or its owner.

The `Store` is the pure part (unit-tested): objects by namespace and name, never moved back to an older
resourceVersion (a write-through of our own write may arrive before the watch event that announces it).

Requests go through their own `ApiClient` (their own connection pool), so long-running watches never take the
connections the reconcile workers write with.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException
from kubernetes.watch import watch as _watch

Obj = dict[str, Any]
Change = tuple[str, Obj]  # ("ADDED" | "MODIFIED" | "DELETED", object)
log = logging.getLogger("lorafleet.controllers.informer")

LIST_PAGE = 500
CONNECT_TIMEOUT = 10.0
LIST_READ_TIMEOUT = 60.0
# The server ends each watch after a random 5 to 10 minutes (as client-go asks), and bookmarks arrive about once
# a minute; a stream silent for longer than its timeout plus this margin is dead and is opened again.
WATCH_MIN_SECONDS = 300
WATCH_MARGIN = 30.0
MAX_BACKOFF = 30.0
FORBIDDEN_RETRY = 300.0


def _rv(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def newer_or_same(candidate: str, current: str) -> bool:
    """Whether `candidate` is not older than `current`. resourceVersions are opaque to clients, but every API
    server backed by etcd hands out increasing integers; anything else is taken as newer."""
    if candidate.isdigit() and current.isdigit():
        return int(candidate) >= int(current)
    return True


class Store:
    """Objects of one kind by namespace and name; thread-safe. Values are shared: callers must not mutate them."""

    def __init__(
        self, project: Callable[[Obj], Obj] = lambda o: o, admit: Callable[[str], bool] = lambda _ns: True
    ) -> None:
        self._project = project
        self._admit = admit  # which namespaces it keeps (an operator watching namespace globs lists cluster-wide)
        self._lock = threading.Lock()
        self._objects: dict[str, dict[str, Obj]] = {}

    def get(self, namespace: str, name: str) -> Obj | None:
        with self._lock:
            return self._objects.get(namespace, {}).get(name)

    def select(self, namespace: str | None, labels: Mapping[str, str] | None = None) -> list[Obj]:
        """Objects of a namespace (None: all) whose labels include every given one."""
        with self._lock:
            spaces = [self._objects.get(namespace, {})] if namespace is not None else list(self._objects.values())
            found = [o for space in spaces for o in space.values()]
        if not labels:
            return found
        wanted = labels.items()
        return [o for o in found if wanted <= ((o.get("metadata") or {}).get("labels") or {}).items()]

    def __len__(self) -> int:
        with self._lock:
            return sum(len(space) for space in self._objects.values())

    def apply(self, type_: str, obj: Obj) -> Change | None:
        """Apply one watch event (or a write-through); returns the change it made, None when it changed nothing
        (an event older than what is stored)."""
        meta = obj.get("metadata") or {}
        namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
        if not self._admit(namespace):
            return None
        with self._lock:
            space = self._objects.setdefault(namespace, {})
            current = space.get(name)
            if current is not None and not newer_or_same(_rv(obj), _rv(current)):
                return None
            if type_ == "DELETED":
                if current is None:
                    return None
                del space[name]
                if not space:
                    del self._objects[namespace]
                return "DELETED", current
            projected = self._project(obj)
            if current is not None and _rv(current) == _rv(projected) and current == projected:
                return None
            space[name] = projected
            return ("MODIFIED" if current is not None else "ADDED"), projected

    def replace(self, objects: list[Obj]) -> list[Change]:
        """Replace the whole content with a fresh list; returns what changed (for a relist after 410 Gone)."""
        fresh: dict[str, dict[str, Obj]] = {}
        for obj in objects:
            meta = obj.get("metadata") or {}
            if not self._admit(str(meta.get("namespace") or "")):
                continue
            fresh.setdefault(str(meta.get("namespace") or ""), {})[str(meta.get("name") or "")] = self._project(obj)
        changes: list[Change] = []
        with self._lock:
            old = self._objects
            self._objects = fresh
        for namespace, space in fresh.items():
            for name, obj in space.items():
                before = old.get(namespace, {}).get(name)
                if before is None:
                    changes.append(("ADDED", obj))
                elif _rv(before) != _rv(obj):
                    changes.append(("MODIFIED", obj))
        for namespace, space in old.items():
            for name, obj in space.items():
                if name not in fresh.get(namespace, {}):
                    changes.append(("DELETED", obj))
        return changes


class _Gone(Exception):
    """The resourceVersion to watch from is too old (410): list again."""


@dataclass(frozen=True)
class WatchTarget:
    """What an informer lists and watches: a collection path (from discovery) and a label selector."""

    path: str
    label_selector: str | None = None


class Informer:
    """List, then watch, one collection into a Store; `on_change` hears every change after the first list."""

    def __init__(
        self,
        target: WatchTarget,
        api_client: k8s_client.ApiClient,
        store: Store,
        on_change: Callable[[Change], None] = lambda _c: None,
        name: str = "informer",
        announce_first_list: bool = False,
    ) -> None:
        self.target = target
        self._announce = announce_first_list  # an informer started late reports what it finds as ADDED
        self.store = store
        self.name = name
        self.synced = threading.Event()
        self.forbidden = False  # RBAC refuses list or watch: callers read live instead
        self._api = api_client
        self._on_change = on_change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                changes, version = self._list()
                first = not self.synced.is_set()
                self.forbidden = False
                self.synced.set()
                if not first or self._announce:
                    self._emit(changes)
                failures = 0
                while not self._stop.is_set():
                    version = self._watch(version)
            except _Gone:
                log.info("%s: resourceVersion expired; listing again", self.name)
            except ApiException as exc:
                if exc.status == 403:
                    if not self.forbidden:
                        log.warning("%s: the operator may not list/watch %s: read live", self.name, self.target.path)
                    self.forbidden = True
                    self.synced.set()
                    self._stop.wait(FORBIDDEN_RETRY)
                    continue
                failures += 1
                log.warning("%s: %s; retrying", self.name, exc.reason)
            except Exception as exc:  # a network error, a stream cut: never let the thread die
                failures += 1
                log.warning("%s: %s; retrying", self.name, exc)
            if failures:
                self._stop.wait(min(MAX_BACKOFF, 0.5 * 2 ** min(failures, 6)) * random.uniform(0.8, 1.2))

    def _emit(self, changes: list[Change]) -> None:
        for change in changes:
            try:
                self._on_change(change)
            except Exception:  # a routing bug must not stop the cache
                log.exception("%s: on_change failed", self.name)

    # --- requests --------------------------------------------------------------------------------------------

    def _request(self, query: list[tuple[str, Any]], read_timeout: float) -> Any:
        if self.target.label_selector:
            query = [*query, ("labelSelector", self.target.label_selector)]
        request = self._api.param_serialize(
            "GET",
            self.target.path,
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        response: Any = self._api.call_api(*request, _request_timeout=(CONNECT_TIMEOUT, read_timeout))
        if not 200 <= response.status <= 299:
            response.read()
            self._api.response_deserialize(response, {})  # raises ApiException with the server's message
        return response.response

    def _list(self) -> tuple[list[Change], str]:
        items: list[Obj] = []
        token: str | None = None
        while True:
            query: list[tuple[str, Any]] = [("limit", LIST_PAGE)]
            if token:
                query.append(("continue", token))
            raw = self._request(query, LIST_READ_TIMEOUT)
            try:
                page = json.loads(raw.data)
            finally:
                raw.release_conn()
            # A list's items carry no apiVersion and kind (only the list does: "JobList"); the store keeps them.
            api_version, kind = page.get("apiVersion"), str(page.get("kind") or "").removesuffix("List")
            items.extend({"apiVersion": api_version, "kind": kind, **item} for item in page.get("items") or [])
            metadata = page.get("metadata") or {}
            token = metadata.get("continue")
            if not token:
                version = str(metadata.get("resourceVersion") or "")
                return self.store.replace(items), version

    def _watch(self, version: str) -> str:
        seconds = random.randint(WATCH_MIN_SECONDS, 2 * WATCH_MIN_SECONDS)
        query = [("watch", "true"), ("allowWatchBookmarks", "true"), ("timeoutSeconds", seconds)]
        if version:
            query.append(("resourceVersion", version))
        raw = self._request(query, seconds + WATCH_MARGIN)
        try:
            for event in _events(raw):
                type_, obj = event.get("type"), event.get("object") or {}
                if type_ == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone()
                    raise ApiException(status=obj.get("code"), reason=str(obj.get("message")))
                version = _rv(obj) or version
                if type_ in ("ADDED", "MODIFIED", "DELETED"):
                    change = self.store.apply(str(type_), obj)
                    if change is not None:
                        self._emit([change])
                if self._stop.is_set():
                    break
        finally:
            raw.release_conn()
        return version


def _events(raw: Any) -> Iterator[Obj]:
    lines: Any = _watch.iter_resp_lines  # untyped in the client
    for line in lines(raw):
        if line:
            yield json.loads(line)
