"""The operator's kopf configuration and its reconcile metrics.

Invariants pinned here: after configure() no kopf.zalando.org name is left anywhere in kopf's settings (the
finalizer, the progress and diff-base annotations are all under lorafleet.io); progress is kept in
annotations, never in status.kopf (pruned by structural schemas); watches have integer server timeouts and
a longer client timeout; every setting we name exists in kopf; a missing handler module is a clear error.
observe(kind) counts every reconcile once with its result, times it, and counts failures by reason.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
from collections.abc import Iterator
from typing import Any

import kopf
import pytest
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.leaderelection.leaderelection import LeaderElection
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from lorafleet import k8s
from lorafleet.config import OperatorSettings
from lorafleet.controllers import leader, observability, runtime
from lorafleet.controllers.observability import Metrics, observe


def configured() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    runtime.configure(settings, OperatorSettings(), instance="test-pod")
    return settings


def strings_in(value: Any, seen: set[int] | None = None) -> Iterator[str]:
    """Every string reachable from kopf's settings: dataclass fields and storage objects' attributes."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings_in(key, seen)
            yield from strings_in(item, seen)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from strings_in(item, seen)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from strings_in(getattr(value, field.name), seen)
    elif hasattr(value, "__dict__") and type(value).__module__.startswith("kopf."):
        for item in vars(value).values():
            yield from strings_in(item, seen)


# --- kopf settings --------------------------------------------------------------------------------------------


def test_no_kopf_zalando_names_remain() -> None:
    # Control: the walk does reach the defaults' kopf.zalando.org names (finalizer and storage prefixes).
    assert len([name for name in strings_in(kopf.OperatorSettings()) if "kopf.zalando.org" in name]) >= 2
    names = list(strings_in(configured()))
    assert "lorafleet.io/finalizer" in names and "lorafleet.io" in names
    assert not [name for name in names if "zalando" in name]


def test_every_setting_exists_in_kopf() -> None:
    defaults = kopf.OperatorSettings()
    for path in runtime.kopf_settings(OperatorSettings()):
        section, attribute = path.split(".", 1)
        assert hasattr(getattr(defaults, section), attribute), path


def test_progress_and_diffbase_live_in_lorafleet_annotations() -> None:
    persistence = configured().persistence
    assert persistence.finalizer == "lorafleet.io/finalizer"
    progress = persistence.progress_storage
    diffbase = persistence.diffbase_storage
    # Exactly annotations: a Smart/Status storage would write status.kopf, which the CRD schema prunes.
    assert type(progress) is kopf.AnnotationsProgressStorage
    assert type(diffbase) is kopf.AnnotationsDiffBaseStorage
    assert list(progress.make_keys("reconcile")) == ["lorafleet.io/reconcile"]
    assert list(diffbase.make_keys(diffbase.key)) == ["lorafleet.io/last-handled-configuration"]


def test_watches_cannot_freeze_forever() -> None:
    watching = configured().watching
    # kopf sends str(server_timeout) as timeoutSeconds; the API server wants an integer.
    assert isinstance(watching.server_timeout, int)
    assert watching.client_timeout is not None and watching.client_timeout > watching.server_timeout
    assert watching.connect_timeout is not None


def test_standalone_events_and_workers() -> None:
    settings = configured()
    assert settings.peering.standalone is True
    assert settings.peering.name == "lorafleet"
    assert settings.posting.level == logging.WARNING
    assert settings.posting.reporting_component == "lorafleet-operator"
    assert settings.posting.reporting_instance == "test-pod"
    assert settings.posting.event_name_prefix.startswith("lorafleet")
    assert settings.execution.max_workers == runtime.MAX_WORKERS


def test_liveness_endpoint_uses_the_health_port() -> None:
    assert runtime.liveness_endpoint(OperatorSettings(health_port=9999)) == "http://0.0.0.0:9999/healthz"


def test_missing_handler_module_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match=r"lorafleet\.controllers\.nosuchthing is missing"):
        runtime.import_handlers(("lorafleet.controllers.nosuchthing",))


def test_handler_modules_are_the_controllers_and_the_resync_loop() -> None:
    assert set(runtime.HANDLER_MODULES) == {
        "lorafleet.controllers.basemodel",
        "lorafleet.controllers.finetunejob",
        "lorafleet.controllers.adapterdeployment",
        "lorafleet.controllers.resync",
    }


def test_kopf_never_writes_to_objects_and_only_adapter_deletion_needs_a_finalizer() -> None:
    """kopf adds a finalizer for every delete handler, timer and daemon, and patches its own annotations on every
    object it has a create or update handler for (a write per object, and a 409 for our next status write).
    lorafleet's objects are queued from its watch-fed caches instead: kopf registers no handler on them. The only
    finalizer, lorafleet's own, is kept on FineTuneJobs with deletionPolicy: Delete (finalizers without a running
    operator block namespace deletion and uninstall: kopf pitfall 3)."""
    from lorafleet.controllers import finetunejob

    runtime.import_handlers()
    registry = kopf.get_default_registry()
    resource_handlers = [
        *registry._changing.get_all_handlers(),  # kopf has no public listing
        *registry._spawning.get_all_handlers(),
        *registry._watching.get_all_handlers(),
        *registry._indexing.get_all_handlers(),
    ]
    assert resource_handlers == []
    assert [h.id for h in registry._activities.get_all_handlers() if h.id == "resync"], "the startup handler"
    assert finetunejob.RECONCILER.needs_cleanup({"spec": {"output": {"deletionPolicy": "Delete"}}})
    assert not finetunejob.RECONCILER.needs_cleanup({"spec": {"output": {"deletionPolicy": "Retain"}}})
    assert not finetunejob.RECONCILER.needs_cleanup({"spec": {"output": {}}})


def test_json_logs_are_json() -> None:
    root = logging.getLogger()
    before = list(root.handlers), root.level
    try:
        runtime.configure_logging("json")
        added = [h for h in root.handlers if h not in before[0]]
        assert len(added) == 1
        record = logging.LogRecord("lorafleet", logging.WARNING, __file__, 1, "hello %s", ("world",), None)
        line = json.loads(added[0].format(record))
        assert line["message"] == "hello world"
        assert line["severity"] == "warn"
    finally:
        root.handlers[:] = before[0]
        root.setLevel(before[1])


def test_unknown_log_format_is_rejected() -> None:
    with pytest.raises(ValueError, match="LORAFLEET_LOG_FORMAT"):
        runtime.configure_logging("xml")


# --- metrics --------------------------------------------------------------------------------------------------


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(registry=CollectorRegistry())


def value(metrics: Metrics, name: str, **labels: str) -> float:
    assert metrics.registry is not None
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_success_is_counted_and_timed(metrics: Metrics) -> None:
    with observe("BaseModel", metrics):
        pass
    assert value(metrics, "lorafleet_reconcile_total", kind="BaseModel", result="success") == 1
    assert value(metrics, "lorafleet_reconcile_duration_seconds_count", kind="BaseModel") == 1
    assert value(metrics, "lorafleet_reconcile_errors_total", kind="BaseModel", reason="ValueError") == 0


def test_caller_may_name_a_more_specific_result(metrics: Metrics) -> None:
    with observe("AdapterDeployment", metrics) as obs:
        obs.result = "noop"
    assert value(metrics, "lorafleet_reconcile_total", kind="AdapterDeployment", result="noop") == 1
    assert value(metrics, "lorafleet_reconcile_total", kind="AdapterDeployment", result="success") == 0


@pytest.mark.parametrize(
    "exc, result, reason",
    [
        (ValueError("bad"), "error", "ValueError"),
        (ApiException(status=500), "error", "http_500"),
        (kopf.TemporaryError("later", delay=1), "retry", "TemporaryError"),
        (kopf.PermanentError("never"), "permanent_error", "PermanentError"),
    ],
)
def test_failures_are_counted_by_result_and_reason(metrics: Metrics, exc: Exception, result: str, reason: str) -> None:
    with pytest.raises(type(exc)), observe("FineTuneJob", metrics):
        raise exc
    assert value(metrics, "lorafleet_reconcile_total", kind="FineTuneJob", result=result) == 1
    assert value(metrics, "lorafleet_reconcile_errors_total", kind="FineTuneJob", reason=reason) == 1
    assert value(metrics, "lorafleet_reconcile_duration_seconds_count", kind="FineTuneJob") == 1


def test_kopf_errors_from_api_errors_carry_the_http_status(metrics: Metrics) -> None:
    with pytest.raises(kopf.TemporaryError), observe("FineTuneJob", metrics), k8s.temporary_on_conflict():
        raise ApiException(status=409, reason="Conflict")
    assert value(metrics, "lorafleet_reconcile_total", kind="FineTuneJob", result="retry") == 1
    assert value(metrics, "lorafleet_reconcile_errors_total", kind="FineTuneJob", reason="http_409") == 1


def test_decorator_on_sync_and_async_handlers(metrics: Metrics) -> None:
    @observe("BaseModel", metrics)
    def sync_handler(fail: bool) -> str:
        if fail:
            raise RuntimeError("x")
        return "done"

    @observe("BaseModel", metrics)
    async def async_handler() -> str:
        return "done"

    assert sync_handler(False) == "done"
    with pytest.raises(RuntimeError):
        sync_handler(True)
    assert asyncio.run(async_handler()) == "done"
    assert value(metrics, "lorafleet_reconcile_total", kind="BaseModel", result="success") == 2
    assert value(metrics, "lorafleet_reconcile_total", kind="BaseModel", result="error") == 1
    assert value(metrics, "lorafleet_reconcile_duration_seconds_count", kind="BaseModel") == 3


def test_cancellation_is_not_a_reconcile_result(metrics: Metrics) -> None:
    with pytest.raises(asyncio.CancelledError), observe("BaseModel", metrics):
        raise asyncio.CancelledError()
    assert value(metrics, "lorafleet_reconcile_duration_seconds_count", kind="BaseModel") == 0


def test_probe_reports_seconds_since_last_reconcile(metrics: Metrics) -> None:
    assert metrics.seconds_since_last() == {}
    with observe("BaseModel", metrics):
        pass
    ages = metrics.seconds_since_last(now=metrics.last_finished["BaseModel"] + 5)
    assert ages == {"BaseModel": 5.0}


def test_global_metrics_are_registered_once() -> None:
    # Registering the same names again in the global registry would raise: the module must own them.
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics()
    assert observability.METRICS.registry is not None


# --- leader election ------------------------------------------------------------------------------------------
# The election is kubernetes.leaderelection's; these pin our wiring around it: the settings and their checks, the
# Lease's name, namespace and holder, a timeout on every request, network errors as refused attempts (never a dead
# election thread), the exit when the lease is lost, and the release on a graceful stop. A fake CoordinationV1Api
# keeps one Lease in memory with resourceVersion conflicts, like the API server.


class FakeLeaseApi:
    def __init__(self) -> None:
        self.lease: Any = None
        self.calls: list[tuple[str, Any]] = []
        self.fail: Exception | None = None

    def _check(self, name: str, kwargs: dict[str, Any]) -> None:
        self.calls.append((name, kwargs.get("_request_timeout")))
        if self.fail is not None:
            raise self.fail

    @staticmethod
    def _error(status: int, reason: str) -> ApiException:
        error = ApiException(status=status, reason=reason)
        error.body = json.dumps({"code": status, "reason": reason})
        return error

    def read_namespaced_lease(self, name: str, namespace: str, **kwargs: Any) -> Any:
        self._check("read", kwargs)
        if self.lease is None:
            raise self._error(404, "NotFound")
        return copy.deepcopy(self.lease)

    def create_namespaced_lease(self, namespace: str, body: Any, **kwargs: Any) -> Any:
        self._check("create", kwargs)
        if self.lease is not None:
            raise self._error(409, "AlreadyExists")
        body = copy.deepcopy(body)
        name = body.metadata["name"] if isinstance(body.metadata, dict) else body.metadata.name
        body.metadata = client.V1ObjectMeta(name=name, namespace=namespace, resource_version="1")
        self.lease = body
        return copy.deepcopy(body)

    def replace_namespaced_lease(self, name: str, namespace: str, body: Any, **kwargs: Any) -> Any:
        self._check("replace", kwargs)
        if body.metadata.resource_version != self.lease.metadata.resource_version:
            raise self._error(409, "Conflict")
        body = copy.deepcopy(body)
        body.metadata.resource_version = str(int(body.metadata.resource_version) + 1)
        self.lease = body
        return copy.deepcopy(body)


ELECTION_ENV = {"LORAFLEET_LEADER_ELECTION": "true", "LORAFLEET_OPERATOR_NAMESPACE": "ops"}


def candidate(api: FakeLeaseApi, name: str, lost: list[int] | None = None) -> leader.LeaderElector:
    ops = OperatorSettings(leader_election=True, operator_namespace="ops")
    elector = leader.LeaderElector.from_settings(ops, candidate=name)
    elector._on_lost = (lost if lost is not None else []).append
    elector.lock.api_instance._api = api  # the timeout wrapper stays
    return elector


def attempt(elector: leader.LeaderElector) -> bool:
    """One acquire-or-renew round of the library's own loop, without its sleeps."""
    election = LeaderElection(elector.config)
    return bool(election.try_acquire_or_renew())


def test_election_is_off_by_default_with_client_go_timings() -> None:
    ops = OperatorSettings()
    assert ops.leader_election is False, "a lone process (development, tests) must not wait for a lease"
    assert ops.leader_election_lease_name == "lorafleet-operator"
    durations = (ops.leader_election_lease_duration, ops.leader_election_renew_deadline)
    assert durations == (15, 10) and ops.leader_election_retry_period == 2


def test_election_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {**ELECTION_ENV, "LORAFLEET_LEADER_ELECTION_LEASE_DURATION": "6"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LORAFLEET_LEADER_ELECTION_RENEW_DEADLINE", "4")
    monkeypatch.setenv("LORAFLEET_LEADER_ELECTION_RETRY_PERIOD", "1")
    ops = OperatorSettings()
    assert ops.leader_election and ops.operator_namespace == "ops"
    assert (ops.leader_election_lease_duration, ops.leader_election_renew_deadline) == (6, 4)


@pytest.mark.parametrize(
    ("timings", "complaint"),
    [
        ({"leader_election_lease_duration": 10, "leader_election_renew_deadline": 10}, "must exceed"),
        ({"leader_election_renew_deadline": 2, "leader_election_retry_period": 2}, "1.2 x"),
        ({"leader_election_retry_period": 0}, "greater than or equal to 1"),
    ],
)
def test_bad_election_timings_are_rejected_by_name(timings: dict[str, int], complaint: str) -> None:
    # Not the library's sys.exit at startup: a ValidationError naming the setting, like every other setting.
    with pytest.raises(ValidationError, match=complaint):
        OperatorSettings(**timings)  # type: ignore[arg-type]


def test_lock_is_the_named_lease_in_the_operator_namespace_held_by_the_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "lorafleet-7d9f-abcde")
    ops = OperatorSettings(leader_election=True, operator_namespace="lorafleet-system", leader_election_retry_period=3)
    elector = leader.LeaderElector.from_settings(ops)
    assert isinstance(elector.lock, leader.BoundedLeaseLock)
    assert (elector.lock.name, elector.lock.namespace) == ("lorafleet-operator", "lorafleet-system")
    assert elector.identity == "lorafleet-7d9f-abcde"
    config = elector.config
    assert (config.lease_duration, config.renew_deadline, config.retry_period) == (15, 10, 3)


def test_without_a_pod_name_two_processes_on_one_host_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POD_NAME", raising=False)
    assert leader.identity() != leader.identity()


def test_first_candidate_creates_the_lease_and_the_second_waits() -> None:
    api = FakeLeaseApi()
    a, b = candidate(api, "a"), candidate(api, "b")
    assert attempt(a) is True
    assert api.lease.spec.holder_identity == "a" and api.lease.spec.lease_duration_seconds == 15
    assert attempt(b) is False, "the lease is held and has not expired"
    assert api.lease.spec.holder_identity == "a"
    # Every request carried a timeout no longer than a retry period.
    assert api.calls and all(timeout == 2 for _, timeout in api.calls)


def test_network_errors_are_refused_attempts_not_a_dead_election_thread() -> None:
    api = FakeLeaseApi()
    a = candidate(api, "a")
    api.fail = urllib3.exceptions.MaxRetryError(None, "/apis/coordination.k8s.io", "connection refused")  # type: ignore[arg-type]
    assert attempt(a) is False  # the library's own loop retries it
    api.fail = None
    assert attempt(a) is True
    api.fail = TimeoutError("read timed out")
    assert a.lock.update("lorafleet-operator", "ops", a.lock.get_lock_object(api.lease)) is False


def test_losing_the_lease_exits_with_code_1_unless_stopping() -> None:
    lost: list[int] = []
    a = candidate(FakeLeaseApi(), "a", lost)
    a._stopped_leading()  # the library's callback after the renew deadline passed
    a._stopped_leading()
    assert lost == [leader.EXIT_LEASE_LOST] == [1]
    stopping: list[int] = []
    b = candidate(FakeLeaseApi(), "b", stopping)
    b.stopping = True
    b._stopped_leading()
    assert stopping == []


def test_watchdog_exits_when_renewals_stall_past_the_renew_deadline() -> None:
    lost: list[int] = []
    api = FakeLeaseApi()
    a = candidate(api, "a", lost)
    assert attempt(a) is True
    a._started_leading()
    assert leader.LEADING._value.get() == 1  # the gauge on /metrics (prometheus_client has no public getter)
    written = a.lock.last_write
    assert written is not None
    a.check_renewal(written + 9.9)
    assert lost == []
    a.check_renewal(written + 10.1)  # the library's loop may still be inside a request: we do not wait for it
    assert lost == [1]


def test_a_released_lease_is_taken_at_the_next_attempt() -> None:
    api = FakeLeaseApi()
    a, b = candidate(api, "a"), candidate(api, "b")
    assert attempt(a) is True
    a._started_leading()
    assert attempt(b) is False
    a.stop()
    assert api.lease.spec.holder_identity is None
    assert attempt(a) is False, "a released lock never renews again"
    assert attempt(b) is True and api.lease.spec.holder_identity == "b"
    # Releasing what another candidate holds does nothing.
    assert a.lock.release() is False and api.lease.spec.holder_identity == "b"
