"""What each of lorafleet's identities may do, asked of the real API server's authorizer (SubjectAccessReview, what
`kubectl auth can-i --as` asks): the operator with the chart's RBAC, a trainer with the Role the operator hands it,
and a serving replica.

Invariants: the operator may read pods but patch none (no cluster-wide `pods patch`), reads Secrets by name only and
only in its own namespace and the namespaces the Helm value rbac.secretNamespaces lists (not in an unlisted one, not
even a watched one), writes Secrets (minted keys) only with the Helm value rbac.mintSecrets (on by default with
artifactStore.sts.enabled) and only where rbac.secretNamespaces lists, and may grant the trainer's Role (it creates
it here, impersonated: escalation prevention passes); a trainer may patch its own progress ConfigMap and nothing
else (no pod, no other ConfigMap, no Secret, not even a read); a serving replica runs as its namespace's default
ServiceAccount with no token mounted, and that account may do nothing of note.
In namespaced mode the operator has no right at all outside the namespaces it watches.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient as _DynamicClient

from lorafleet.config import OperatorSettings
from lorafleet.controllers import adapterdeployment as ad_controller
from lorafleet.resources import adapterdeployment as ad_res
from lorafleet.resources import finetunejob as ftj_res
from lorafleet_dev.testing import ClusterHandle, wait_until
from tests.integration.test_chart_render import render
from tests.unit import objects

Obj = dict[str, Any]
DynamicClient: Any = _DynamicClient  # the client library is untyped
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


@dataclass(frozen=True)
class Ask:
    """One row: may `verb` `resource` (`name`) in `namespace`? `namespace` "tenant" or "other" is filled in."""

    why: str
    verb: str
    resource: str
    allowed: bool
    name: str | None = None
    group: str = ""
    subresource: str | None = None
    namespace: str = "tenant"


def _user(namespace: str, account: str) -> tuple[str, list[str]]:
    return (
        f"system:serviceaccount:{namespace}:{account}",
        ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
    )


def can(cluster: ClusterHandle, who: tuple[str, list[str]], ask: Ask, namespaces: dict[str, str]) -> bool:
    attributes = client.V1ResourceAttributes(
        verb=ask.verb,
        group=ask.group,
        resource=ask.resource,
        subresource=ask.subresource,
        name=ask.name,
        namespace=namespaces[ask.namespace] or None,
    )
    body = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(user=who[0], groups=who[1], resource_attributes=attributes)
    )
    review = client.AuthorizationV1Api(cluster.api_client).create_subject_access_review(body)
    return review.status is not None and bool(review.status.allowed)


def check_table(
    cluster: ClusterHandle, who: tuple[str, list[str]], table: list[Ask], namespaces: dict[str, str]
) -> None:
    wrong = [
        f"{'may' if not ask.allowed else 'may not'} {ask.verb} {ask.resource} {ask.name or ''}: {ask.why}"
        for ask in table
        if can(cluster, who, ask, namespaces) != ask.allowed
    ]
    assert not wrong, f"{who[0]}:\n" + "\n".join(wrong)


def wait_in_effect(
    cluster: ClusterHandle, who: tuple[str, list[str]], asks: list[Ask], namespaces: dict[str, str]
) -> None:
    """The authorizer's RBAC cache holds every new binding (each granted row below waits for its own)."""
    wait_until(
        lambda: all(can(cluster, who, ask, namespaces) for ask in asks), timeout=30, what="the chart's RBAC in effect"
    )


def _impersonating(cluster: ClusterHandle, user: str) -> client.ApiClient:
    api = client.ApiClient(cluster.api_client.configuration)
    api.default_headers["Impersonate-User"] = user  # the API server adds a ServiceAccount's groups
    return api


def _create(api: client.ApiClient, obj: Obj) -> None:
    resource = DynamicClient(api).resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    resource.create(body=obj, namespace=obj["metadata"].get("namespace"))


def install(cluster: ClusterHandle, docs: list[Obj]) -> list[Obj]:
    """The chart's RBAC objects (its operator never runs here: the authorizer is what is asked)."""
    rbac = [d for d in docs if d["kind"] in RBAC_KINDS]
    for doc in rbac:
        _create(cluster.api_client, doc)
    return rbac


def account(docs: list[Obj]) -> str:
    """The operator's ServiceAccount, as the chart names it."""
    (sa,) = [d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"]
    return str(sa)


def uninstall(cluster: ClusterHandle, docs: list[Obj]) -> None:
    """Cluster-scoped objects (the namespaced ones go with their namespace)."""
    dynamic = DynamicClient(cluster.api_client)
    for doc in docs:
        if doc["kind"].startswith("Cluster"):
            try:
                dynamic.resources.get(api_version=doc["apiVersion"], kind=doc["kind"]).delete(doc["metadata"]["name"])
            except ApiException as exc:
                if exc.status != 404:
                    raise


@pytest.fixture
def chart_rbac(cluster: ClusterHandle, namespace: str, tenant: str) -> Iterator[str]:
    """The chart's RBAC (cluster-wide mode, Secrets in `tenant`) for a release of its own; yields the operator's
    ServiceAccount."""
    release = f"lf-rbac-{uuid.uuid4().hex[:6]}"
    values = {"rbac": {"secretNamespaces": [tenant]}}
    docs = install(cluster, render(values, release=release, namespace=namespace))
    yield account(docs)
    uninstall(cluster, docs)


def trainer_objects(tenant: str, job: str) -> list[Obj]:
    """The progress ConfigMap and RBAC the operator renders for a FineTuneJob (no owner: none exists here, and the
    garbage collector would delete children of a missing owner)."""
    ftj = objects.as_fine_tune_job(objects.fine_tune_job(name=job, namespace=tenant))
    built = [ftj_res.build_progress_config_map(ftj), *ftj_res.build_progress_rbac(ftj)]
    out = []
    for obj in built:
        obj = copy.deepcopy(obj)
        obj["metadata"].pop("ownerReferences", None)
        out.append(obj)
    return out


@pytest.fixture
def tenant(cluster: ClusterHandle, namespace: str) -> Iterator[str]:
    name = f"{namespace[:50]}-t"
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    cluster.core.delete_namespace(name, propagation_policy="Background")


def test_rbac_tables_of_operator_trainer_and_serving(
    cluster: ClusterHandle, chart_rbac: str, namespace: str, tenant: str
) -> None:
    operator = _user(namespace, chart_rbac)
    names = ftj_res.names("tune")
    other = ftj_res.names("other-tune")

    # The operator creates the trainer's ConfigMap, ServiceAccount, Role and RoleBinding: RBAC refuses a Role
    # that grants more than its creator holds, so this passing is part of the table.
    namespaces = {"tenant": tenant, "own": namespace, "other": "default", "": ""}
    wait_in_effect(cluster, operator, [
        Ask("ClusterRoleBinding", "create", "configmaps", True),
        Ask("RoleBinding <name>-secrets in the tenant", "get", "secrets", True, name="x"),
        Ask("RoleBinding <name>-secrets in its own namespace", "get", "secrets", True, name="x", namespace="own"),
    ], namespaces)  # fmt: skip
    as_operator = _impersonating(cluster, operator[0])
    for obj in [*trainer_objects(tenant, "tune"), *trainer_objects(tenant, "other-tune")]:
        _create(as_operator, obj)

    check_table(cluster, operator, [
        Ask("reads trainer and serving pods into its cache", "get", "pods", True),
        Ask("reads trainer and serving pods into its cache", "list", "pods", True),
        Ask("reads trainer and serving pods into its cache", "watch", "pods", True),
        Ask("no pod nudge any more: the kubelet refreshes ConfigMap volumes", "patch", "pods", False),
        Ask("pods are the Job's and Deployment's business", "create", "pods", False),
        Ask("pods are the Job's and Deployment's business", "delete", "pods", False),
        Ask("never runs code in a pod", "create", "pods", False, subresource="exec"),
        Ask("pod status is the kubelet's", "patch", "pods", False, subresource="status"),
        Ask("store credentials, by name, in a namespace rbac.secretNamespaces lists", "get", "secrets", True,
            name="team-store"),
        Ask("its own namespace: ClusterArtifactStores' and the default store's Secrets", "get", "secrets", True,
            name="platform-store", namespace="own"),
        Ask("its own namespace: read only", "patch", "secrets", False, name="platform-store", namespace="own"),
        Ask("a namespace rbac.secretNamespaces does not list", "get", "secrets", False, name="team-store",
            namespace="other"),
        Ask("Secrets by name only", "list", "secrets", False),
        Ask("Secrets by name only", "watch", "secrets", False),
        Ask("never writes a Secret", "create", "secrets", False),
        Ask("never writes a Secret", "patch", "secrets", False),
        Ask("trainer config, progress and desired-set ConfigMaps", "patch", "configmaps", True),
        Ask("never mints tokens", "create", "serviceaccounts", False, subresource="token"),
        Ask("no RBAC escalation", "escalate", "roles", False, group="rbac.authorization.k8s.io"),
        Ask("no RBAC escalation", "bind", "roles", False, group="rbac.authorization.k8s.io"),
        Ask("never deletes a tenant's objects", "delete", "finetunejobs", False, group="lorafleet.io"),
        Ask("writes status", "patch", "finetunejobs", True, group="lorafleet.io", subresource="status"),
        Ask("no cluster-wide writes of note", "create", "clusterroles", False,
            group="rbac.authorization.k8s.io", namespace=""),
        Ask("no nodes", "patch", "nodes", False, namespace=""),
    ], namespaces)  # fmt: skip

    check_table(cluster, _user(tenant, names.service_account), [
        Ask("posts its progress", "patch", "configmaps", True, name=names.progress),
        Ask("write only: it never reads progress back", "get", "configmaps", False, name=names.progress),
        Ask("any other ConfigMap", "patch", "configmaps", False, name="team-settings"),
        Ask("another job's progress", "patch", "configmaps", False, name=other.progress),
        Ask("resourceNames cannot restrict create", "create", "configmaps", False),
        Ask("no listing", "list", "configmaps", False),
        Ask("no pods (the old progress annotation)", "patch", "pods", False, name="tune-train-abcde"),
        Ask("no pods", "get", "pods", False),
        Ask("no Secrets", "get", "secrets", False, name="team-store"),
        Ask("no Secrets", "list", "secrets", False),
        Ask("its own status is the operator's", "patch", "finetunejobs", False, group="lorafleet.io",
            subresource="status"),
        Ask("no tokens for other accounts", "create", "serviceaccounts", False, subresource="token"),
    ], namespaces)  # fmt: skip

    # A serving replica: no account of its own, no token (so the table below is only what a token would get).
    ad = objects.adapter_deployment_obj(objects.adapter_deployment(namespace=tenant))
    settings = OperatorSettings(store_endpoint="http://minio:9000", store_uri="s3://lorafleet")
    base = objects.as_base_model(objects.ready(objects.base_model(namespace=tenant)))
    children, error = ad_controller.plan(ad, base, {}, settings)
    assert error is None and children is not None
    pod = next(c for c in children if c["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod
    check_table(cluster, _user(tenant, "default"), [
        Ask("the desired set comes through a volume", "get", "configmaps", False, name=ad_res.names(ad.name).adapters),
        Ask("no pods", "get", "pods", False),
        Ask("no pods", "patch", "pods", False),
        Ask("no Secrets (API keys come through a volume)", "get", "secrets", False),
        Ask("no status", "patch", "adapterdeployments", False, group="lorafleet.io", subresource="status"),
    ], namespaces)  # fmt: skip


def test_namespaced_operator_has_no_rights_outside_its_namespaces(
    cluster: ClusterHandle, namespace: str, tenant: str
) -> None:
    release = f"lf-rbac-{uuid.uuid4().hex[:6]}"
    docs = install(
        cluster,
        render(
            {"watchNamespaces": [tenant], "rbac": {"clusterDiscovery": False}}, release=release, namespace=namespace
        ),
    )
    try:
        operator = _user(namespace, account(docs))
        elsewhere = {"tenant": tenant, "own": namespace, "other": "default", "": ""}
        wait_in_effect(cluster, operator, [
            Ask("RoleBinding in the watched namespace", "watch", "pods", True),
            Ask("RoleBinding <name>-secrets in its own namespace", "get", "secrets", True, name="x", namespace="own"),
        ], elsewhere)  # fmt: skip
        check_table(cluster, operator, [
            Ask("watched but not in rbac.secretNamespaces: no Secret", "get", "secrets", False, name="team-store"),
            Ask("its own namespace: Secrets by name", "get", "secrets", True, name="platform-store", namespace="own"),
            Ask("watched namespace: pods into its cache", "watch", "pods", True),
            Ask("watched namespace: still no pod patch", "patch", "pods", False),
            Ask("elsewhere: no Secret", "get", "secrets", False, name="team-store", namespace="other"),
            Ask("elsewhere: no pods", "list", "pods", False, namespace="other"),
            Ask("elsewhere: no ConfigMaps", "patch", "configmaps", False, namespace="other"),
        ], elsewhere)  # fmt: skip
    finally:
        uninstall(cluster, docs)


@pytest.mark.parametrize(
    "values",
    [
        {"rbac": {}, "artifactStore": {"sts": {"enabled": True}}},
        {"rbac": {"mintSecrets": True}},  # a ClusterArtifactStore's spec.sts without the default store's STS
    ],
    ids=["artifactStore.sts", "rbac.mintSecrets"],
)
def test_minted_secrets_are_written_only_where_listed(
    cluster: ClusterHandle, namespace: str, tenant: str, values: dict[str, Any]
) -> None:
    """rbac.mintSecrets (on by default with artifactStore.sts): the operator writes Secrets (minted keys) in the
    namespaces rbac.secretNamespaces lists, never in its own (the platform's keys live there) nor in an unlisted
    one."""
    release = f"lf-rbac-{uuid.uuid4().hex[:6]}"
    values = copy.deepcopy(values)
    values["rbac"]["secretNamespaces"] = [tenant]
    docs = install(cluster, render(values, release=release, namespace=namespace))
    try:
        operator = _user(namespace, account(docs))
        where = {"tenant": tenant, "own": namespace, "other": "default", "": ""}
        wait_in_effect(cluster, operator, [
            Ask("RoleBinding <name>-secrets in the tenant", "create", "secrets", True),
            Ask("RoleBinding <name>-secrets in its own namespace", "get", "secrets", True, name="x", namespace="own"),
        ], where)  # fmt: skip
        check_table(cluster, operator, [
            Ask("listed: mints a workload's keys", "patch", "secrets", True, name="tune-store"),
            Ask("listed: removes them once the job has finished", "delete", "secrets", True, name="tune-store"),
            Ask("listed: still never lists", "list", "secrets", False),
            Ask("its own namespace: never writes the platform's keys", "patch", "secrets", False,
                name="platform-store", namespace="own"),
            Ask("its own namespace: never creates", "create", "secrets", False, namespace="own"),
            Ask("unlisted: no write", "create", "secrets", False, namespace="other"),
            Ask("unlisted: no read", "get", "secrets", False, name="tune-store", namespace="other"),
        ], where)  # fmt: skip
    finally:
        uninstall(cluster, docs)


def test_without_mint_secrets_no_secret_is_written(cluster: ClusterHandle, namespace: str, tenant: str) -> None:
    """rbac.mintSecrets: false (here over artifactStore.sts): the operator still reads Secrets by name where listed,
    and writes none anywhere (a minted Secret's write is then StoreNotAllowed naming the value)."""
    release = f"lf-rbac-{uuid.uuid4().hex[:6]}"
    values = {"rbac": {"secretNamespaces": [tenant], "mintSecrets": False}, "artifactStore": {"sts": {"enabled": True}}}
    docs = install(cluster, render(values, release=release, namespace=namespace))
    try:
        operator = _user(namespace, account(docs))
        where = {"tenant": tenant, "own": namespace, "other": "default", "": ""}
        wait_in_effect(cluster, operator, [
            Ask("RoleBinding <name>-secrets in the tenant", "get", "secrets", True, name="tune-store"),
            Ask("RoleBinding <name>-secrets in its own namespace", "get", "secrets", True, name="x", namespace="own"),
        ], where)  # fmt: skip
        check_table(cluster, operator, [
            Ask("listed: no create", "create", "secrets", False),
            Ask("listed: no patch", "patch", "secrets", False, name="tune-store"),
            Ask("listed: no delete", "delete", "secrets", False, name="tune-store"),
            Ask("its own namespace: no write", "patch", "secrets", False, name="platform-store", namespace="own"),
            Ask("unlisted: no write", "create", "secrets", False, namespace="other"),
        ], where)  # fmt: skip
    finally:
        uninstall(cluster, docs)
