"""A ClusterArtifactStore with spec.sts.enabled is reached with the store's own keys, read from the operator's
namespace, never with a Secret of the tenant's namespace (each test plants one of that name holding keys MinIO does
not know, so using it would fail):

* it mints each FineTuneJob's trainer credentials: the minted Secret holds a session token, the trainer Job names
  only that Secret, and on the real MinIO the keys write the job's own version folder in the namespace's location
  in that store and are refused (AccessDenied) under another namespace's;
* a BaseModel in that store is verified with the store's keys and its weights are fetched with the FineTuneJob's
  minted keys (the trainer config's base store names `<job>-store`): they read the weights, cannot write them nor
  read another namespace's location, and no copy of the store's keys is in the tenant's namespace;
* the operator's own reads and deletes use the store's keys, not the job's minted Secret (deleted once the job has
  finished): a finished job's adapter is verified and recorded after its Secret is gone, and deletionPolicy Delete
  removes it;
* an AdapterDeployment whose adapters are in that store gets read-only keys minted by it (`<name>-serving-store`,
  mounted as the sidecar's Secret volume): they read the namespace's location in that store and nothing else;
* run with only the chart's RBAC, the operator mints for such a store with the Helm value rbac.mintSecrets (without
  artifactStore.sts.enabled), and without it the FineTuneJob is StoreNotAllowed naming that value.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from lorafleet.resources.finetunejob import CONFIG_ANNOTATION
from lorafleet.storage import ArtifactStore, ObjectNotFound, VersionFolder
from lorafleet_dev.operator import OperatorProcess
from lorafleet_dev.s3server import S3Server
from lorafleet_dev.testing import ClusterHandle, first_listed, wait_until
from tests.integration.operator_fixtures import Custom, condition
from tests.integration.test_chart import service_account_kubeconfig
from tests.integration.test_chart_render import render
from tests.integration.test_rbac_tables import Ask, _user, account, install, uninstall, wait_in_effect
from tests.integration.test_safe_deletion import _artifact_report, _fake_trainer_report, _push
from tests.s3_fixtures import refusal_codes, secret_keys, session_client
from tests.unit import objects

pytestmark = pytest.mark.integration

STORE_SECRET = "team-store-keys"
BUCKET, PREFIX = "lorafleet", "teams"


def _keys_secret(name: str, access: str, secret: str) -> client.V1Secret:
    return client.V1Secret(
        metadata=client.V1ObjectMeta(name=name),
        string_data={"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret},
    )


@pytest.fixture
def minting_store(cluster: ClusterHandle, crds: None, s3_server: S3Server, private_namespace: str) -> Iterator[str]:
    """A ClusterArtifactStore with spec.sts for `private_namespace`, its keys in an operator namespace of its own
    and a planted Secret of that name, with keys MinIO does not know, in the tenant's namespace; yields its name."""
    ns = private_namespace
    operator_ns = _operator_namespace(ns)
    store_name = f"sts-{uuid.uuid4().hex[:8]}"
    core = cluster.core
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=operator_ns)))
    try:
        core.create_namespaced_secret(
            operator_ns, _keys_secret(STORE_SECRET, s3_server.access_key, s3_server.secret_key)
        )
        core.create_namespaced_secret(ns, _keys_secret(STORE_SECRET, "planted", "planted-secret-key"))
        client.CustomObjectsApi(cluster.api_client).create_cluster_custom_object(
            "lorafleet.io",
            "v1alpha1",
            "clusterartifactstores",
            {
                "apiVersion": "lorafleet.io/v1alpha1",
                "kind": "ClusterArtifactStore",
                "metadata": {"name": store_name},
                "spec": {
                    "endpoint": s3_server.endpoint,
                    "bucket": BUCKET,
                    "prefix": PREFIX,
                    "credentialsSecretRef": {"name": STORE_SECRET},
                    "allowedNamespaces": {"names": [ns]},
                    "sts": {"enabled": True, "durationSeconds": 900},
                },
            },
        )
        yield store_name
    finally:
        client.CustomObjectsApi(cluster.api_client).delete_cluster_custom_object(
            "lorafleet.io", "v1alpha1", "clusterartifactstores", store_name
        )
        core.delete_namespace(operator_ns, propagation_policy="Background")


def _operator_namespace(ns: str) -> str:
    return f"{ns[:50]}-op"


def _env(s3_server: S3Server, ns: str) -> dict[str, str]:
    return {
        **s3_server.env(),  # the default store (the BaseModel's); its own STS stays off
        "LORAFLEET_STORE_URI": "s3://lorafleet",
        "LORAFLEET_OPERATOR_NAMESPACE": _operator_namespace(ns),
        "LORAFLEET_RESYNC_SECONDS": "3",
        "LORAFLEET_NAMESPACES": json.dumps([ns]),
    }


@contextlib.contextmanager
def _operator(
    cluster: ClusterHandle, s3_server: S3Server, ns: str, tmp_path: Path, kubeconfig: Path | None = None
) -> Iterator[OperatorProcess]:
    """An operator of the test's own (the store's keys in its namespace), stopped when the block ends."""
    operator = OperatorProcess(kubeconfig or cluster.kubeconfig, tmp_path / "operator.log", _env(s3_server, ns))
    operator.start()
    try:
        yield operator
    finally:
        operator.stop()


def _fine_tune_job(ns: str, store_name: str, **output: Any) -> dict[str, Any]:
    ftj = {**objects.fine_tune_job(namespace=ns), "metadata": {"name": "support", "namespace": ns}}
    ftj["spec"]["output"] = {
        "adapterName": "support-bot",
        "version": "v1",
        "storeRef": {"kind": "ClusterArtifactStore", "name": store_name},
        **output,
    }
    ftj["spec"]["resources"] = {"gpusPerNode": 1, "cpu": 1, "memory": "1Gi"}
    return ftj


def test_cluster_store_mints_prefix_scoped_trainer_credentials(
    cluster: ClusterHandle,
    s3_server: S3Server,
    stored_model: str,
    private_namespace: str,
    minting_store: str,
    tmp_path: Path,
) -> None:
    ns, store_name, core = private_namespace, minting_store, cluster.core
    custom = Custom(cluster, ns)
    custom.create({**objects.base_model(namespace=ns), "metadata": {"name": "tiny-llama", "namespace": ns}})
    custom.create(_fine_tune_job(ns, store_name))
    with _operator(cluster, s3_server, ns, tmp_path) as operator:
        secret = first_listed(
            lambda: core.list_namespaced_secret(ns, field_selector="metadata.name=support-store"),
            90,
            what=f"the minted Secret\n{operator.log_tail(30)}",
        )
        job = first_listed(
            lambda: cluster.batch.list_namespaced_job(ns),
            60,
            what=f"the Job\n{custom.get('FineTuneJob', 'support')}\n{operator.log_tail(30)}",
        )
    assert secret.metadata.owner_references[0].kind == "FineTuneJob"
    data = secret_keys(secret)
    assert set(data) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
    assert data["AWS_ACCESS_KEY_ID"] not in (s3_server.access_key, "planted")
    job_text = str(job.to_dict())
    assert STORE_SECRET not in job_text and "'name': 'support-store'" in job_text
    assert "AWS_SESSION_TOKEN" in job_text

    tenant = session_client(s3_server, data)
    own = f"{PREFIX}/{ns}/adapters/support-bot/v1/probe"  # its version folder: the only place it writes
    tenant.put_object(Bucket=BUCKET, Key=own, Body=b"x")
    assert tenant.get_object(Bucket=BUCKET, Key=own)["Body"].read() == b"x"
    tenant.delete_object(Bucket=BUCKET, Key=own)
    refusals: dict[str, Callable[[], Any]] = {
        "another namespace's location": lambda: tenant.put_object(
            Bucket=BUCKET, Key=f"{PREFIX}/another-team/probe", Body=b"x"
        ),
        "its namespace's location outside its folders": lambda: tenant.put_object(
            Bucket=BUCKET, Key=f"{PREFIX}/{ns}/probe", Body=b"x"
        ),
        "the default store's root": lambda: tenant.put_object(Bucket=BUCKET, Key=f"{ns}/probe", Body=b"x"),
        "the bucket": lambda: tenant.list_objects_v2(Bucket=BUCKET),
    }
    assert refusal_codes(refusals) == dict.fromkeys(refusals, "AccessDenied")


def test_base_weights_in_the_store_are_fetched_with_the_jobs_minted_keys(
    cluster: ClusterHandle,
    s3_server: S3Server,
    stored_model: str,
    private_namespace: str,
    minting_store: str,
    tmp_path: Path,
) -> None:
    ns, store_name, core = private_namespace, minting_store, cluster.core
    base_key = f"{PREFIX}/{ns}/models/tiny-llama/r1"
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "config.json").write_text('{"model_type": "llama"}')
    (weights / "model.safetensors").write_bytes(b"\0" * 1024)
    pushed = ArtifactStore(s3_server.store_settings()).push(
        weights, VersionFolder.parse(f"s3://{BUCKET}/{base_key}"), kind="model", name="tiny-llama", version="r1"
    )
    custom = Custom(cluster, ns)
    source = {"uri": f"s3://{BUCKET}/{base_key}", "storeRef": {"kind": "ClusterArtifactStore", "name": store_name}}
    base = objects.base_model(namespace=ns, source=source)
    custom.create({**base, "metadata": {"name": "tiny-llama", "namespace": ns}})
    custom.create(_fine_tune_job(ns, store_name))
    with _operator(cluster, s3_server, ns, tmp_path) as operator:
        # Verified with the store's keys from the operator's namespace (the tenant's planted Secret has keys MinIO
        # does not know, and is not even looked for).
        ready = custom.wait_status(
            "BaseModel",
            "tiny-llama",
            lambda s, _o: s.get("phase") == "Ready",
            timeout=90,
            what=f"BaseModel Ready\n{operator.log_tail(30)}",
        )
        secret = first_listed(
            lambda: core.list_namespaced_secret(ns, field_selector="metadata.name=support-store"),
            90,
            what=f"the minted Secret\n{custom.get('FineTuneJob', 'support')}\n{operator.log_tail(30)}",
        )
        job = first_listed(lambda: cluster.batch.list_namespaced_job(ns), 60, what=f"the Job\n{operator.log_tail(30)}")
    assert ready["status"]["digest"] == str(pushed.digest)
    config = json.loads(job.spec.template.metadata.annotations[CONFIG_ANNOTATION])
    assert config["baseModel"]["store"]["credentialsSecretRef"]["name"] == "support-store"
    assert STORE_SECRET not in str(job.to_dict())
    # No Secret of the tenant's namespace holds the store's keys (the planted one holds keys MinIO does not know).
    held = [secret_keys(s) for s in core.list_namespaced_secret(ns).items]
    assert not [keys for keys in held if s3_server.secret_key in keys.values()]

    trainer = session_client(s3_server, secret_keys(secret))
    assert trainer.get_object(Bucket=BUCKET, Key=f"{base_key}/manifest.json")["Body"].read()
    assert trainer.list_objects_v2(Bucket=BUCKET, Prefix=f"{base_key}/")["KeyCount"] > 0
    refusals: dict[str, Callable[[], Any]] = {
        "overwrite the weights' manifest": lambda: trainer.put_object(
            Bucket=BUCKET, Key=f"{base_key}/manifest.json", Body=b"{}"
        ),
        "add a file to the weights": lambda: trainer.put_object(Bucket=BUCKET, Key=f"{base_key}/x", Body=b"x"),
        "delete the weights' manifest": lambda: trainer.delete_object(Bucket=BUCKET, Key=f"{base_key}/manifest.json"),
        "read another namespace's location": lambda: trainer.get_object(
            Bucket=BUCKET, Key=f"{PREFIX}/another-team/models/tiny-llama/r1/manifest.json"
        ),
        "list another namespace's location": lambda: trainer.list_objects_v2(
            Bucket=BUCKET, Prefix=f"{PREFIX}/another-team/"
        ),
    }
    assert refusal_codes(refusals) == dict.fromkeys(refusals, "AccessDenied")


def test_the_operator_reads_and_deletes_with_the_store_s_keys_after_the_minted_secret_is_gone(
    cluster: ClusterHandle,
    s3_server: S3Server,
    stored_model: str,
    private_namespace: str,
    minting_store: str,
    tmp_path: Path,
) -> None:
    ns, core = private_namespace, cluster.core
    custom = Custom(cluster, ns)
    custom.create({**objects.base_model(namespace=ns), "metadata": {"name": "tiny-llama", "namespace": ns}})
    ftj = _fine_tune_job(ns, minting_store, deletionPolicy="Delete")
    ftj["spec"]["resources"]["podAnnotations"] = {"lorafleet.io/kwok-duration": "2s"}  # the kwok Job succeeds
    created = custom.create(ftj)
    uri = f"s3://{BUCKET}/{PREFIX}/{ns}/adapters/support-bot/v1"
    platform = ArtifactStore(s3_server.store_settings())
    pushed = _push(platform, tmp_path, uri, "support-bot", created["metadata"]["uid"])  # what its trainer writes
    with _operator(cluster, s3_server, ns, tmp_path) as operator:
        custom.wait_status("FineTuneJob", "support", lambda s, _o: s.get("phase") == "Succeeded", timeout=90)
        wait_until(
            lambda: not core.list_namespaced_secret(ns, field_selector="metadata.name=support-store").items,
            30,
            interval=0.5,
            what="the minted Secret removed once the job finished",
        )
        # The report arrives after the job's minted Secret is gone: verified with the store's own keys.
        _fake_trainer_report(cluster, ns, _artifact_report(uri, pushed.digest))
        recorded = custom.wait_status(
            "FineTuneJob", "support", lambda s, _o: bool(s.get("artifact")), what=f"artifact\n{operator.log_tail(30)}"
        )
        assert recorded["status"]["artifact"] == {"uri": uri, "digest": pushed.digest, "sizeBytes": 64}
        assert (condition(recorded["status"], "Degraded") or {}).get("status") != "True"

        custom.delete("FineTuneJob", "support")
        wait_until(lambda: custom.get("FineTuneJob", "support") is None, 60, what="FineTuneJob deleted")
    with pytest.raises(ObjectNotFound):
        platform.read_manifest(VersionFolder.parse(uri), explain=False)
    events = {e.reason: e.message for e in core.list_namespaced_event(ns).items}
    assert uri in events.get("AdapterDeleted", ""), events


def test_serving_replicas_get_read_only_keys_minted_by_the_store(
    cluster: ClusterHandle,
    s3_server: S3Server,
    stored_model: str,
    private_namespace: str,
    minting_store: str,
    tmp_path: Path,
) -> None:
    ns, core = private_namespace, cluster.core
    uri = f"s3://{BUCKET}/{PREFIX}/{ns}/adapters/sql/v1"
    _push(ArtifactStore(s3_server.store_settings()), tmp_path, uri, "sql", "uid-of-some-job")
    custom = Custom(cluster, ns)
    custom.create({**objects.base_model(namespace=ns), "metadata": {"name": "tiny-llama", "namespace": ns}})
    ad = objects.adapter_deployment(name="chat", namespace=ns)
    ad["metadata"] = {"name": "chat", "namespace": ns}
    store_ref = {"kind": "ClusterArtifactStore", "name": minting_store}
    ad["spec"]["adapters"] = [{"name": "sql", "artifact": {"uri": uri, "storeRef": store_ref}}]
    ad["spec"]["replicas"] = 1
    ad["spec"]["resources"] = {"gpusPerReplica": 0, "cpu": 1, "memory": "2Gi"}
    custom.create(ad)
    selector = "metadata.name=chat-serving-store"
    with _operator(cluster, s3_server, ns, tmp_path) as operator:
        secret = first_listed(
            lambda: core.list_namespaced_secret(ns, field_selector=selector),
            90,
            what=f"the minted Secret\n{custom.get('AdapterDeployment', 'chat')}\n{operator.log_tail(30)}",
        )
        deployment = first_listed(
            lambda: cluster.apps.list_namespaced_deployment(ns),
            60,
            what=f"the Deployment\n{operator.log_tail(30)}",
        )
    owner = secret.metadata.owner_references[0]
    assert owner.kind == "AdapterDeployment" and owner.controller
    data = secret_keys(secret)
    assert set(data) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
    assert data["AWS_ACCESS_KEY_ID"] not in (s3_server.access_key, "planted")
    text = str(deployment.to_dict())
    assert STORE_SECRET not in text and "'secret_name': 'chat-serving-store'" in text
    sidecar = next(c for c in deployment.spec.template.spec.containers if c.name == "adapter-sync")
    assert {"name": "LORAFLEET_STORE_ENDPOINT", "value": s3_server.endpoint} in [
        {"name": e.name, "value": e.value} for e in sidecar.env or []
    ]
    assert not [e for e in sidecar.env or [] if e.value_from is not None and e.value_from.secret_key_ref is not None]

    replica = session_client(s3_server, data)
    manifest = uri.removeprefix(f"s3://{BUCKET}/") + "/manifest.json"
    assert replica.get_object(Bucket=BUCKET, Key=manifest)["Body"].read()
    assert replica.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/{ns}/")["KeyCount"] > 0
    refusals: dict[str, Callable[[], Any]] = {
        "write its own location": lambda: replica.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{ns}/probe", Body=b"x"),
        "another namespace's": lambda: replica.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/another-team/"),
        "the default store's root": lambda: replica.list_objects_v2(Bucket=BUCKET, Prefix=f"{ns}/"),
        "the bucket": lambda: replica.list_objects_v2(Bucket=BUCKET),
    }
    assert refusal_codes(refusals) == dict.fromkeys(refusals, "AccessDenied")


@pytest.mark.parametrize("mint_secrets", [True, False], ids=["mintSecrets", "no mintSecrets"])
def test_the_chart_grants_minted_secret_writes_with_rbac_mint_secrets(
    cluster: ClusterHandle,
    s3_server: S3Server,
    stored_model: str,
    private_namespace: str,
    minting_store: str,
    tmp_path: Path,
    mint_secrets: bool,
) -> None:
    ns, core = private_namespace, cluster.core
    operator_ns = _operator_namespace(ns)
    values = {"rbac": {"secretNamespaces": [ns], "mintSecrets": mint_secrets}}  # artifactStore.sts stays off
    docs = install(cluster, render(values, release=f"lf-{uuid.uuid4().hex[:6]}", namespace=operator_ns))
    try:
        sa = account(docs)
        wait_in_effect(
            cluster,
            _user(operator_ns, sa),
            [Ask("the store's keys", "get", "secrets", True, name=STORE_SECRET, namespace="own")],
            {"own": operator_ns, "tenant": ns, "": ""},
        )
        kubeconfig = service_account_kubeconfig(cluster, operator_ns, sa, tmp_path / "sa.kubeconfig")
        custom = Custom(cluster, ns)
        custom.create({**objects.base_model(namespace=ns), "metadata": {"name": "tiny-llama", "namespace": ns}})
        custom.create(_fine_tune_job(ns, minting_store))
        with _operator(cluster, s3_server, ns, tmp_path, kubeconfig) as operator:
            if mint_secrets:
                wait_until(
                    lambda: core.list_namespaced_secret(ns, field_selector="metadata.name=support-store").items,
                    90,
                    interval=0.5,
                    what=f"the minted Secret\n{operator.log_tail(30)}",
                )
            else:

                def refused(status: dict[str, Any], _obj: dict[str, Any]) -> bool:
                    ready = condition(status, "Ready") or {}
                    return ready.get("reason") == "StoreNotAllowed" and "rbac.mintSecrets" in ready.get("message", "")

                ftj = custom.wait_status(
                    "FineTuneJob", "support", refused, timeout=90, what=f"StoreNotAllowed\n{operator.log_tail(30)}"
                )
                message = (condition(ftj["status"], "Ready") or {})["message"]
                assert f'namespace "{ns}"' in message and "support-store" in message
                assert not core.list_namespaced_secret(ns, field_selector="metadata.name=support-store").items
    finally:
        uninstall(cluster, docs)
