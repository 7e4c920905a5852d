"""The Helm chart against a real API server: install, upgrade and uninstall; and its RBAC proven for real.

kwok nodes run no containers, so the chart's operator pod never runs. Instead each RBAC test mints a token for the
chart's ServiceAccount (TokenRequest API), writes a kubeconfig with it and runs the operator as a subprocess with
the environment of the chart's Deployment (Secrets resolved as the kubelet would). The three kinds must then
reconcile (children created, status written, Events posted, a deletionPolicy Delete finalizer added and removed)
with no 403 in the operator's log, cluster-wide and in namespaced mode. Uninstall with custom resources still
present must not hang, and the namespace holding them must then delete. In a namespace that rbac.secretNamespaces
does not list, an object naming a Secret gets StoreNotAllowed naming that Helm value, not a 403 in a log.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from lorafleet.resources import finetunejob as ftj_res
from lorafleet_dev.operator import OperatorProcess
from lorafleet_dev.s3server import S3Server, free_port
from lorafleet_dev.testing import ClusterHandle, wait_until
from tests.integration.conftest import SESSION_PREFIX
from tests.integration.operator_fixtures import ADAPTER_ROOT, MODEL_URI, Custom, condition
from tests.integration.test_chart_kustomize import DEPLOY
from tests.integration.test_chart_kustomize import kubectl as kubectl_binary
from tests.integration.test_chart_render import CHART, helm_binary, set_args
from tests.unit import objects

Obj = dict[str, Any]
STORE_SECRET = "lorafleet-store"
TEAM_SECRET = "team-store-keys"  # a spec's own store never names the platform's Secret (StoreNotAllowed)
FIELD_MANAGER = "lorafleet-chart-rbac"  # tells this operator's writes apart from any other operator's
# How an RBAC denial shows in the operator's log: the API server's "... cannot <verb> resource ...", its refusal to let
# the operator grant what it does not hold (escalation prevention), the operator's own hint
# (lorafleet.k8s.forbidden_message), or kopf's fallback when it may not list something. Other 403s are not RBAC (in
# cluster mode the operator also sees other tests' namespaces, where a terminating namespace refuses new Events).
DENIED = re.compile(r"cannot [\w-]+ resource|grant RBAC permissions not currently held|RBAC:|Not enough permissions")


class Helm:
    """helm against the test cluster, with its own config and cache folders."""

    def __init__(self, kubeconfig: Path, home: Path) -> None:
        self.kubeconfig = kubeconfig
        self.env = {
            **os.environ,
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def run(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        cmd = [str(helm_binary()), "--kubeconfig", str(self.kubeconfig), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def install(self, release: str, namespace: str, values: Obj | None = None) -> subprocess.CompletedProcess[str]:
        return self.run(
            "install", release, str(CHART), "-n", namespace, "--wait", "--timeout", "120s", *set_args(values)
        )

    def upgrade(self, release: str, namespace: str, values: Obj | None = None, check: bool = True) -> Any:
        return self.run(
            "upgrade", release, str(CHART), "-n", namespace, "--wait", "--timeout", "120s", *set_args(values),
            check=check,
        )  # fmt: skip

    def uninstall(self, release: str, namespace: str) -> subprocess.CompletedProcess[str]:
        return self.run("uninstall", release, "-n", namespace, "--wait", "--timeout", "60s", timeout=90)


@pytest.fixture
def helm(cluster: ClusterHandle, tmp_path: Path) -> Helm:
    return Helm(cluster.kubeconfig, tmp_path / "helm")


@pytest.fixture
def release(helm: Helm, namespace: str) -> Iterator[str]:
    name = f"lf-{uuid.uuid4().hex[:6]}"  # cluster-scoped names (ClusterRoles) stay unique per test
    yield name
    # A failed test must not leave cluster-scoped objects behind (the namespace goes with the fixture).
    helm.run("uninstall", name, "-n", namespace, "--ignore-not-found", "--wait", "--timeout", "60s", check=False)


def _gone(read: Any, *args: str) -> bool:
    try:
        read(*args)
    except ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return False


def _create_namespace(cluster: ClusterHandle, name: str) -> None:
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    wait_until(
        lambda: not _gone(cluster.core.read_namespaced_service_account, "default", name),
        timeout=30,
        what=f"ServiceAccount default in {name}",
    )


@pytest.fixture
def work_namespace(cluster: ClusterHandle, namespace: str) -> Iterator[str]:
    """A second namespace for the custom resources (the operator's own namespace is `namespace`). Outside the glob
    the session's own operator watches (<prefix>-*: operator_fixtures), or both operators would reconcile it."""
    name = f"{namespace.replace(f'{SESSION_PREFIX}-', f'{SESSION_PREFIX}c-', 1)[:50]}-work"
    _create_namespace(cluster, name)
    yield name
    try:
        cluster.core.delete_namespace(name, propagation_policy="Background")
    except ApiException as exc:
        if exc.status != 404:
            raise


def _env_of(deployment: client.V1Deployment) -> list[client.V1EnvVar]:
    containers = deployment.spec.template.spec.containers
    assert [c.name for c in containers] == ["operator"]
    assert containers[0].command == ["lorafleet", "operator"]
    return list(containers[0].env or [])


def resolve_env(cluster: ClusterHandle, deployment: client.V1Deployment) -> dict[str, str]:
    """The operator container's environment as the kubelet would build it (downward API, Secrets)."""
    namespace = deployment.metadata.namespace
    env: dict[str, str] = {}
    for var in _env_of(deployment):
        if var.value is not None:
            env[var.name] = var.value
            continue
        source = var.value_from
        if source.field_ref is not None:
            path = source.field_ref.field_path
            env[var.name] = {"metadata.namespace": namespace, "metadata.name": "lorafleet-rbac-test"}[path]
        elif source.secret_key_ref is not None:
            ref = source.secret_key_ref
            secret = cluster.core.read_namespaced_secret(ref.name, namespace)
            env[var.name] = base64.b64decode(secret.data[ref.key]).decode()
        else:
            raise AssertionError(f"unexpected env source for {var.name}: {source}")
    return env


def service_account_kubeconfig(cluster: ClusterHandle, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount, with a token from the TokenRequest API."""
    request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600))
    token = cluster.core.create_namespaced_service_account_token(account, namespace, request).status.token
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    server = admin["clusters"][0]["cluster"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": server}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "test", "user": account, "namespace": namespace}}],
        "current-context": "sa",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def _secret(cluster: ClusterHandle, namespace: str, s3_server: S3Server) -> None:
    data = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}
    for name in (STORE_SECRET, TEAM_SECRET):  # the platform's copy, and a team's own keys for its own store
        body = client.V1Secret(metadata=client.V1ObjectMeta(name=name), string_data=data)
        cluster.core.create_namespaced_secret(namespace, body)


def _manifest(obj: Obj, namespace: str) -> Obj:
    return {**obj, "metadata": {"name": obj["metadata"]["name"], "namespace": namespace}}


def _phase(expected: str) -> Any:
    return lambda status, obj: (
        status.get("phase") == expected and status.get("observedGeneration") == obj["metadata"]["generation"]
    )


def _managers(obj: Any) -> set[str]:
    return {f.manager for f in (obj.metadata.managed_fields or []) if f.operation == "Apply"}


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


# --- install, upgrade, uninstall -----------------------------------------------------------------------------


def test_install_upgrade_and_uninstall(
    cluster: ClusterHandle, crds: None, helm: Helm, release: str, namespace: str
) -> None:
    rbac = client.RbacAuthorizationV1Api(cluster.api_client)
    name = f"{release}-lorafleet"

    helm.install(release, namespace)
    deployment = cluster.apps.read_namespaced_deployment(name, namespace)
    assert deployment.status.ready_replicas == 2  # kwok: the pods are Ready without running
    assert deployment.spec.template.spec.service_account_name == name
    assert rbac.read_cluster_role(name).rules
    assert rbac.read_cluster_role_binding(name).subjects[0].namespace == namespace
    assert cluster.core.read_namespaced_service(f"{name}-metrics", namespace).spec.ports[0].port == 8080
    notes = helm.run("get", "notes", release, "-n", namespace).stdout
    assert "rollout status" in notes and "kubectl apply --server-side -f" in notes

    # Upgrade to namespaced mode with new settings: the ClusterRole goes, a Role comes, the pod is replaced.
    helm.upgrade(release, namespace, {"watchNamespaces": [namespace], "operator": {"logFormat": "text"}})
    assert _gone(rbac.read_cluster_role, name) and _gone(rbac.read_cluster_role_binding, name)
    assert rbac.read_namespaced_role(name, namespace).rules
    env = {e.name: e.value for e in _env_of(cluster.apps.read_namespaced_deployment(name, namespace))}
    assert env["LORAFLEET_NAMESPACES"] == f'["{namespace}"]'
    assert env["LORAFLEET_LOG_FORMAT"] == "text"

    # A typo in values fails the upgrade before anything changes.
    failed = helm.upgrade(release, namespace, {"operator": {"logformat": "text"}}, check=False)
    assert failed.returncode != 0 and "additional properties 'logformat' not allowed" in failed.stderr
    history = yaml.safe_load(helm.run("history", release, "-n", namespace, "-o", "yaml").stdout)
    assert [h["revision"] for h in history] == [1, 2] and history[-1]["status"] == "deployed"

    # Custom resources present at uninstall: the uninstall does not wait on them, and they stay (CRDs are kept).
    custom = Custom(cluster, namespace)
    custom.create(_manifest(objects.base_model(), namespace))
    started = time.monotonic()
    helm.uninstall(release, namespace)
    assert time.monotonic() - started < 60
    assert _gone(cluster.apps.read_namespaced_deployment, name, namespace)
    assert _gone(rbac.read_namespaced_role, name, namespace)
    assert _gone(cluster.core.read_namespaced_service_account, name, namespace)
    assert _gone(rbac.read_cluster_role, f"{name}-discovery")
    assert custom.get("BaseModel", "tiny-llama") is not None
    ext = client.ApiextensionsV1Api(cluster.api_client)
    assert ext.read_custom_resource_definition("basemodels.lorafleet.io")


# --- RBAC, for real ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["cluster", "namespaced"])
def test_operator_reconciles_with_only_the_charts_rbac(
    cluster: ClusterHandle,
    crds: None,
    s3_server: S3Server,
    stored_model: str,
    helm: Helm,
    release: str,
    namespace: str,
    work_namespace: str,
    tmp_path: Path,
    mode: str,
) -> None:
    name = f"{release}-lorafleet"
    for ns in (namespace, work_namespace):
        _secret(cluster, ns, s3_server)
    values: Obj = {
        "artifactStore": {"endpoint": s3_server.endpoint, "uri": ADAPTER_ROOT, "credentialsSecret": STORE_SECRET},
        "networkPolicy": {"enabled": True, "egressCIDRs": ["10.0.0.0/8"]},
        # The "own-store" BaseModel names a Secret of the work namespace: the operator must read it there.
        "rbac": {"secretNamespaces": [work_namespace]},
    }
    if mode == "namespaced":
        values["watchNamespaces"] = [work_namespace]
    helm.install(release, namespace, values)

    env = resolve_env(cluster, cluster.apps.read_namespaced_deployment(name, namespace))
    assert env["AWS_SECRET_ACCESS_KEY"] == s3_server.secret_key
    for local in ("LORAFLEET_METRICS_PORT", "LORAFLEET_HEALTH_PORT", "LORAFLEET_LOG_FORMAT"):
        env.pop(local)  # free ports on this machine; a greppable log
    health, metrics = free_port(), free_port()
    env.update(
        LORAFLEET_HEALTH_PORT=str(health),
        LORAFLEET_METRICS_PORT=str(metrics),
        LORAFLEET_RESYNC_SECONDS="3",
        LORAFLEET_FIELD_MANAGER=FIELD_MANAGER,
    )
    kubeconfig = service_account_kubeconfig(cluster, namespace, name, tmp_path / "sa.kubeconfig")
    operator = OperatorProcess(kubeconfig, tmp_path / "operator.log", env)
    operator.start()
    try:
        wait_until(lambda: _http_ok(f"http://127.0.0.1:{health}/healthz"), timeout=60, what="the liveness endpoint")
        assert _http_ok(f"http://127.0.0.1:{metrics}/metrics")
        _reconcile_everything(cluster, work_namespace, operator, s3_server.endpoint)
        if mode == "cluster":
            _unlisted_namespace_names_the_helm_value(cluster, f"{namespace[:50]}-unlisted", s3_server)
        log = operator.log_path.read_text(errors="replace")
        denied = DENIED.findall(log)
        assert not denied, f"the API server denied the operator {denied}:\n{operator.log_tail(80)}"
        assert operator.alive(), operator.log_tail()
    finally:
        operator.stop()

    # The operator is gone; uninstall with the custom resources still there must not hang, nor must deleting them
    # with their namespace (no finalizer is left behind on them).
    started = time.monotonic()
    helm.uninstall(release, namespace)
    assert time.monotonic() - started < 60
    custom = Custom(cluster, work_namespace)
    assert custom.get("BaseModel", "tiny-llama") and custom.get("AdapterDeployment", "chat")
    cluster.core.delete_namespace(work_namespace)
    wait_until(
        lambda: _gone(cluster.core.read_namespace, work_namespace),
        timeout=90,
        what=f"namespace {work_namespace} with its custom resources deleted after the uninstall",
    )


def _unlisted_namespace_names_the_helm_value(cluster: ClusterHandle, unlisted: str, s3_server: S3Server) -> None:
    _create_namespace(cluster, unlisted)
    try:
        _secret(cluster, unlisted, s3_server)
        custom = Custom(cluster, unlisted)
        own_store = _manifest(objects.base_model(name="own-store"), unlisted)
        own_store["spec"]["source"] = {
            "uri": MODEL_URI,
            "store": {"endpoint": s3_server.endpoint, "credentialsSecretRef": {"name": TEAM_SECRET}},
        }
        custom.create(own_store)

        def refused(status: Obj, obj: Obj) -> bool:
            ready = condition(status, "Ready") or {}
            return bool(ready.get("reason") == "StoreNotAllowed" and "rbac.secretNamespaces" in ready["message"])

        bm = custom.wait_status("BaseModel", "own-store", refused, timeout=60, what="StoreNotAllowed naming the value")
        assert f'in namespace "{unlisted}"' in condition(bm["status"], "Ready")["message"]  # type: ignore[index]
        assert bm["status"]["phase"] == "Pending"
    finally:
        cluster.core.delete_namespace(unlisted, propagation_policy="Background")


def _reconcile_everything(
    cluster: ClusterHandle, namespace: str, operator: OperatorProcess, store_endpoint: str
) -> None:
    custom = Custom(cluster, namespace)
    bm = _manifest(objects.base_model(), namespace)
    bm["spec"]["source"] = {"uri": MODEL_URI}
    custom.create(bm)
    own_store = _manifest(objects.base_model(name="own-store"), namespace)
    own_store["spec"]["source"] = {
        "uri": MODEL_URI,
        "store": {"endpoint": store_endpoint, "credentialsSecretRef": {"name": TEAM_SECRET}},
    }
    custom.create(own_store)
    ftj = _manifest(objects.fine_tune_job(), namespace)
    ftj["spec"]["resources"] = {
        "gpusPerNode": 1, "cpu": 1, "memory": "1Gi", "nodes": 2,  # distributed: the rendezvous Service too
        "podAnnotations": {"lorafleet.io/kwok-duration": "600s"},
    }  # fmt: skip
    ftj["spec"]["output"]["deletionPolicy"] = "Delete"  # kopf's finalizer: added and removed under this RBAC
    custom.create(ftj)
    ad = _manifest(objects.adapter_deployment(), namespace)
    ad["spec"].update(adapters=[], replicas=2)  # replicas > 1: the PodDisruptionBudget too
    custom.create(ad)

    def tail() -> str:
        return f"\noperator log:\n{operator.log_tail(40)}"

    ready = custom.wait_status("BaseModel", "tiny-llama", _phase("Ready"), timeout=60, what="BaseModel Ready" + tail())
    assert ready["status"]["digest"].startswith("sha256:")  # read from the default store with the chart's Secret
    own = custom.wait_status("BaseModel", "own-store", _phase("Ready"), timeout=60, what="BaseModel Ready" + tail())
    assert own["status"]["digest"] == ready["status"]["digest"]  # read with the Secret its spec references
    running = custom.wait_status("FineTuneJob", "support", _phase("Running"), timeout=60, what="FTJ Running" + tail())
    assert running["metadata"]["finalizers"] == ["lorafleet.io/finalizer"]
    try:
        served = custom.wait_status("AdapterDeployment", "chat", _phase("Ready"), timeout=60, what="AD Ready" + tail())
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\nAdapterDeployment status: {(custom.get('AdapterDeployment', 'chat') or {}).get('status')}"
        ) from None
    assert condition(served["status"], "Ready")["status"] == "True"  # type: ignore[index]

    # Every child kind, written by this operator (its field manager) through server-side apply.
    rbac = client.RbacAuthorizationV1Api(cluster.api_client)
    networking = client.NetworkingV1Api(cluster.api_client)
    names = ftj_res.names("support")
    children = {
        "ConfigMap": cluster.core.read_namespaced_config_map(names.progress, namespace),
        "ServiceAccount": cluster.core.read_namespaced_service_account(names.service_account, namespace),
        "Role": rbac.read_namespaced_role(names.service_account, namespace),
        "RoleBinding": rbac.read_namespaced_role_binding(names.service_account, namespace),
        "Service": cluster.core.read_namespaced_service(names.service, namespace),
        "NetworkPolicy": networking.read_namespaced_network_policy(names.network_policy, namespace),
        "Job": cluster.batch.read_namespaced_job(names.job, namespace),
        "Deployment": cluster.apps.read_namespaced_deployment("chat-vllm", namespace),
        "Service (serving)": cluster.core.read_namespaced_service("chat", namespace),
        "PodDisruptionBudget": client.PolicyV1Api(cluster.api_client).read_namespaced_pod_disruption_budget(
            "chat-pdb", namespace
        ),
    }
    for kind, child in children.items():
        assert FIELD_MANAGER in _managers(child), f"{kind} {child.metadata.name} not applied by this operator"
    assert children["Service"].spec.cluster_ip == "None"
    assert len(networking.list_namespaced_network_policy(namespace).items) == 3  # 2 egress, 1 serving ingress

    # Events on condition transitions, posted with the chart's RBAC.
    wait_until(
        lambda: [
            e for e in cluster.core.list_namespaced_event(namespace).items if e.involved_object.kind == "BaseModel"
        ],
        timeout=30,
        what="an Event about the BaseModel",
    )

    # deletionPolicy Delete: kopf's finalizer goes once the delete handler ran (nothing was stored: no artifact).
    custom.delete("FineTuneJob", "support")
    wait_until(lambda: custom.get("FineTuneJob", "support") is None, timeout=60, what="FineTuneJob deleted" + tail())


# --- the kustomize base ------------------------------------------------------------------------------------------


def test_kustomize_base_applies_and_the_operator_becomes_available(cluster: ClusterHandle, crds: None) -> None:
    """deploy/ (the plain-YAML install) against the real API server: server-side apply, a Ready operator pod (kwok),
    then removal. The CRDs are left to the `crds` fixture (they are the same files, checked by a unit test)."""
    if not cluster.local:
        pytest.skip("installs the lorafleet-system namespace and cluster-wide RBAC: local test cluster only")
    kubectl = str(kubectl_binary())
    rendered = subprocess.run([kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] != "CustomResourceDefinition"]
    manifest = yaml.safe_dump_all(docs)
    base = [kubectl, "--kubeconfig", str(cluster.kubeconfig)]
    apply = subprocess.run(
        [*base, "apply", "--server-side", "--field-manager=lorafleet-kustomize-test", "-f", "-"],
        input=manifest, capture_output=True, text=True, check=False,
    )  # fmt: skip
    try:
        assert apply.returncode == 0, apply.stderr
        wait_until(
            lambda: (
                (cluster.apps.read_namespaced_deployment("lorafleet", "lorafleet-system").status.ready_replicas or 0)
                == 2
            ),
            timeout=60,
            what="the kustomize-installed operator Deployment to be available",
        )
    finally:
        subprocess.run([*base, "delete", "--wait=false", "--ignore-not-found", "-f", "-"], input=manifest,
                       capture_output=True, text=True, check=False)  # fmt: skip
