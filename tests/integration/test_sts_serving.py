"""Serving replicas with minted, read-only store credentials (artifactStore.sts), on the real MinIO.

* The adapter-sync sidecar's fetcher reads its keys from a Secret volume laid out as the kubelet writes it (a
  `..data` link swapped atomically to a new folder) and uses renewed keys without a restart: keys minted for one
  adapter only are refused the second adapter by MinIO (AccessDenied); once the files hold keys for the whole
  namespace root, the same fetcher pulls it, and another namespace's adapter stays refused. MinIO's shortest
  STS lifetime is 900 s, so the swap is proven by a changed grant, not by waiting for an expiry.
* The operator mints the AdapterDeployment's Secret (`<name>-serving-store`, controlled by it) before the
  Deployment that mounts it; the Deployment names no platform Secret; the keys read the namespace's root and the
  shared base model and are refused writes and other roots; a Secret close to expiry is minted again.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from lorafleet.contracts.serving import DesiredAdapter, DesiredAdapterSet
from lorafleet.controllers.credentials import EXPIRES
from lorafleet.serving.checks import Refusal
from lorafleet.serving.fetch import StoreFetcher
from lorafleet.serving.syncer import Prepared
from lorafleet.storage import ArtifactStore, BaseModelRef, StoreSettings, version_folder
from lorafleet.storage.sts import MintedCredentials, mint
from lorafleet.storage.sts_policy import Grant
from lorafleet_dev.operator import OperatorProcess
from lorafleet_dev.s3server import S3Server
from lorafleet_dev.testing import ClusterHandle, first_listed, wait_until
from tests.integration.operator_fixtures import Custom
from tests.s3_fixtures import refusal_codes, secret_keys, session_client
from tests.unit import objects

pytestmark = pytest.mark.integration

DURATION = 900  # MinIO's (and AWS's) minimum
BASE = "tiny"
PLATFORM_SECRET = "platform-store-keys"


def _adapter(tmp: Path, name: str) -> Path:
    src = tmp / name
    src.mkdir()
    config = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"]}
    (src / "adapter_config.json").write_text(json.dumps(config))
    (src / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    return src


class _SecretVolume:
    """A Secret volume as the kubelet's atomic writer lays it out: files are links through `..data`, which is
    swapped to a new timestamped folder in one rename."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self._n = 0

    def write(self, creds: MintedCredentials) -> None:
        self._n += 1
        folder = self.root / f"..2026_01_01_00_00_0{self._n}"
        folder.mkdir()
        for key, value in creds.secret_data().items():
            (folder / key).write_text(value)
            link = self.root / key
            if not link.is_symlink():
                link.symlink_to(f"..data/{key}")
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(folder.name)
        tmp.rename(self.root / "..data")


def test_the_sidecar_uses_renewed_keys_without_a_restart(
    s3_bucket: str, store_settings: StoreSettings, tmp_path: Path
) -> None:
    root_store = ArtifactStore(store_settings)
    desired_adapters = {}
    for namespace, name in (("team-a", "one"), ("team-a", "two"), ("team-b", "theirs")):
        folder = version_folder(f"s3://{s3_bucket}/lorafleet/{namespace}", "adapter", name, "v1")
        pushed = root_store.push(
            _adapter(tmp_path, name),
            folder,
            kind="adapter",
            name=name,
            version="v1",
            base_model=BaseModelRef(name=BASE),
        )
        desired_adapters[name] = DesiredAdapter(name=name, uri=folder.uri, digest=pushed.digest)
    desired = DesiredAdapterSet(base_model=BASE, max_lora_rank=16, adapters=list(desired_adapters.values()))
    root_a = f"s3://{s3_bucket}/lorafleet/team-a"

    volume = _SecretVolume(tmp_path / "store-credentials")
    only_one = mint(
        store_settings,
        Grant(read_write=(), read_only=(desired_adapters["one"].uri,)),
        duration_seconds=DURATION,
        namespace="team-a",
        name="chat",
    )
    volume.write(only_one)
    env = {"LORAFLEET_STORE_ENDPOINT": str(store_settings.endpoint), "LORAFLEET_STORE_REGION": store_settings.region}
    fetcher = StoreFetcher(env, credentials_dir=volume.root)
    adapters_dir = tmp_path / "adapters"

    def fetch(name: str) -> Prepared | Refusal:
        return fetcher(desired_adapters[name], desired, adapters_dir)

    assert isinstance(fetch("one"), Prepared)
    refused = fetch("two")
    assert isinstance(refused, Refusal) and "denied" in refused.message.lower(), refused

    renewed = mint(
        store_settings,
        Grant(read_write=(), read_only=(root_a,)),
        duration_seconds=DURATION,
        namespace="team-a",
        name="chat",
    )
    volume.write(renewed)
    assert isinstance(fetch("two"), Prepared)  # the same fetcher, the files' new keys
    assert isinstance(fetch("theirs"), Refusal)  # another namespace's root: refused by MinIO
    for value in (renewed.secret_access_key, renewed.session_token, only_one.secret_access_key):
        assert value not in str(fetch("theirs"))


def test_operator_mints_read_only_keys_for_the_replicas_and_renews_them(
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
        "LORAFLEET_STORE_STS_DURATION_SECONDS": str(DURATION),
        "LORAFLEET_RESYNC_SECONDS": "3",
        "LORAFLEET_NAMESPACES": json.dumps([ns]),
    }
    custom = Custom(cluster, ns)
    custom.create({**objects.base_model(namespace=ns), "metadata": {"name": "tiny-llama", "namespace": ns}})
    ad = objects.adapter_deployment(name="chat", namespace=ns)
    ad["metadata"] = {"name": "chat", "namespace": ns}
    ad["spec"]["adapters"] = [{"name": "sql", "artifact": {"uri": f"s3://lorafleet/{ns}/adapters/sql/v3"}}]
    ad["spec"]["replicas"] = 1
    ad["spec"]["resources"] = {"gpusPerReplica": 0, "cpu": 1, "memory": "2Gi"}
    custom.create(ad)
    selector = "metadata.name=chat-serving-store"
    operator = OperatorProcess(cluster.kubeconfig, tmp_path / "operator.log", env)
    operator.start()
    try:
        secret = first_listed(
            lambda: cluster.core.list_namespaced_secret(ns, field_selector=selector),
            90,
            what=f"the minted Secret\n{operator.log_tail(30)}",
        )
        assert secret.metadata.owner_references[0].kind == "AdapterDeployment"
        assert secret.metadata.owner_references[0].controller
        data = secret_keys(secret)
        assert set(data) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}

        deployment = first_listed(
            lambda: cluster.apps.list_namespaced_deployment(ns),
            60,
            what=f"the Deployment\n{operator.log_tail(30)}",
        )
        text = str(deployment.to_dict())
        assert PLATFORM_SECRET not in text and "'secret_name': 'chat-serving-store'" in text

        replica = session_client(s3_server, data)
        assert replica.list_objects_v2(Bucket="lorafleet", Prefix=f"{ns}/")["KeyCount"] == 0  # allowed, empty
        assert replica.get_object(Bucket="models", Key="tiny-llama/r1/manifest.json")["Body"].read()
        refusals: dict[str, Callable[[], Any]] = {
            "write its own root": lambda: replica.put_object(Bucket="lorafleet", Key=f"{ns}/probe", Body=b"x"),
            "another root": lambda: replica.list_objects_v2(Bucket="lorafleet", Prefix="another-team/"),
            "the bucket": lambda: replica.list_objects_v2(Bucket="lorafleet"),
            "write the base model": lambda: replica.put_object(
                Bucket="models", Key="tiny-llama/r1/manifest.json", Body=b"x"
            ),
        }
        assert refusal_codes(refusals) == dict.fromkeys(refusals, "AccessDenied")

        # Less than a third of the lifetime left: the next reconcile (the resync, every 3 s) mints again.
        soon = (datetime.now(UTC) + timedelta(seconds=60)).isoformat()
        cluster.core.patch_namespaced_secret("chat-serving-store", ns, {"metadata": {"annotations": {EXPIRES: soon}}})
        renewed = wait_until(
            lambda: [
                s
                for s in cluster.core.list_namespaced_secret(ns, field_selector=selector).items
                if s.metadata.annotations.get(EXPIRES) != soon
            ],
            60,
            interval=0.5,
            what=f"the renewed Secret\n{operator.log_tail(30)}",
        )[0]
        assert base64.b64decode(renewed.data["AWS_ACCESS_KEY_ID"]).decode() != data["AWS_ACCESS_KEY_ID"]
    finally:
        operator.stop()
