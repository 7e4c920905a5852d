"""The session's credential scan (issue 15: "no credential value appears in any status, Event or log line in the
whole test run"). Imported by conftest.py.

After each integration test's body (before its fixtures tear its namespaces down) the scan collects every
credential the session knows of: the MinIO servers' secret and KMS keys, and each value of every Secret in the
session's namespaces (tests' store Secrets, API keys, ...). It then reads the status of every lorafleet object,
every Event and every ConfigMap the operator made in those namespaces. At the end of the session it reads every
operator log (OperatorProcess.started_logs); if any value appeared, it prints where and whose (never the value)
and the session exits with a failure. lorafleet_dev.credential_scan says what is not scanned (values under 8
characters, key ids).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Generator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException
from urllib3.exceptions import HTTPError

from lorafleet import GROUP, VERSION
from lorafleet_dev.credential_scan import Scanner, secret_values
from lorafleet_dev.operator import OperatorProcess
from lorafleet_dev.s3server import S3Server
from lorafleet_dev.testing import ClusterHandle
from tests.integration.conftest import SESSION_PREFIX

SCANNER = Scanner()
PLURALS = ("basemodels", "finetunejobs", "adapterdeployments")


def _ours(obj: dict[str, Any]) -> bool:
    return str((obj.get("metadata") or {}).get("namespace") or "").startswith(SESSION_PREFIX)


def _where(kind: str, obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{kind} {meta.get('namespace')}/{meta.get('name')}"


def scan_cluster(cluster: ClusterHandle) -> None:
    api = cluster.api_client
    core = client.CoreV1Api(api)
    for secret in core.list_secret_for_all_namespaces().items:
        body = api.sanitize_for_serialization(secret)
        if _ours(body):
            for source, value in secret_values(body).items():
                SCANNER.add(source, value)
    custom = client.CustomObjectsApi(api)
    for plural in PLURALS:
        for obj in custom.list_cluster_custom_object(GROUP, VERSION, plural)["items"]:
            if _ours(obj) and obj.get("status"):
                SCANNER.scan(f"{_where(obj.get('kind', plural), obj)} status", json.dumps(obj["status"]))
    for event in core.list_event_for_all_namespaces().items:
        body = api.sanitize_for_serialization(event)
        if _ours(body):
            text = " ".join(str(body.get(k) or "") for k in ("reason", "message", "note"))
            involved = body.get("involvedObject") or {}
            SCANNER.scan(f"{_where('Event', body)} (on {involved.get('kind')} {involved.get('name')})", text)
    made = core.list_config_map_for_all_namespaces(label_selector="app.kubernetes.io/managed-by=lorafleet").items
    for config_map in made:
        body = api.sanitize_for_serialization(config_map)
        if _ours(body):
            SCANNER.scan(_where("ConfigMap", body), json.dumps(body.get("data") or {}))


def _add_servers(funcargs: dict[str, Any]) -> None:
    for name in ("s3_server", "private_s3_server"):
        server = funcargs.get(name)
        if isinstance(server, S3Server):
            SCANNER.add(f"MinIO ({name}) secret key", server.secret_key)
            SCANNER.add(f"MinIO ({name}) KMS key", server.kms_key)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    try:
        return (yield)
    finally:
        funcargs: dict[str, Any] = getattr(item, "funcargs", {})
        _add_servers(funcargs)
        cluster = funcargs.get("cluster")
        if isinstance(cluster, ClusterHandle):
            try:
                scan_cluster(cluster)
            except (ApiException, HTTPError, OSError) as exc:  # a stopped cluster fails its own tests, not this
                warnings.warn(f"credential scan after {item.nodeid} skipped: {exc}", stacklevel=1)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """After every fixture's teardown (each operator has stopped and written its whole log). A failure here is the
    session's own, not a test's: pytest would file a fixture's teardown error under the last test, where an xfail
    mark would swallow it."""
    for path in OperatorProcess.started_logs:
        if path.exists():
            SCANNER.scan_lines(str(path), path.read_text(errors="replace"))
    if not SCANNER.findings:
        return
    report = (
        f"credential scan: values appeared where they must not ({len(SCANNER.values)} values scanned):\n"
        + SCANNER.report()
    )
    terminal = session.config.pluginmanager.get_plugin("terminalreporter")
    if terminal is not None:
        terminal.ensure_newline()
        terminal.write_sep("=", "credential scan FAILED", red=True)
        terminal.write_line(report)
    else:
        print(report)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
