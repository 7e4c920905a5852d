"""Prometheus metrics of the reconcilers.

Controllers wrap each reconcile in `observe(kind)`, as a context manager or a decorator (sync or async):

    @kopf.on.update(...)
    @observe("FineTuneJob")
    def reconcile(...): ...

    with observe("AdapterDeployment") as obs:
        ...
        obs.result = "noop"   # optional: a more specific result than "success"
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, cast

import kopf
import prometheus_client
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry, Counter, Histogram

P = ParamSpec("P")
R = TypeVar("R")

# Reconciles mostly wait on the API server; long ones (artifact checks) go up to a minute.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

RESULT_SUCCESS = "success"
RESULT_RETRY = "retry"  # kopf.TemporaryError: expected, kopf retries after its delay
RESULT_PERMANENT = "permanent_error"  # kopf.PermanentError: given up until the spec changes
RESULT_ERROR = "error"  # anything else: kopf retries with its backoff


class Metrics:
    """The reconcile metrics, registered in one registry (the global one in production)."""

    def __init__(self, registry: CollectorRegistry | None = prometheus_client.REGISTRY) -> None:
        self.registry = registry
        self.reconcile_total = Counter(
            "lorafleet_reconcile_total",
            "Reconciles, by kind and result.",
            ["kind", "result"],
            registry=registry,
        )
        self.reconcile_errors_total = Counter(
            "lorafleet_reconcile_errors_total",
            "Failed reconciles, by kind and reason (exception class or HTTP status).",
            ["kind", "reason"],
            registry=registry,
        )
        self.reconcile_duration_seconds = Histogram(
            "lorafleet_reconcile_duration_seconds",
            "Duration of reconciles, by kind.",
            ["kind"],
            registry=registry,
            buckets=DURATION_BUCKETS,
        )
        # Kept in memory (not exported) for the liveness probe's report.
        self._lock = threading.Lock()
        self.last_finished: dict[str, float] = {}

    def record(self, kind: str, result: str, seconds: float, reason: str | None = None) -> None:
        self.reconcile_total.labels(kind=kind, result=result).inc()
        self.reconcile_duration_seconds.labels(kind=kind).observe(seconds)
        if reason is not None:
            self.reconcile_errors_total.labels(kind=kind, reason=reason).inc()
        with self._lock:
            self.last_finished[kind] = time.time()

    def seconds_since_last(self, now: float | None = None) -> dict[str, float]:
        now = time.time() if now is None else now
        with self._lock:
            return {kind: round(now - at, 3) for kind, at in self.last_finished.items()}


# Created at import: prometheus_client refuses to register the same names twice in one registry.
METRICS = Metrics()


def classify(exc: BaseException) -> tuple[str, str]:
    """(result, reason) of a failed reconcile. Reasons stay low-cardinality: class names or HTTP codes."""
    cause = exc.__cause__ if isinstance(exc, (kopf.TemporaryError, kopf.PermanentError)) else None
    if isinstance(cause, ApiException):
        reason = f"http_{cause.status}"
    elif isinstance(exc, ApiException):
        reason = f"http_{exc.status}"
    else:
        reason = type(exc).__name__
    if isinstance(exc, kopf.TemporaryError):
        return RESULT_RETRY, reason
    if isinstance(exc, kopf.PermanentError):
        return RESULT_PERMANENT, reason
    return RESULT_ERROR, reason


class observe:  # lower case: reads like a function, `with observe("BaseModel"):`
    """Count and time one reconcile of `kind`; usable as a context manager or a (sync/async) decorator."""

    def __init__(self, kind: str, metrics: Metrics | None = None) -> None:
        self.kind = kind
        self.metrics = metrics
        self.result: str = RESULT_SUCCESS
        self._started = 0.0

    def __enter__(self) -> observe:
        self.result = RESULT_SUCCESS
        self._started = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        seconds = time.perf_counter() - self._started
        metrics = self.metrics if self.metrics is not None else METRICS
        if exc is None:
            metrics.record(self.kind, self.result, seconds)
        elif isinstance(exc, Exception):  # KeyboardInterrupt/cancellation are no reconcile results
            result, reason = classify(exc)
            metrics.record(self.kind, result, seconds, reason=reason)

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        # A fresh instance per call: one decorated handler runs concurrently in kopf's thread pool.
        kind, metrics = self.kind, self.metrics
        if inspect.iscoroutinefunction(fn):
            async_fn = cast(Callable[P, Awaitable[Any]], fn)

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                with observe(kind, metrics):
                    return await async_fn(*args, **kwargs)

            return cast(Callable[P, R], async_wrapper)

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with observe(kind, metrics):
                return fn(*args, **kwargs)

        return wrapper


_server_lock = threading.Lock()
_server_port: int | None = None


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> bool:
    """Serve /metrics of the global registry on `port`; False when this process already serves it."""
    global _server_port
    with _server_lock:
        if _server_port is not None:  # startup handlers may run twice (configure + `kopf run`)
            return False
        prometheus_client.start_http_server(port, addr=addr)
        _server_port = port
        return True
