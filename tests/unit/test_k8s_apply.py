"""The pure parts of lorafleet.k8s: what an apply sends, and how API errors become kopf's retry semantics.

Invariants pinned here: an apply configuration never carries status, managedFields, resourceVersion or other
server-owned metadata, nor None values, and cleaning never mutates its input; 409/429/5xx/network errors and
unknown kinds are kopf.TemporaryError with a bounded delay (Retry-After honoured); 403 is a
kopf.PermanentError naming the verb, resource, API group and namespace to grant; 404 and the rest are left
to the caller. Behaviour that needs an API server is left to the integration tests.
"""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import kopf
import pytest
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import exceptions as dynamic_exceptions
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from lorafleet import k8s


def api_error(status: int, message: str = "boom", headers: dict[str, str] | None = None) -> ApiException:
    body = json.dumps({"kind": "Status", "message": message})
    exc = ApiException(status=status, reason="Reason", body=body)
    exc.headers = headers
    return exc


def deployment() -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "vllm",
            "namespace": "team-a",
            "labels": {"app": "vllm"},
            "annotations": None,
            "managedFields": [{"manager": "kubectl"}],
            "resourceVersion": "42",
            "uid": "1234",
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "generation": 3,
        },
        "spec": {"replicas": 2, "template": {"spec": {"nodeName": None, "containers": [{"name": "c"}]}}},
        "status": {"readyReplicas": 1},
    }


# --- clean_for_apply -------------------------------------------------------------------------------------


def test_clean_drops_status_and_server_owned_metadata() -> None:
    cleaned = k8s.clean_for_apply(deployment())
    assert "status" not in cleaned
    assert cleaned["metadata"] == {"name": "vllm", "namespace": "team-a", "labels": {"app": "vllm"}}
    assert cleaned["spec"]["replicas"] == 2


def test_clean_drops_none_values_at_any_depth() -> None:
    cleaned = k8s.clean_for_apply(deployment())
    assert cleaned["spec"]["template"]["spec"] == {"containers": [{"name": "c"}]}


def test_clean_does_not_mutate_its_input() -> None:
    original = deployment()
    before = copy.deepcopy(original)
    cleaned = k8s.clean_for_apply(original)
    cleaned["spec"]["template"]["spec"]["containers"][0]["name"] = "changed"
    assert original == before


def test_clean_keeps_cluster_scoped_objects_and_custom_kinds() -> None:
    crd_obj = {"apiVersion": "lorafleet.io/v1alpha1", "kind": "BaseModel", "metadata": {"name": "m"}}
    assert k8s.clean_for_apply(crd_obj) == crd_obj


@pytest.mark.parametrize(
    "obj, missing",
    [
        ({"kind": "ConfigMap", "metadata": {"name": "x"}}, "apiVersion"),
        ({"apiVersion": "v1", "metadata": {"name": "x"}}, "kind"),
        ({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}, "metadata.name"),
        ({"apiVersion": "v1", "kind": "ConfigMap"}, "metadata.name"),
    ],
)
def test_clean_rejects_objects_without_identity(obj: dict[str, Any], missing: str) -> None:
    with pytest.raises(ValueError, match=missing):
        k8s.clean_for_apply(obj)


# --- error mapping ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [409, 500, 502, 503, 504, 401])
def test_transient_statuses_become_temporary_errors(status: int) -> None:
    mapped = k8s.to_kopf_error(api_error(status, "try later"))
    assert isinstance(mapped, kopf.TemporaryError)
    assert mapped.delay is not None and 1 <= mapped.delay <= k8s.MAX_RETRY_AFTER
    assert "try later" in str(mapped)


def test_conflict_retries_quickly() -> None:
    mapped = k8s.to_kopf_error(api_error(409))
    assert isinstance(mapped, kopf.TemporaryError)
    assert mapped.delay == k8s.CONFLICT_DELAY


@pytest.mark.parametrize(
    "headers, delay",
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": "0"}, 1.0),
        ({"Retry-After": "100000"}, k8s.MAX_RETRY_AFTER),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, k8s.THROTTLE_DELAY),
        (None, k8s.THROTTLE_DELAY),
    ],
)
def test_throttling_honours_retry_after(headers: dict[str, str] | None, delay: float) -> None:
    mapped = k8s.to_kopf_error(api_error(429, "slow down", headers))
    assert isinstance(mapped, kopf.TemporaryError)
    assert mapped.delay == delay


def test_forbidden_names_the_missing_rbac_rule() -> None:
    message = (
        'deployments.apps "vllm" is forbidden: User "system:serviceaccount:lorafleet-system:lorafleet" '
        'cannot patch resource "deployments" in API group "apps" in the namespace "team-a"'
    )
    mapped = k8s.to_kopf_error(api_error(403, message))
    assert isinstance(mapped, kopf.PermanentError)
    text = str(mapped)
    assert '"patch"' in text and '"deployments"' in text and '"apps"' in text and '"team-a"' in text
    assert 'verbs: ["patch"]' in text


def test_forbidden_core_group_cluster_scope_and_subresource() -> None:
    message = (
        'User "system:serviceaccount:x:y" cannot update resource "basemodels/status" in API group '
        '"lorafleet.io" at the cluster scope'
    )
    text = k8s.forbidden_message(api_error(403, message))
    assert '"basemodels/status"' in text and "cluster-wide" in text and '"update"' in text

    core = 'User "u" cannot list resource "pods" in API group "" in the namespace "ns"'
    assert '(API group "core")' in k8s.forbidden_message(api_error(403, core))


def test_forbidden_without_rbac_text_still_says_rbac() -> None:
    mapped = k8s.to_kopf_error(ApiException(status=403, reason="Forbidden"))
    assert isinstance(mapped, kopf.PermanentError)
    assert "RBAC" in str(mapped)


@pytest.mark.parametrize("status", [400, 422])
def test_invalid_objects_are_permanent(status: int) -> None:
    mapped = k8s.to_kopf_error(api_error(status, "spec.replicas: Invalid value: -1"))
    assert isinstance(mapped, kopf.PermanentError)
    assert "spec.replicas" in str(mapped)


@pytest.mark.parametrize("status", [404, 410])
def test_other_statuses_are_left_to_the_caller(status: int) -> None:
    assert k8s.to_kopf_error(api_error(status)) is None


def test_dynamic_client_errors_map_like_plain_ones() -> None:
    # The DynamicClient re-raises ApiException as its own subclasses (ConflictError, ForbiddenError, ...).
    try:
        raise api_error(409, "the object has been modified")
    except ApiException as exc:
        to_dynamic: Any = dynamic_exceptions.api_exception  # untyped library function
        dynamic = to_dynamic(exc)
    assert isinstance(dynamic, dynamic_exceptions.ConflictError)
    assert isinstance(k8s.to_kopf_error(dynamic), kopf.TemporaryError)


def test_unknown_kind_and_network_errors_are_transient() -> None:
    unknown = k8s.to_kopf_error(ResourceNotFoundError("No matches found for {'kind': 'BaseModel'}"))
    assert isinstance(unknown, kopf.TemporaryError) and "CRD" in str(unknown)
    network = k8s.to_kopf_error(urllib3.exceptions.ProtocolError("connection reset"))
    assert isinstance(network, kopf.TemporaryError)


def test_unrelated_exceptions_are_not_classified() -> None:
    assert k8s.to_kopf_error(KeyError("x")) is None


# --- temporary_on_conflict -------------------------------------------------------------------------------


def test_context_manager_converts_and_chains() -> None:
    original = api_error(409)
    with pytest.raises(kopf.TemporaryError) as info, k8s.temporary_on_conflict():
        raise original
    assert info.value.__cause__ is original


def test_context_manager_lets_unclassified_errors_through() -> None:
    with pytest.raises(KeyError), k8s.temporary_on_conflict():
        raise KeyError("x")
    with k8s.temporary_on_conflict():
        pass


def test_decorator_on_sync_and_async_functions() -> None:
    @k8s.temporary_on_conflict()
    def sync_fn(status: int) -> str:
        if status:
            raise api_error(status)
        return "ok"

    @k8s.temporary_on_conflict()
    async def async_fn(status: int) -> str:
        if status:
            raise api_error(status)
        return "ok"

    assert sync_fn(0) == "ok"
    assert sync_fn.__name__ == "sync_fn"
    with pytest.raises(kopf.TemporaryError):
        sync_fn(503)
    assert asyncio.run(async_fn(0)) == "ok"
    with pytest.raises(kopf.PermanentError):
        asyncio.run(async_fn(403))
