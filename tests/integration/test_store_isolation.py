"""Stores and tenants, on the real API server and MinIO: a credential value never reaches a status condition, an
Event or a log line, whatever botocore copies into its messages (a wrong secret: SignatureDoesNotMatch; a key with
a newline: http.client's "Invalid header value"), and a store that names no credentials is reached unsigned,
never with the process's own keys."""

from __future__ import annotations

import socket
import uuid
from dataclasses import replace
from typing import Any

import pytest
from kubernetes import client

from lorafleet.storage import ArtifactStore, BadCredentials, StoreError, StoreSettings, VersionFolder
from lorafleet_dev.s3server import S3Server
from lorafleet_dev.testing import ClusterHandle
from tests.integration.operator_fixtures import MODEL_URI, Custom, OperatorProcess, condition
from tests.unit import objects

pytestmark = pytest.mark.integration


def _unique(label: str) -> str:
    return f"{label}{uuid.uuid4().hex}"


def _read_error(settings: StoreSettings, uri: str) -> StoreError:
    with pytest.raises(StoreError) as caught:
        ArtifactStore(replace(settings, max_attempts=1)).read_manifest(VersionFolder.parse(uri))
    return caught.value


def test_botocore_messages_carry_no_credential(store_settings: StoreSettings, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/a/v1"
    wrong = f"{_unique('wrongFIRST')}\n{_unique('SECOND')}"
    error = _read_error(replace(store_settings, secret_access_key=wrong), uri)
    assert isinstance(error, BadCredentials) and "SignatureDoesNotMatch" in str(error)
    for line in wrong.splitlines():
        assert line not in str(error)

    key_id = f"{_unique('idFIRST')}\n{_unique('idSECOND')}"
    error = _read_error(replace(store_settings, access_key_id=key_id), uri)
    for line in key_id.splitlines():
        assert line not in str(error), str(error)
    assert "Invalid header value" in str(error)  # botocore's own message, scrubbed, still says what failed

    token = f"{_unique('tokFIRST')}\n{_unique('tokSECOND')}"
    error = _read_error(replace(store_settings, session_token=token), uri)
    for line in token.splitlines():
        assert line not in str(error), str(error)


def test_a_store_without_credentials_is_reached_unsigned(
    store_settings: StoreSettings, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The process's own environment holds valid keys: a store naming none must not use them.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", str(store_settings.access_key_id))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", str(store_settings.secret_access_key))
    anonymous = replace(store_settings, access_key_id=None, secret_access_key=None, anonymous=True)
    error = _read_error(anonymous, f"s3://{s3_bucket}/a/v1")
    assert isinstance(error, BadCredentials), error  # AccessDenied: MinIO saw no signature


def _secret(cluster: ClusterHandle, namespace: str, name: str, data: dict[str, str]) -> None:
    body = client.V1Secret(metadata=client.V1ObjectMeta(name=name), string_data=data)
    cluster.core.create_namespaced_secret(namespace, body)


def _events_text(cluster: ClusterHandle, namespace: str) -> str:
    return "\n".join(str(e.message) for e in cluster.core.list_namespaced_event(namespace).items)


def test_no_credential_in_status_events_or_logs(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, s3_server: S3Server
) -> None:
    settings: StoreSettings = s3_server.store_settings()
    wrong_secret = f"{_unique('leakFIRST')}\n{_unique('leakSECOND')}"
    # Not the real key id on the first line: the operator would redact it (here, "lorafleet") from then on.
    newline_id = f"{_unique('idFIRST')}\n{_unique('idleak')}"
    _secret(cluster, namespace, "wrong-secret", {"id": str(settings.access_key_id), "secret": wrong_secret})
    _secret(cluster, namespace, "newline-id", {"id": newline_id, "secret": str(settings.secret_access_key)})
    custom = Custom(cluster, namespace)
    for name, secret in (("wrong-secret", "wrong-secret"), ("newline-id", "newline-id")):
        bm: dict[str, Any] = objects.base_model()
        bm["metadata"] = {"name": name, "namespace": namespace}
        store = {
            "endpoint": s3_server.endpoint,
            "credentialsSecretRef": {"name": secret, "accessKeyIdKey": "id", "secretAccessKeyKey": "secret"},
        }
        bm["spec"] = {**bm["spec"], "source": {"uri": MODEL_URI, "store": store}}
        custom.create(bm)
    statuses = [
        custom.wait_status(
            "BaseModel",
            name,
            lambda s, o: (condition(s, "Ready") or {}).get("reason") == "StoreUnavailable",
            timeout=60,
            what=f"{name}: the store's refusal as a condition",
        )
        for name in ("wrong-secret", "newline-id")
    ]
    texts = [repr(s["status"]) for s in statuses] + [_events_text(cluster, namespace), operator.log_tail(2000)]
    assert "SignatureDoesNotMatch" in texts[0]
    assert "Invalid header value" in texts[1] and "[REDACTED]" in texts[1]  # botocore did copy the value
    for value in (wrong_secret, newline_id):
        for line in value.splitlines():
            for text in texts:
                assert line not in text


def test_a_secret_is_never_sent_to_an_endpoint_the_platform_does_not_allow(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str
) -> None:
    """A tenant naming a Secret of its namespace and its own endpoint: a StoreNotAllowed condition naming the
    field and the fix, the Secret unread, and no connection at all to that endpoint."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.5)
    value = _unique("exfiltrate")
    _secret(cluster, namespace, "someone-elses", {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": value})
    bm: dict[str, Any] = objects.base_model()
    bm["metadata"] = {"name": "exfil", "namespace": namespace}
    store = {
        "endpoint": f"http://127.0.0.1:{listener.getsockname()[1]}",
        "credentialsSecretRef": {"name": "someone-elses"},
    }
    bm["spec"] = {**bm["spec"], "source": {"uri": MODEL_URI, "store": store}}
    try:
        Custom(cluster, namespace).create(bm)
        refused = Custom(cluster, namespace).wait_status(
            "BaseModel",
            "exfil",
            lambda s, o: (condition(s, "Ready") or {}).get("reason") == "StoreNotAllowed",
            timeout=60,
            what="the store refused as StoreNotAllowed",
        )
        message = (condition(refused["status"], "Ready") or {}).get("message", "")
        assert "is not an endpoint where the platform allows" in message and "allowedEndpoints" in message
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody ever connected
    finally:
        listener.close()
