"""With artifactStore.sts, an AdapterDeployment's replicas are planned with read-only minted credentials: the
adapter-sync sidecar reads the operator's per-AdapterDeployment Secret as a volume (refreshed in place by the
kubelet, so renewed keys reach a running replica), the base-model fetch reads it as env with its session token,
and no container or volume names the platform's Secret. The grant is read-only on the namespace's root of the
default store and the base model's weights in the default store; a base model in another namespace's root is
refused before anything is minted (StoreNotAllowed). Without STS the replicas keep the store's Secret."""

from __future__ import annotations

from typing import Any

import pytest

from lorafleet.api.objects import AdapterDeploymentObject
from lorafleet.config import OperatorSettings
from lorafleet.resources import adapterdeployment as ad_res
from lorafleet.resources import serving_credentials as minted
from lorafleet.resources.conditions import Reason
from lorafleet.resources.stores import RenderError
from lorafleet.storage.sts_policy import Grant, session_policy
from tests.unit import objects

PLATFORM_SECRET = "platform-store-keys"
ON = OperatorSettings(
    store_endpoint="http://minio:9000",
    store_uri="s3://lorafleet/prod",
    store_credentials_secret=PLATFORM_SECRET,
    store_sts=True,
)
OFF = ON.model_copy(update={"store_sts": False})
ROOT_A = "s3://lorafleet/prod/team-a"


def _ad() -> AdapterDeploymentObject:
    return objects.adapter_deployment_obj(objects.adapter_deployment(name="chat", namespace="team-a"))


def _base(uri: str = "s3://models/tiny-llama/r1") -> Any:
    return objects.as_base_model(
        objects.ready(objects.base_model(namespace="team-a", source={"uri": uri}), digest="sha256:" + "cd" * 32)
    )


def _pod(settings: OperatorSettings, base_uri: str = "s3://models/tiny-llama/r1") -> dict[str, Any]:
    children = ad_res.desired_children(_ad(), _base(base_uri), [], {}, settings)
    deployment = next(c for c in children if c["kind"] == "Deployment")
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return pod


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in [*pod["containers"], *pod["initContainers"]] if c["name"] == name)


def _secret_refs(container: dict[str, Any]) -> set[str]:
    refs = set()
    for env in container.get("env", []):
        ref = (env.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            refs.add(f"{env['name']}={ref['name']}/{ref['key']}")
    return refs


def test_replicas_read_the_minted_secret_never_the_platforms() -> None:
    pod = _pod(ON)
    secret = minted.secret_name("chat")
    assert secret == "chat-serving-store"  # not "chat-store": a FineTuneJob "chat" mints there
    assert PLATFORM_SECRET not in str(pod)

    sidecar = _container(pod, "adapter-sync")
    assert _secret_refs(sidecar) == set()  # files, not env: env is fixed when the container starts
    assert f"--store-credentials-dir={minted.MOUNT}" in sidecar["command"]
    assert {"name": minted.VOLUME, "mountPath": minted.MOUNT, "readOnly": True} in sidecar["volumeMounts"]
    volume = next(v for v in pod["volumes"] if v["name"] == minted.VOLUME)
    assert volume["secret"]["secretName"] == secret and "items" not in volume["secret"]
    assert not any(e["name"] == "LORAFLEET_STORE_ANONYMOUS" for e in sidecar["env"])

    fetch = _container(pod, "fetch-base-model")
    assert _secret_refs(fetch) == {
        f"AWS_ACCESS_KEY_ID={secret}/AWS_ACCESS_KEY_ID",
        f"AWS_SECRET_ACCESS_KEY={secret}/AWS_SECRET_ACCESS_KEY",
        f"AWS_SESSION_TOKEN={secret}/AWS_SESSION_TOKEN",
    }
    engine = _container(pod, "vllm")
    assert "store-credentials" not in str(engine)  # vLLM never holds store keys


def test_without_sts_the_replicas_keep_the_stores_secret() -> None:
    pod = _pod(OFF)
    sidecar = _container(pod, "adapter-sync")
    assert _secret_refs(sidecar) == {
        f"AWS_ACCESS_KEY_ID={PLATFORM_SECRET}/AWS_ACCESS_KEY_ID",
        f"AWS_SECRET_ACCESS_KEY={PLATFORM_SECRET}/AWS_SECRET_ACCESS_KEY",
    }
    assert minted.VOLUME not in str(pod)
    assert minted.serving_grant(_ad(), _base().spec, OFF) is None


def test_the_grant_is_read_only_on_the_namespace_root_and_the_base_model() -> None:
    grant = minted.serving_grant(_ad(), _base().spec, ON)
    assert grant == Grant(read_write=(), read_only=(ROOT_A, "s3://models/tiny-llama/r1"))
    policy = session_policy(grant)
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert actions == {"s3:GetObject", "s3:ListBucket"}  # nothing writable, no multipart listing


def test_a_base_model_in_another_namespaces_root_is_refused_before_minting() -> None:
    other = "s3://lorafleet/prod/team-b/models/x/main"
    with pytest.raises(RenderError) as info:
        minted.serving_grant(_ad(), _base(other).spec, ON)
    assert info.value.reason == Reason.STORE_NOT_ALLOWED
    assert "BaseModel spec.source.uri" in info.value.message and f"{ROOT_A}/" in info.value.message


def test_a_base_model_in_its_own_store_is_not_granted() -> None:
    base = objects.as_base_model(
        objects.ready(
            objects.base_model(
                namespace="team-a",
                source={
                    "uri": "s3://theirs/m/r1",
                    "store": {"endpoint": "http://minio:9000", "credentialsSecretRef": {"name": "team-keys"}},
                },
            )
        )
    )
    grant = minted.serving_grant(_ad(), base.spec, ON)
    assert grant == Grant(read_write=(), read_only=(ROOT_A,))
    fetch = _container(
        ad_res.build_deployment(_ad(), "tiny-llama", base.spec, 16, ON)["spec"]["template"]["spec"], "fetch-base-model"
    )
    assert _secret_refs(fetch) == {
        "AWS_ACCESS_KEY_ID=team-keys/AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY=team-keys/AWS_SECRET_ACCESS_KEY",
    }
