"""A thin, synchronous layer over the official `kubernetes` client.

Controllers call it from kopf's sync handlers (kopf runs those in its thread pool), so everything here is
blocking and thread-safe. All writes of whole objects go through server-side apply with one field manager;
errors become kopf's retry semantics through `temporary_on_conflict()`.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os
import re
import tempfile
import threading
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, cast

import kopf
import urllib3.exceptions
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ResourceNotFoundError
from kubernetes.dynamic.resource import Resource

P = ParamSpec("P")
R = TypeVar("R")

# Metadata the API server owns: sending any of it in an apply configuration either fails (resourceVersion
# turns the apply into an optimistic-lock update) or claims ownership of fields we must not own.
_SERVER_OWNED_METADATA = (
    "managedFields",
    "resourceVersion",
    "uid",
    "creationTimestamp",
    "generation",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)

# Retry delays (seconds) for the transient classes of API errors.
CONFLICT_DELAY = 2.0
THROTTLE_DELAY = 10.0
SERVER_ERROR_DELAY = 10.0
NETWORK_DELAY = 10.0
UNKNOWN_KIND_DELAY = 30.0
MAX_RETRY_AFTER = 300.0

POOL_SIZE = 32
_lock = threading.RLock()
_configured = False
_api_client: k8s_client.ApiClient | None = None
_dynamic: Any = None  # a DynamicClient; typed Any because the client library is untyped
_resources: dict[tuple[str, str], Resource] = {}


# --- clients ---------------------------------------------------------------------------------------------


def load_client_config() -> None:
    """Load credentials: in-cluster (service account) first, else KUBECONFIG / ~/.kube/config."""
    global _configured
    with _lock:
        loaders: Any = k8s_config  # the client is untyped; keep strict mypy quiet at the boundary
        try:
            loaders.load_incluster_config()
        except ConfigException:
            loaders.load_kube_config()
        _configured = True


def use_api_client(api_client: k8s_client.ApiClient) -> None:
    """Point this module at an explicit client (integration tests with their own kubeconfig)."""
    global _configured, _api_client, _dynamic
    with _lock:
        _api_client = api_client
        _dynamic = None
        _resources.clear()
        _configured = True


def reset() -> None:
    """Forget the client and the discovery cache (tests; a changed kubeconfig)."""
    global _configured, _api_client, _dynamic
    with _lock:
        _configured = False
        _api_client = None
        _dynamic = None
        _resources.clear()


def dynamic_client() -> Any:
    """The process-wide `kubernetes.dynamic.DynamicClient`; its discovery is slow, so it is built once."""
    global _api_client, _dynamic
    with _lock:
        if _dynamic is None:
            if not _configured:
                load_client_config()
            if _api_client is None:
                configuration = k8s_client.Configuration.get_default_copy()
                # kopf runs up to MAX_WORKERS sync handlers at once; urllib3's default pool of 10 would
                # discard connections under that load.
                configuration.connection_pool_maxsize = POOL_SIZE
                _api_client = k8s_client.ApiClient(configuration)
            # A per-process cache file: the default one is keyed by host only and outlives the process, so
            # a test cluster recreated on the same address would be served stale resource lists.
            cache_file = os.path.join(tempfile.gettempdir(), f"lorafleet-discovery-{os.getpid()}.json")
            untyped: Any = DynamicClient
            _dynamic = untyped(_api_client, cache_file=cache_file)
        return _dynamic


def resource(api_version: str, kind: str) -> Resource:
    """The discovered API resource of a kind, cached per process.

    Raises `kubernetes.dynamic.exceptions.ResourceNotFoundError` when the server does not serve the kind
    (for instance a CRD not installed yet); `temporary_on_conflict()` turns that into a retry.
    """
    key = (api_version, kind)
    with _lock:  # LazyDiscoverer mutates its cache on misses; it is not thread-safe
        found = _resources.get(key)
        if found is None:
            found = cast(Resource, dynamic_client().resources.get(api_version=api_version, kind=kind))
            _resources[key] = found
        return found


# --- pure helpers ----------------------------------------------------------------------------------------


def _drop_nones(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _drop_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nones(v) for v in value]
    return value


def clean_for_apply(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The apply configuration for `obj`: a deep copy without status and server-owned metadata.

    Also drops None values: they come from model dumps, not intent, and in an apply configuration a null
    would be a claim on the field. Raises ValueError when apiVersion, kind or metadata.name is missing.
    """
    cleaned: dict[str, Any] = _drop_nones(copy.deepcopy(dict(obj)))
    for required in ("apiVersion", "kind"):
        if not cleaned.get(required):
            raise ValueError(f"object to apply has no {required}: {_describe(obj)}")
    metadata = cleaned.get("metadata")
    if not isinstance(metadata, dict) or not metadata.get("name"):
        raise ValueError(f"object to apply has no metadata.name: {_describe(obj)}")
    # status is never ours to apply: it goes through the status subresource (kopf's patch or patch_status).
    cleaned.pop("status", None)
    for key in _SERVER_OWNED_METADATA:
        metadata.pop(key, None)
    return cleaned


def _describe(obj: Mapping[str, Any]) -> str:
    metadata = obj.get("metadata") or {}
    name = metadata.get("name", "?") if isinstance(metadata, Mapping) else "?"
    return f"{obj.get('apiVersion', '?')}/{obj.get('kind', '?')} {name!r}"


_FORBIDDEN_RE = re.compile(
    r'cannot (?P<verb>[\w-]+) resource "(?P<resource>[^"]+)" in API group "(?P<group>[^"]*)"'
    r'(?: in the namespace "(?P<namespace>[^"]+)"| at the cluster scope)?'
)


def _status_message(exc: ApiException) -> str:
    """The `message` of the API server's Status body, else the raw body or the reason."""
    body = exc.body
    if isinstance(body, bytes):
        body = body.decode("utf-8", errors="replace")
    if isinstance(body, str) and body:
        try:
            parsed = json.loads(body)
        except ValueError:
            return body
        if isinstance(parsed, dict) and parsed.get("message"):
            return str(parsed["message"])
        return body
    return str(exc.reason or exc.status)


def _retry_after(exc: ApiException, default: float) -> float:
    headers = exc.headers or {}
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    try:
        seconds = float(value) if value is not None else default
    except (TypeError, ValueError):  # an HTTP date instead of seconds: not worth parsing
        seconds = default
    return min(max(seconds, 1.0), MAX_RETRY_AFTER)


def forbidden_message(exc: ApiException) -> str:
    """A message naming the RBAC rule the operator lacks, from the API server's 403 text."""
    message = _status_message(exc)
    match = _FORBIDDEN_RE.search(message)
    if match is None:
        return f"forbidden by the API server (check the operator's RBAC): {message}"
    verb, res, group = match["verb"], match["resource"], match["group"]
    where = f'in namespace "{match["namespace"]}"' if match["namespace"] else "cluster-wide"
    return (
        f'RBAC: the operator may not "{verb}" "{res}" (API group "{group or "core"}") {where}; '
        f'grant apiGroups: ["{group}"], resources: ["{res}"], verbs: ["{verb}"] to its service account. '
        f"Server said: {message}"
    )


def to_kopf_error(exc: BaseException) -> Exception | None:
    """Map a client error to kopf's retry semantics; None means "not ours to classify, re-raise".

    409, 429, 5xx, network errors and unknown kinds are transient: kopf.TemporaryError with a delay
    (Retry-After honoured on 429). 403 is a missing RBAC rule, 400/422 an invalid object: retrying
    cannot help until someone changes the RBAC or the spec, so kopf.PermanentError.
    """
    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        message = _status_message(exc)
        if status == 409:
            return kopf.TemporaryError(f"conflict, will retry: {message}", delay=CONFLICT_DELAY)
        if status == 429:
            return kopf.TemporaryError(
                f"throttled by the API server: {message}", delay=_retry_after(exc, THROTTLE_DELAY)
            )
        if status >= 500 or status == 401:
            # 401: an expiring service-account token is refreshed by the client on its next request.
            return kopf.TemporaryError(
                f"API server error {status}: {message}", delay=_retry_after(exc, SERVER_ERROR_DELAY)
            )
        if status == 403:
            return kopf.PermanentError(forbidden_message(exc))
        if status in (400, 422):
            return kopf.PermanentError(f"the API server rejected the object ({status}): {message}")
        return None
    if isinstance(exc, ResourceNotFoundError):
        return kopf.TemporaryError(
            f"the API server does not serve this kind (CRD not installed yet?): {exc}",
            delay=UNKNOWN_KIND_DELAY,
        )
    if isinstance(exc, urllib3.exceptions.HTTPError):
        return kopf.TemporaryError(f"cannot reach the API server: {exc}", delay=NETWORK_DELAY)
    return None


class temporary_on_conflict:  # lower case: reads like a function, `with temporary_on_conflict():`
    """Context manager and decorator (sync or async) applying `to_kopf_error` to what escapes it."""

    def __enter__(self) -> temporary_on_conflict:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            return
        mapped = to_kopf_error(exc)
        if mapped is not None:
            raise mapped from exc

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        if inspect.iscoroutinefunction(fn):
            async_fn = cast(Callable[P, Awaitable[Any]], fn)

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                with temporary_on_conflict():
                    return await async_fn(*args, **kwargs)

            return cast(Callable[P, R], async_wrapper)

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with temporary_on_conflict():
                return fn(*args, **kwargs)

        return wrapper


# --- API calls -------------------------------------------------------------------------------------------


def _to_dict(result: Any) -> dict[str, Any]:
    if hasattr(result, "to_dict"):
        return cast(dict[str, Any], result.to_dict())
    if isinstance(result, str):  # the dynamic client returns text when the body is not JSON
        return cast(dict[str, Any], json.loads(result))
    return cast(dict[str, Any], result)


# An apply configuration's resourceVersion is a precondition on the stored object. No stored object has revision 1
# (etcd's first write is revision 2), so an apply carrying it creates the object when the name is free and fails
# with 409 Conflict, changing nothing, when any object holds the name: create-if-absent in one request, with the
# fields owned by the apply (unlike a POST, whose fields an "Update" entry would own).
CREATE_ONLY_VERSION = "1"


def apply(obj: Mapping[str, Any], field_manager: str, force: bool = True, create_only: bool = False) -> dict[str, Any]:
    """Server-side apply of any object (core or custom, namespaced or cluster-scoped); returns the result.

    `force=True` takes over fields another manager set: the operator is the source of truth for what it
    builds. `create_only=True` only creates: ApiException 409 when an object of that name exists (force is then
    irrelevant). Raises ValueError for a namespaced kind without metadata.namespace or a cluster-scoped kind with
    one (a bug in the caller, not something to retry).
    """
    body = clean_for_apply(obj)
    if create_only:
        body["metadata"]["resourceVersion"] = CREATE_ONLY_VERSION
        force = False
    res = resource(body["apiVersion"], body["kind"])
    metadata = body["metadata"]
    namespace = metadata.get("namespace")
    if res.namespaced and not namespace:
        raise ValueError(f"{_describe(body)} is namespaced but has no metadata.namespace")
    if not res.namespaced and namespace:
        raise ValueError(f"{_describe(body)} is cluster-scoped but has metadata.namespace={namespace!r}")
    result = dynamic_client().server_side_apply(
        res,
        body=body,
        name=metadata["name"],
        namespace=namespace,
        field_manager=field_manager,
        force_conflicts=force,
    )
    return _to_dict(result)


def get(api_version: str, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
    """The object, or None when it does not exist."""
    res = resource(api_version, kind)
    try:
        result = dynamic_client().get(res, name=name, namespace=namespace if res.namespaced else None)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return _to_dict(result)


def list_(
    api_version: str, kind: str, namespace: str | None = None, label_selector: str | None = None
) -> list[dict[str, Any]]:
    """Objects of a kind, in one namespace or (namespace None) everywhere; items carry apiVersion and kind."""
    res = resource(api_version, kind)
    result = dynamic_client().get(res, namespace=namespace if res.namespaced else None, label_selector=label_selector)
    return cast(list[dict[str, Any]], _to_dict(result).get("items") or [])


def delete(
    api_version: str,
    kind: str,
    name: str,
    namespace: str | None = None,
    propagation_policy: str = "Background",
) -> bool:
    """Delete an object; False when it was already gone.

    Background propagation by default: a batch/v1 Job deleted through the API otherwise orphans its pods.
    """
    res = resource(api_version, kind)
    try:
        dynamic_client().delete(
            res,
            name=name,
            namespace=namespace if res.namespaced else None,
            propagation_policy=propagation_policy,
        )
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def patch_status(
    api_version: str,
    kind: str,
    name: str,
    namespace: str | None,
    status: Mapping[str, Any],
    resource_version: str | None = None,
) -> dict[str, Any]:
    """JSON merge patch of `status` on the status subresource.

    With `resource_version` (the one the status was computed from) the write is optimistic: the API server
    refuses it with 409 Conflict when the object changed since, and the caller retries from a fresh read.
    """
    res = resource(api_version, kind)
    sub = res.subresources.get("status")
    if sub is None:
        raise ValueError(f"{api_version}/{kind} has no status subresource")
    body: dict[str, Any] = {"status": dict(status)}
    if resource_version:
        body["metadata"] = {"resourceVersion": resource_version}
    result = dynamic_client().patch(
        sub,
        body=body,
        name=name,
        namespace=namespace if res.namespaced else None,
        content_type="application/merge-patch+json",
    )
    return _to_dict(result)


def patch_finalizers(
    api_version: str, kind: str, name: str, namespace: str | None, finalizers: list[str], resource_version: str
) -> dict[str, Any]:
    """Set metadata.finalizers (a merge patch replaces the list) only if the object is still at
    `resource_version`: a finalizer someone else added meanwhile is never dropped (409, retried from a fresh read)."""
    res = resource(api_version, kind)
    body = {"metadata": {"finalizers": finalizers, "resourceVersion": resource_version}}
    result = dynamic_client().patch(
        res,
        body=body,
        name=name,
        namespace=namespace if res.namespaced else None,
        content_type="application/merge-patch+json",
    )
    return _to_dict(result)
