"""The operator's kopf configuration and its reconcile metrics.

Invariants pinned here: after configure() no kopf.zalando.org name is left anywhere in kopf's settings (the
finalizer, the progress and diff-base annotations are all under lorafleet.io); progress is kept in
annotations, never in status.kopf (pruned by structural schemas); watches have integer server timeouts and
a longer client timeout; every setting we name exists in kopf; a missing handler module is a clear error.
observe(kind) counts every reconcile once with its result, times it, and counts failures by reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Iterator
from typing import Any

import kopf
import pytest
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry

from lorafleet import k8s
from lorafleet.config import OperatorSettings
from lorafleet.controllers import observability, runtime
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


def test_only_adapter_deletion_puts_a_finalizer_on_objects() -> None:
    """Finalizers without a running operator block namespace deletion and uninstall (kopf pitfall 3); kopf adds
    one for every delete handler, timer and daemon. The only one allowed cleans the store for FineTuneJobs with
    deletionPolicy: Delete, and its filter keeps it off every other object."""
    from lorafleet.controllers import finetunejob

    runtime.import_handlers()
    registry = kopf.get_default_registry()
    handlers = [
        *registry._changing.get_all_handlers(),  # kopf has no public listing
        *registry._spawning.get_all_handlers(),
    ]
    assert handlers, "the handler modules registered nothing"
    finalizing = [h for h in handlers if getattr(h, "requires_finalizer", False)]
    assert [h.id for h in finalizing] == ["delete-adapter"]
    assert finalizing[0].when is finetunejob._deletes_its_adapter
    assert finetunejob._deletes_its_adapter(spec={"output": {"deletionPolicy": "Delete"}})
    assert not finetunejob._deletes_its_adapter(spec={"output": {"deletionPolicy": "Retain"}})
    assert not finetunejob._deletes_its_adapter(spec={"output": {}})


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
