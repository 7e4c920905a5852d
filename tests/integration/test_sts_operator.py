"""With artifactStore.sts on, the operator mints a FineTuneJob's store credentials into a Secret it owns in the
job's namespace before the trainer Job exists, and the Job's pods read that Secret, never the platform's; the
minted keys write into the namespace's root on the real MinIO and are refused (AccessDenied) in another
namespace's root; the Secret goes once the job has finished."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from lorafleet.controllers.credentials import EXPIRES
from lorafleet.resources.status.finetunejob import TERMINAL
from lorafleet_dev.operator import OperatorProcess
from lorafleet_dev.s3server import S3Server
from lorafleet_dev.testing import ClusterHandle, first_listed, wait_until
from tests.integration.operator_fixtures import Custom
from tests.s3_fixtures import secret_keys, session_client
from tests.unit import objects

pytestmark = pytest.mark.integration

PLATFORM_SECRET = "platform-store-keys"


def test_trainer_pods_get_minted_prefix_scoped_credentials(
    cluster: ClusterHandle,
    crds: None,
    s3_server: S3Server,
    stored_model: str,
    private_namespace: str,
    tmp_path: Path,
) -> None:
    ns = private_namespace
    env = {
        **s3_server.env(),  # the operator's own (platform) keys
        "LORAFLEET_STORE_URI": "s3://lorafleet",
        "LORAFLEET_STORE_CREDENTIALS_SECRET": PLATFORM_SECRET,
        "LORAFLEET_STORE_STS": "true",
        "LORAFLEET_STORE_STS_DURATION_SECONDS": "900",
        "LORAFLEET_RESYNC_SECONDS": "3",
        "LORAFLEET_NAMESPACES": json.dumps([ns]),
    }
    custom = Custom(cluster, ns)
    custom.create({**objects.base_model(namespace=ns), "metadata": {"name": "tiny-llama", "namespace": ns}})
    ftj = {**objects.fine_tune_job(namespace=ns), "metadata": {"name": "support", "namespace": ns}}
    ftj["spec"]["resources"] = {
        "gpusPerNode": 1,
        "cpu": 1,
        "memory": "1Gi",
        "podAnnotations": {"lorafleet.io/kwok-duration": "5s"},
    }  # fmt: skip  (a kwok GPU node runs the pod; it succeeds after 5 s)
    custom.create(ftj)
    operator = OperatorProcess(cluster.kubeconfig, tmp_path / "operator.log", env)
    operator.start()
    try:
        secret = first_listed(
            lambda: cluster.core.list_namespaced_secret(ns, field_selector="metadata.name=support-store"),
            90,
            what=f"the minted Secret\n{operator.log_tail(30)}",
        )
        assert secret.metadata.owner_references[0].kind == "FineTuneJob"
        assert EXPIRES in secret.metadata.annotations
        data = secret_keys(secret)
        assert set(data) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
        assert data["AWS_ACCESS_KEY_ID"] != s3_server.access_key

        job = first_listed(
            lambda: cluster.batch.list_namespaced_job(ns),
            60,
            what=f"the trainer Job\n{operator.log_tail(30)}",
        )
        job_text = str(job.to_dict())
        assert PLATFORM_SECRET not in job_text and "'name': 'support-store'" in job_text

        tenant = session_client(s3_server, data)
        tenant.put_object(Bucket="lorafleet", Key=f"{ns}/probe", Body=b"x")
        tenant.delete_object(Bucket="lorafleet", Key=f"{ns}/probe")
        assert tenant.get_object(Bucket="models", Key="tiny-llama/r1/manifest.json")["Body"].read()
        refusals: tuple[Callable[[], Any], ...] = (
            lambda: tenant.put_object(Bucket="lorafleet", Key="another-team/probe", Body=b"x"),
            lambda: tenant.list_objects_v2(Bucket="lorafleet"),
            lambda: tenant.put_object(Bucket="models", Key="tiny-llama/r1/manifest.json", Body=b"x"),
        )
        for call in refusals:
            with pytest.raises(ClientError) as refused:
                call()
            assert refused.value.response["Error"]["Code"] == "AccessDenied"

        # A finished job no longer needs them: the Secret goes (kwok completes the Job).
        custom.wait_status(
            "FineTuneJob",
            "support",
            lambda s, o: s.get("phase") in TERMINAL,
            timeout=120,
            what=f"the job finished\n{operator.log_tail(30)}",
        )
        wait_until(
            lambda: not cluster.core.list_namespaced_secret(ns, field_selector="metadata.name=support-store").items,
            60,
            interval=0.5,
            what="the Secret removed",
        )
    finally:
        operator.stop()
