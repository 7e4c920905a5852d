"""Running the operator: kopf settings, logging, metrics, liveness, leader election, and the handler modules.

`kopf_settings(ops)` is the whole kopf configuration as data (unit-tested); `configure()` applies it and runs
both before `kopf.run` (our own entry point) and in the startup handler (so `kopf run -m ...` gets it too).
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import sys
from typing import Any

import kopf
from kubernetes.config.config_exception import ConfigException

from lorafleet import FINALIZER, GROUP, __version__, k8s
from lorafleet.config import OperatorSettings
from lorafleet.controllers import leader, observability
from lorafleet.storage.scrub import install_log_filter

logger = logging.getLogger(__name__)

HANDLER_MODULES = (
    "lorafleet.controllers.basemodel",
    "lorafleet.controllers.finetunejob",
    "lorafleet.controllers.adapterdeployment",
    "lorafleet.controllers.resync",
)

DIFFBASE_KEY = "last-handled-configuration"
PEERING_NAME = "lorafleet"
MAX_WORKERS = 16  # sync handlers (blocking API calls) share this thread pool

# Watch timeouts: the server ends each watch after WATCH_SERVER_TIMEOUT s and kopf re-lists, so a silently
# frozen stream (kopf 585, 1276) lasts at most WATCH_CLIENT_TIMEOUT s. The server's timeoutSeconds must be
# an integer: kopf sends str(value), and "300.0" is rejected.
WATCH_SERVER_TIMEOUT = 300
WATCH_CLIENT_TIMEOUT = 330.0
CONNECT_TIMEOUT = 30.0
REQUEST_TIMEOUT = 60.0

LOG_FORMATS = ("json", "text")


def kopf_settings(ops: OperatorSettings, *, instance: str = "lorafleet") -> dict[str, Any]:
    """The kopf settings to apply, as {"section.attribute": value}; `instance` names this replica in Events.

    Every name kopf would write into the cluster is moved from kopf.zalando.org to our group.
    """
    return {
        # Annotations, not status.kopf: structural schemas prune unknown status fields (kopf PR 527).
        # v1=False: a new operator has no legacy v1 keys to read, so write only one set of annotations.
        "persistence.progress_storage": kopf.AnnotationsProgressStorage(prefix=GROUP, v1=False),
        "persistence.diffbase_storage": kopf.AnnotationsDiffBaseStorage(prefix=GROUP, key=DIFFBASE_KEY, v1=False),
        "persistence.finalizer": FINALIZER,
        # Standalone: peering is not leader election (docs/peering.rst). Several replicas elect one leader on a
        # Lease (lorafleet.controllers.leader) and only the leader runs kopf; the name is ours in case someone
        # turns peering on.
        "peering.standalone": True,
        "peering.name": PEERING_NAME,
        "peering.mandatory": False,
        "watching.server_timeout": WATCH_SERVER_TIMEOUT,
        "watching.client_timeout": WATCH_CLIENT_TIMEOUT,
        "watching.connect_timeout": CONNECT_TIMEOUT,
        "networking.connect_timeout": CONNECT_TIMEOUT,
        "networking.request_timeout": REQUEST_TIMEOUT,
        # Events for warnings and errors only: an Event per successful handler floods `kubectl describe`;
        # progress belongs in status conditions.
        "posting.level": logging.WARNING,
        "posting.reporting_component": "lorafleet-operator",
        "posting.reporting_instance": instance,
        "posting.event_name_prefix": "lorafleet-event-",
        "execution.max_workers": MAX_WORKERS,
    }


def configure(settings: kopf.OperatorSettings, ops: OperatorSettings, *, instance: str | None = None) -> None:
    """Apply `kopf_settings(ops)` to kopf's settings object."""
    for path, value in kopf_settings(ops, instance=instance or _instance_name()).items():
        section_name, attribute = path.split(".", 1)
        section = getattr(settings, section_name)
        if not hasattr(section, attribute):  # a kopf upgrade renamed it: fail loudly, not silently ignore
            raise AttributeError(f"kopf settings have no {path}")
        setattr(section, attribute, value)


def _instance_name() -> str:
    # The pod name (HOSTNAME in a pod) tells which replica posted an Event.
    return os.environ.get("POD_NAME") or socket.gethostname() or "lorafleet"


def liveness_endpoint(ops: OperatorSettings) -> str:
    return f"http://0.0.0.0:{ops.health_port}/healthz"


def configure_logging(log_format: str) -> None:
    """Root logging via kopf's formatters: JSON (python-json-logger) or kopf's text format."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"LORAFLEET_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    if log_format == "json":
        # log_prefix=False: the object reference goes into the "object" field, not the message.
        kopf.configure(log_format=kopf.LogFormat.JSON, log_prefix=False)
    else:
        kopf.configure(log_format=kopf.LogFormat.FULL, log_prefix=True)
    install_log_filter()  # store errors may carry credential values: no log line does


def _ops_from(memo: Any) -> OperatorSettings:
    ops = memo.get("ops") if hasattr(memo, "get") else None
    return ops if isinstance(ops, OperatorSettings) else OperatorSettings()


@kopf.on.startup()
def _startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    ops = _ops_from(memo)
    configure(settings, ops)
    if observability.start_metrics_server(ops.metrics_port):
        logger.info(f"serving metrics on :{ops.metrics_port}/metrics")


@kopf.on.probe(id="reconciles")
def _probe_reconciles(**_: Any) -> dict[str, float]:
    # Seconds since each kind last finished a reconcile: a value growing past the resync period on a
    # busy cluster points at a frozen watch, which the event loop's own liveness cannot show.
    return observability.METRICS.seconds_since_last()


@kopf.on.probe(id="version")
def _probe_version(**_: Any) -> str:
    return __version__


def import_handlers(modules: tuple[str, ...] = HANDLER_MODULES) -> None:
    """Import the handler modules, which register their handlers with kopf's default registry."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                message = f"handler module {name} is missing; the operator cannot run without it"
                raise RuntimeError(message) from exc
            raise RuntimeError(f"handler module {name} cannot be imported: {exc}") from exc


def run() -> int:
    """Run the operator until SIGTERM/SIGINT; the exit code for the CLI."""
    ops = OperatorSettings()
    try:
        configure_logging(ops.log_format)
        # Before the handler modules: they may build clients at import time.
        k8s.load_client_config()
        import_handlers()
    except ConfigException as exc:
        print(f"lorafleet operator: no Kubernetes credentials (in-cluster or KUBECONFIG): {exc}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as exc:
        print(f"lorafleet operator: {exc}", file=sys.stderr)
        return 2
    elector = campaign(ops) if ops.leader_election else None
    settings = kopf.OperatorSettings()
    configure(settings, ops)
    namespaces = list(ops.namespaces)
    logger.info(
        "starting lorafleet operator %s (%s)",
        __version__,
        f"namespaces {', '.join(namespaces)}" if namespaces else "cluster-wide",
    )
    kopf.run(
        settings=settings,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=liveness_endpoint(ops),
        memo=kopf.Memo(ops=ops),
    )
    if elector is not None:  # kopf stopped on SIGTERM/SIGINT: hand the lease to a standby now
        elector.stop()
    return 0


def campaign(ops: OperatorSettings) -> leader.LeaderElector:
    """Block until this process holds the Lease, answering /healthz as a standby meanwhile.

    Once it returns, the election thread keeps renewing, and exits the process (code 1) if the Lease is lost.
    """
    elector = leader.LeaderElector.from_settings(ops)
    # /metrics from the start (lorafleet_leader 0), so a scrape of a standby succeeds; the startup handler finds
    # it already served once this process leads.
    observability.start_metrics_server(ops.metrics_port)
    standby = leader.StandbyHealth(ops.health_port)
    standby.start()
    try:
        elector.start()
        logger.info(
            "standby until %s holds the lease %s/%s",
            elector.identity,
            ops.operator_namespace,
            ops.leader_election_lease_name,
        )
        elector.wait_leading()
    finally:
        standby.stop()  # kopf's liveness endpoint takes the port over
    return elector
