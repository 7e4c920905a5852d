"""A BaseModel in a ClusterArtifactStore with spec.sts is planned so that the store's own Secret never leaves the
operator's namespace (issue 15):

* bound, its source names no credentials Secret (the operator's checks use the store's keys from its namespace), so
  the BaseModel controller looks for no Secret in the tenant's namespace;
* a FineTuneJob whose output is in the same store reads the weights with the job's minted keys (the trainer config's
  base store and the fetch container name only `<job>-store`, with its session token); its grant is read-only on the
  weights and read-write only on its own version folder and checkpoints, so the weights are not writable;
* a FineTuneJob or AdapterDeployment whose own keys are not minted by that store is StoreNotAllowed naming the
  BaseModel's storeRef, before anything is minted;
* an AdapterDeployment served with keys minted by such a store mounts that store's CA bundle into the adapter-sync
  sidecar (a volume of its own when the base model's store has another one).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from lorafleet.api.common import S3CredentialsRef
from lorafleet.api.objects import BaseModelObject, FineTuneJobObject
from lorafleet.api.stores import StoreRef
from lorafleet.config import OperatorSettings
from lorafleet.resources import adapterdeployment as ad_res
from lorafleet.resources import finetunejob as ftj_res
from lorafleet.resources.conditions import Reason
from lorafleet.resources.status import basemodel_secret_names
from lorafleet.resources.store_refs import MintingStore, ResolvedStore, read_only_source, resolve
from lorafleet.resources.stores import RenderError
from lorafleet.storage.sts_policy import SECRET_KEYS, Grant, session_policy
from tests.unit import objects

NS = "team-a"
STORE_SECRET = "platform-store-keys"
SETTINGS = OperatorSettings(store_endpoint="http://minio:9000", store_uri="s3://lorafleet/prod")
ROOT = "s3://lorafleet/teams/team-a"
BASE_URI = f"{ROOT}/models/llama/main"


def _store(name: str = "shared", ca: str | None = None) -> MintingStore:
    spec: dict[str, Any] = {
        "endpoint": "http://minio:9000",
        "bucket": "lorafleet",
        "prefix": "teams",
        "credentialsSecretRef": {"name": STORE_SECRET},
        "allowedNamespaces": {"names": [NS]},
        "sts": {"enabled": True},
    }
    if ca:
        spec["caBundleSecretRef"] = {"name": ca, "key": "ca.crt"}
    ref = StoreRef(kind="ClusterArtifactStore", name=name)
    resolved = resolve(ref, NS, {"spec": spec}, {}, SETTINGS, "spec.source")
    assert isinstance(resolved.store, MintingStore)
    return resolved.store


def _base(store: MintingStore | None = None, uri: str = BASE_URI) -> BaseModelObject:
    """As controllers.store_refs.bind_basemodel leaves it (storeRef replaced by the bound store)."""
    bm = objects.as_base_model(objects.ready(objects.base_model(namespace=NS, source={"uri": uri})))
    if store is None:
        return bm
    resolved = ResolvedStore(StoreRef(kind="ClusterArtifactStore", name=store.store_name), store, store.root, store.sts)
    source = bm.spec.source.model_copy(update={"store": read_only_source(resolved)})
    return bm.model_copy(update={"spec": bm.spec.model_copy(update={"source": source})})


def _ftj(store: MintingStore | None, **spec: Any) -> FineTuneJobObject:
    """As controllers.store_refs.bind_finetunejob leaves an output bound to a minting store."""
    ftj = objects.as_fine_tune_job(objects.fine_tune_job(namespace=NS, **spec))
    if store is None:
        return ftj
    minted = store.model_copy(
        update={"credentials_secret_ref": S3CredentialsRef(name=ftj_res.names_of(ftj).credentials)}
    )
    ref = StoreRef(kind="ClusterArtifactStore", name=store.store_name)
    output = ftj.spec.output.model_copy(update={"store": minted, "uri": store.root, "store_ref": ref})
    return ftj.model_copy(update={"spec": ftj.spec.model_copy(update={"output": output})})


def _secret_refs(container: dict[str, Any]) -> set[str]:
    return {
        f"{e['name']}={ref['name']}/{ref['key']}"
        for e in container.get("env", [])
        if (ref := (e.get("valueFrom") or {}).get("secretKeyRef"))
    }


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in [*pod["containers"], *pod["initContainers"]] if c["name"] == name)


def test_the_bound_base_model_names_no_secret_of_the_tenants_namespace() -> None:
    base = _base(_store(ca="store-ca"))
    store = base.spec.source.store
    assert isinstance(store, MintingStore) and store.credentials_secret_ref is None
    assert store.platform_credentials.name == STORE_SECRET  # what the operator reads, in its own namespace
    assert basemodel_secret_names(base) == []


def test_the_trainer_fetches_the_base_weights_with_the_jobs_minted_keys() -> None:
    store = _store()
    ftj, base = _ftj(store), _base(store)
    secret = ftj_res.names_of(ftj).credentials
    config = ftj_res.trainer_config(ftj, "llama", base.spec, SETTINGS)
    assert config.base_model.store is not None and config.base_model.store.credentials_secret_ref is not None
    assert config.base_model.store.credentials_secret_ref.name == secret
    job = ftj_res.build_job(ftj, base.spec, config, SETTINGS)
    pod = job["spec"]["template"]["spec"]
    minted = {f"{k}={secret}/{k}" for k in SECRET_KEYS}
    assert _secret_refs(_container(pod, "fetch-base-model")) == minted
    assert _secret_refs(_container(pod, ftj_res.TRAINER_CONTAINER)) == minted
    assert STORE_SECRET not in json.dumps(job) and STORE_SECRET not in json.dumps(config.render())


def test_the_grant_reads_the_weights_and_writes_only_the_jobs_own_folders() -> None:
    store = _store()
    dataset = f"{ROOT}/data/train.jsonl"
    ftj = _ftj(store, dataset={"uri": dataset, "format": "chat", "evalUri": "s3://datasets/eval.jsonl"})
    grant = ftj_res.workload_grant(ftj, _base(store).spec, SETTINGS)
    target = ftj_res.output_target(ftj, SETTINGS)
    assert grant == Grant(
        read_write=(f"{ROOT}/adapters/support-bot/v1", target.checkpoint_uri),
        read_only=(BASE_URI, dataset),  # the dataset outside the store's location is not granted
    )
    written = {r for s in session_policy(grant)["Statement"] if s["Sid"] == "ReadWriteObjects" for r in s["Resource"]}
    assert not any(r.startswith("arn:aws:s3:::lorafleet/teams/team-a/models") for r in written)
    # Weights elsewhere (the default store's shared models) are not granted: the minted keys reach no further.
    elsewhere = ftj_res.workload_grant(ftj, _base().spec, SETTINGS)
    assert elsewhere is not None and BASE_URI not in elsewhere.read_only


@pytest.mark.parametrize("output", ["another minting store", "the default store"])
def test_weights_in_a_minting_store_that_does_not_mint_the_jobs_keys_are_refused(output: str) -> None:
    base = _base(_store("shared"))
    ftj = _ftj(_store("other")) if output == "another minting store" else _ftj(None)
    with pytest.raises(RenderError) as refused:
        ftj_res.trainer_config(ftj, "llama", base.spec, SETTINGS)
    assert refused.value.reason == Reason.STORE_NOT_ALLOWED
    message = refused.value.message
    assert 'ClusterArtifactStore "shared"' in message and "BaseModel spec.source.storeRef" in message, message
    assert "spec.output.storeRef" in message and STORE_SECRET not in message


def _deployment_pod(base: BaseModelObject, minting: MintingStore | None) -> dict[str, Any]:
    ad = objects.adapter_deployment_obj(objects.adapter_deployment(namespace=NS, adapters=[]))
    children = ad_res.desired_children(ad, base, [], {}, SETTINGS, minting)
    pod: dict[str, Any] = next(c for c in children if c["kind"] == "Deployment")["spec"]["template"]["spec"]
    return pod


def _env_names(container: dict[str, Any]) -> list[str]:
    return [e["name"] for e in container["env"]]


def test_the_sidecar_verifies_the_minting_store_with_its_ca_bundle() -> None:
    minting = _store(ca="shared-ca")
    pod = _deployment_pod(_base(), minting)  # the base model in the default store, without a CA bundle
    sidecar = _container(pod, "adapter-sync")
    volume = next(v for v in pod["volumes"] if v["name"] == ad_res.SIDECAR_CA_VOLUME)
    assert volume["secret"] == {"secretName": "shared-ca", "items": [{"key": "ca.crt", "path": "ca.pem"}]}
    mount_path = f"/etc/lorafleet/{ad_res.SIDECAR_CA_VOLUME}"
    assert {"name": ad_res.SIDECAR_CA_VOLUME, "mountPath": mount_path, "readOnly": True} in sidecar["volumeMounts"]
    assert {"name": "AWS_CA_BUNDLE", "value": f"{mount_path}/ca.pem"} in sidecar["env"]
    assert "AWS_CA_BUNDLE" not in _env_names(_container(pod, "fetch-base-model"))  # the default store has none
    assert STORE_SECRET not in json.dumps(pod)


def test_a_base_model_in_the_same_store_shares_the_ca_volume() -> None:
    minting = _store(ca="shared-ca")
    pod = _deployment_pod(_base(minting), minting)
    assert [v["name"] for v in pod["volumes"] if "secret" in v and "ca" in v["name"]] == ["store-ca"]
    for name in ("adapter-sync", "fetch-base-model"):
        container = _container(pod, name)
        assert _env_names(container).count("AWS_CA_BUNDLE") == 1
        assert len(_env_names(container)) == len(set(_env_names(container)))  # the API server refuses duplicates
        assert any(m["name"] == "store-ca" for m in container["volumeMounts"])
    assert _secret_refs(_container(pod, "fetch-base-model")) == {f"{k}=chat-serving-store/{k}" for k in SECRET_KEYS}


def test_the_sidecar_keeps_the_base_models_ca_without_a_minting_store() -> None:
    base = objects.as_base_model(
        objects.ready(
            objects.base_model(
                namespace=NS,
                source={"uri": "s3://models/x/main", "store": {"endpoint": "http://minio:9000",
                        "caBundleSecretRef": {"name": "models-ca", "key": "ca.crt"}}},
            )
        )
    )  # fmt: skip
    pod = _deployment_pod(base, None)
    assert {"name": "AWS_CA_BUNDLE", "value": "/etc/lorafleet/store-ca/ca.pem"} in _container(pod, "adapter-sync")[
        "env"
    ]
    assert ad_res.SIDECAR_CA_VOLUME not in json.dumps(pod)


def test_serving_weights_of_a_minting_store_without_its_minted_keys_is_refused() -> None:
    with pytest.raises(RenderError) as refused:
        _deployment_pod(_base(_store("shared")), None)
    assert refused.value.reason == Reason.STORE_NOT_ALLOWED
    assert 'ClusterArtifactStore "shared"' in refused.value.message
