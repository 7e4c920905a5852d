"""A ClusterArtifactStore with spec.sts.enabled mints each FineTuneJob's trainer credentials with the store's keys,
read from the operator's namespace (a Secret of that name in the tenant's namespace is never used): the minted
Secret holds a session token, the trainer Job names only that Secret, and on the real MinIO the keys write under
the namespace's location in that store and are refused (AccessDenied) under another namespace's."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from kubernetes import client

from lorafleet_dev.operator import OperatorProcess
from lorafleet_dev.s3server import S3Server
from lorafleet_dev.testing import ClusterHandle, wait_until
from tests.integration.operator_fixtures import Custom
from tests.s3_fixtures import secret_keys, session_client
from tests.unit import objects

pytestmark = pytest.mark.integration

STORE_SECRET = "team-store-keys"
BUCKET, PREFIX = "lorafleet", "teams"


def _keys_secret(name: str, access: str, secret: str) -> client.V1Secret:
    return client.V1Secret(
        metadata=client.V1ObjectMeta(name=name),
        string_data={"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret},
    )


def test_cluster_store_mints_prefix_scoped_trainer_credentials(
    cluster: ClusterHandle,
    crds: None,
    s3_server: S3Server,
    stored_model: str,
    private_namespace: str,
    tmp_path: Path,
) -> None:
    ns = private_namespace
    operator_ns = f"{ns[:50]}-op"
    store_name = f"sts-{uuid.uuid4().hex[:8]}"
    core = cluster.core
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=operator_ns)))
    custom = Custom(cluster, ns)
    try:
        # The store's keys in the operator's namespace; a planted Secret of that name in the tenant's namespace
        # holds keys MinIO does not know: minting with them would fail.
        core.create_namespaced_secret(
            operator_ns, _keys_secret(STORE_SECRET, s3_server.access_key, s3_server.secret_key)
        )
        core.create_namespaced_secret(ns, _keys_secret(STORE_SECRET, "planted", "planted-secret-key"))
        custom.api.create_cluster_custom_object(
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
        env = {
            **s3_server.env(),  # the default store (the BaseModel's); its own STS stays off
            "LORAFLEET_STORE_URI": "s3://lorafleet",
            "LORAFLEET_OPERATOR_NAMESPACE": operator_ns,
            "LORAFLEET_RESYNC_SECONDS": "3",
            "LORAFLEET_NAMESPACES": json.dumps([ns]),
        }
        custom.create({**objects.base_model(namespace=ns), "metadata": {"name": "tiny-llama", "namespace": ns}})
        ftj = {**objects.fine_tune_job(namespace=ns), "metadata": {"name": "support", "namespace": ns}}
        ftj["spec"]["output"] = {
            "adapterName": "support-bot",
            "version": "v1",
            "storeRef": {"kind": "ClusterArtifactStore", "name": store_name},
        }
        ftj["spec"]["resources"] = {"gpusPerNode": 1, "cpu": 1, "memory": "1Gi"}
        custom.create(ftj)
        operator = OperatorProcess(cluster.kubeconfig, tmp_path / "operator.log", env)
        operator.start()
        try:
            secret = wait_until(
                lambda: core.list_namespaced_secret(ns, field_selector="metadata.name=support-store").items,
                90,
                interval=0.5,
                what=f"the minted Secret\n{operator.log_tail(30)}",
            )[0]
            job = wait_until(
                lambda: cluster.batch.list_namespaced_job(ns).items,
                60,
                interval=0.5,
                what=f"the Job\n{custom.get('FineTuneJob', 'support')}\n{operator.log_tail(30)}",
            )[0]
        finally:
            operator.stop()
        assert secret.metadata.owner_references[0].kind == "FineTuneJob"
        data = secret_keys(secret)
        assert set(data) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
        assert data["AWS_ACCESS_KEY_ID"] not in (s3_server.access_key, "planted")
        job_text = str(job.to_dict())
        assert STORE_SECRET not in job_text and "'name': 'support-store'" in job_text
        assert "AWS_SESSION_TOKEN" in job_text

        tenant = session_client(s3_server, data)
        own = f"{PREFIX}/{ns}/probe"
        tenant.put_object(Bucket=BUCKET, Key=own, Body=b"x")
        assert tenant.get_object(Bucket=BUCKET, Key=own)["Body"].read() == b"x"
        tenant.delete_object(Bucket=BUCKET, Key=own)
        refusals: tuple[Callable[[], Any], ...] = (
            lambda: tenant.put_object(Bucket=BUCKET, Key=f"{PREFIX}/another-team/probe", Body=b"x"),
            lambda: tenant.put_object(Bucket=BUCKET, Key=f"{ns}/probe", Body=b"x"),  # the default store's root
            lambda: tenant.list_objects_v2(Bucket=BUCKET),
        )
        for call in refusals:
            with pytest.raises(ClientError) as refused:
                call()
            assert refused.value.response["Error"]["Code"] == "AccessDenied"
    finally:
        custom.api.delete_cluster_custom_object("lorafleet.io", "v1alpha1", "clusterartifactstores", store_name)
        core.delete_namespace(operator_ns, propagation_policy="Background")
