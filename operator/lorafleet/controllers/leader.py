"""Leader election on a coordination.k8s.io Lease, with the official client's implementation.

`kubernetes.leaderelection` (LeaderElection, electionconfig.Config, resourcelock.leaselock.LeaseLock) does the
campaign: a candidate creates or takes over the Lease when its holder has not renewed it for the lease duration,
and the leader renews it every retry period. It is synchronous, so it runs in a thread of its own while the main
thread waits, then runs kopf (which must own the main thread for its SIGTERM handling).

What we add around it, and why:
* `BoundedLeaseLock`: the library's LeaseLock sends its requests without a timeout and lets any error that is not an
  ApiException (connection refused, a TLS or read timeout) escape, which kills the election thread. Here every
  request has a timeout and every failure is a refused attempt, which the library retries.
* Losing the Lease exits the process at once with code 1 (`EXIT_LEASE_LOST`), as controller-runtime does: a
  Deployment restarts it as a standby. Nothing is stopped gracefully, because the next leader may already be
  writing. A watchdog exits too when the last successful renewal is older than the renew deadline, whatever the
  library's loop is doing, so the leader always stops before a standby may take over (lease duration > renew
  deadline + watchdog period).
* `release()` on a graceful stop (SIGTERM after kopf has stopped): the Lease is handed back (empty holder), so a
  standby takes over at its next retry instead of after the lease duration (client-go's ReleaseOnCancel; the Python
  library has none: kubernetes-client/python issues 1669, 2075).
* A standby answers /healthz on the health port until it leads, so its liveness probe passes and it counts as
  available for the PodDisruptionBudget; kopf's own endpoint takes the port over once it leads. It serves /metrics
  as well, with `lorafleet_leader` 0.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import prometheus_client
from kubernetes.client.exceptions import ApiException
from kubernetes.leaderelection import electionconfig, leaderelection
from kubernetes.leaderelection.resourcelock import leaselock

from lorafleet.config import OperatorSettings

logger = logging.getLogger(__name__)

# The client is untyped: keep strict mypy quiet at the boundary.
_LeaseLock: Any = leaselock.LeaseLock
_Config: Any = electionconfig.Config
_LeaderElection: Any = leaderelection.LeaderElection

EXIT_LEASE_LOST = 1
WATCHDOG_PERIOD = 0.5

# A standby serves /metrics too (runtime.campaign), so every pod behind the metrics Service answers a scrape; this
# gauge tells which one leads (sum() over the pods should be 1).
LEADING = prometheus_client.Gauge(
    "lorafleet_leader", "1 while this process holds the leader-election Lease and runs the controllers, else 0"
)


# The library logs at INFO every renewal of the leader and every refused attempt of a standby (each retry
# period); our own lines say when this process starts leading, releases or loses the Lease.
_ROUTINE = ("has successfully acquired lease", "yet to finish lease_duration", "is a follower")


class _RoutineFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _ROUTINE)


logging.getLogger("leaderelection").addFilter(_RoutineFilter())


def identity() -> str:
    """This candidate's name in the Lease: the pod name, else the host name plus a random suffix (two processes on
    one development machine must differ)."""
    pod = os.environ.get("POD_NAME")
    return pod or f"{socket.gethostname() or 'lorafleet'}_{uuid.uuid4().hex[:8]}"


class _WithTimeout:
    """Forwards to an API object, adding `_request_timeout` to every call."""

    def __init__(self, api: Any, timeout: float) -> None:
        self._api = api
        self._timeout = timeout

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._api, name)
        return functools.partial(attr, _request_timeout=self._timeout) if callable(attr) else attr


class BoundedLeaseLock(_LeaseLock):  # type: ignore[misc]
    """The library's LeaseLock with a timeout on every request, every failure turned into a refused attempt, the
    time of this candidate's last successful write kept for the watchdog, and a release."""

    def __init__(self, name: str, namespace: str, identity: str, request_timeout: float) -> None:
        super().__init__(name, namespace, identity)
        self.api_instance: Any = _WithTimeout(self.api_instance, request_timeout)
        self.last_write: float | None = None  # time.monotonic() of the last create/update that succeeded
        self.released = False

    def get(self, name: str, namespace: str) -> tuple[bool, Any]:
        try:
            return super().get(name, namespace)  # type: ignore[no-any-return]
        except Exception as exc:  # a network error: the library reads `.body` and `.reason` of what we return
            return False, ApiException(reason=f"{type(exc).__name__}: {exc}")

    def create(self, name: str, namespace: str, election_record: Any) -> bool:
        if self.released:
            return False
        return self._written(lambda: super(BoundedLeaseLock, self).create(name, namespace, election_record))

    def update(self, name: str, namespace: str, updated_record: Any) -> bool:
        if self.released:
            return False
        return self._written(lambda: super(BoundedLeaseLock, self).update(name, namespace, updated_record))

    def _written(self, write: Callable[[], bool]) -> bool:
        started = time.monotonic()
        try:
            ok = bool(write())
        except Exception as exc:
            logger.info("lease write failed: %s: %s", type(exc).__name__, exc)
            return False
        if ok:
            # When the request was sent, not when it returned: no standby can have seen this renewal earlier.
            self.last_write = started
        return ok

    def release(self) -> bool:
        """Hand the Lease back if this candidate holds it: empty holder, so any standby may take it at once."""
        self.released = True
        try:
            lease = self.api_instance.read_namespaced_lease(self.name, self.namespace)
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return False
            lease.spec.holder_identity = None
            lease.spec.lease_duration_seconds = 1
            self.api_instance.replace_namespaced_lease(self.name, self.namespace, lease)
            return True
        except Exception as exc:
            logger.warning("could not release the lease %s/%s: %s", self.namespace, self.name, exc)
            return False


class LeaderElector:
    """Campaigns for the Lease in a daemon thread; `wait_leading()` blocks until this process leads.

    `on_lost` ends the process when the lease is lost (os._exit: no cleanup may run while another leader writes);
    tests pass their own.
    """

    def __init__(
        self,
        lock: BoundedLeaseLock,
        *,
        lease_duration: int,
        renew_deadline: int,
        retry_period: int,
        on_lost: Callable[[int], Any] = os._exit,
    ) -> None:
        self.lock = lock
        self.renew_deadline = renew_deadline
        self.config = _Config(
            lock,
            lease_duration=lease_duration,
            renew_deadline=renew_deadline,
            retry_period=retry_period,
            onstarted_leading=self._started_leading,
            onstopped_leading=self._stopped_leading,
        )
        self.leading = threading.Event()
        self.stopping = False
        self._on_lost = on_lost
        self._exited = False

    @classmethod
    def from_settings(cls, ops: OperatorSettings, *, candidate: str | None = None) -> LeaderElector:
        # A request may not outlast a retry period: the renew loop's last attempt before its deadline must end
        # well before the lease duration.
        lock = BoundedLeaseLock(
            ops.leader_election_lease_name,
            ops.operator_namespace,
            candidate or identity(),
            request_timeout=ops.leader_election_retry_period,
        )
        return cls(
            lock,
            lease_duration=ops.leader_election_lease_duration,
            renew_deadline=ops.leader_election_renew_deadline,
            retry_period=ops.leader_election_retry_period,
        )

    @property
    def identity(self) -> str:
        return str(self.lock.identity)

    def start(self) -> None:
        threading.Thread(target=self._campaign, name="leader-election", daemon=True).start()
        threading.Thread(target=self._watchdog, name="leader-watchdog", daemon=True).start()

    def wait_leading(self) -> None:
        while not self.leading.wait(timeout=1.0):  # a timeout keeps the main thread responsive to SIGINT
            pass

    def stop(self) -> None:
        """A graceful stop (kopf has stopped): hand the Lease back, never exit as if it were lost."""
        self.stopping = True
        if self.leading.is_set() and self.lock.release():
            logger.info("released the lease %s/%s", self.lock.namespace, self.lock.name)

    # --- the election thread -------------------------------------------------------------------------------------

    def _campaign(self) -> None:
        logger.info("campaigning for the lease %s/%s as %s", self.lock.namespace, self.lock.name, self.lock.identity)
        try:
            _LeaderElection(self.config).run()
        except BaseException:
            logger.exception("leader election failed")
        # run() returns only after the leader failed to renew (onstopped_leading ran) or raised.
        self._lost("leader election ended")

    def _started_leading(self) -> None:
        logger.info("leading: %s holds the lease %s/%s", self.lock.identity, self.lock.namespace, self.lock.name)
        LEADING.set(1)
        self.leading.set()

    def _stopped_leading(self) -> None:
        self._lost("could not renew the lease within the renew deadline")

    def _watchdog(self) -> None:
        while not self._exited:
            time.sleep(WATCHDOG_PERIOD)
            self.check_renewal(time.monotonic())

    def check_renewal(self, now: float) -> None:
        """Exit when leading and the last successful renewal is older than the renew deadline."""
        last = self.lock.last_write
        if self.leading.is_set() and last is not None and now - last > self.renew_deadline:
            self._lost(f"last renewal {now - last:.1f} s ago, over the renew deadline of {self.renew_deadline} s")

    def _lost(self, why: str) -> None:
        if self.stopping or self._exited:
            return
        self._exited = True
        logger.critical("leader election lost: %s; exiting (code %d)", why, EXIT_LEASE_LOST)
        for handler in logging.getLogger().handlers:
            handler.flush()
        self._on_lost(EXIT_LEASE_LOST)


class StandbyHealth:
    """/healthz (200, "standby") on the health port while this process waits for the lease."""

    def __init__(self, port: int, host: str = "0.0.0.0") -> None:
        self.port = port
        self.host = host
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                ok = self.path.split("?")[0] == "/healthz"
                body = b'{"leader": false}' if ok else b"not found"
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/json" if ok else "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: not worth a line
                pass

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        threading.Thread(target=self._server.serve_forever, name="standby-health", daemon=True).start()

    def stop(self) -> None:
        """Free the port for kopf's liveness endpoint."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
