"""With artifactStore.sts, a FineTuneJob of the default store is planned with minted credentials: its pods read
the operator's per-job Secret (key pair and session token), never the platform's Secret; the grant is read-write
on the job's output inside the namespace's root and read-only on the inputs it reads with those keys; a grant
reaching another namespace's root is refused before anything is minted (StoreNotAllowed), however the store was
bound. The session policy limits objects and listings to those prefixes (MinIO enforces it:
tests/integration/test_sts_credentials.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lorafleet.api.objects import FineTuneJobObject
from lorafleet.config import OperatorSettings
from lorafleet.resources import finetunejob as ftj_res
from lorafleet.resources.conditions import Reason
from lorafleet.resources.stores import RenderError, default_store
from lorafleet.storage.sts_policy import Grant, session_name, session_policy
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


def _ftj(**spec: Any) -> FineTuneJobObject:
    return objects.as_fine_tune_job(objects.fine_tune_job(namespace="team-a", **spec))


def _base(**spec: Any) -> Any:
    return objects.as_base_model(objects.ready(objects.base_model(namespace="team-a", **spec))).spec


def _secret_refs(job: Any) -> set[str]:
    refs = set()
    pod = job["spec"]["template"]["spec"]
    for container in [*pod["containers"], *pod["initContainers"]]:
        for env in container["env"]:
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                refs.add(f"{env['name']}={ref['name']}/{ref['key']}")
    return refs


def test_trainer_pods_read_the_minted_secret_never_the_platforms() -> None:
    ftj, base = _ftj(), _base()
    config = ftj_res.trainer_config(ftj, "tiny-llama", base, ON)
    job = ftj_res.build_job(ftj, base, config, ON)
    secret = ftj_res.names_of(ftj).credentials
    assert _secret_refs(job) == {
        f"AWS_ACCESS_KEY_ID={secret}/AWS_ACCESS_KEY_ID",
        f"AWS_SECRET_ACCESS_KEY={secret}/AWS_SECRET_ACCESS_KEY",
        f"AWS_SESSION_TOKEN={secret}/AWS_SESSION_TOKEN",
    }
    assert PLATFORM_SECRET not in json.dumps(job) and PLATFORM_SECRET not in json.dumps(config.render())
    # Off (the default): the copied platform Secret, as before.
    off_job = ftj_res.build_job(ftj, base, ftj_res.trainer_config(ftj, "tiny-llama", base, OFF), OFF)
    assert f"AWS_ACCESS_KEY_ID={PLATFORM_SECRET}/AWS_ACCESS_KEY_ID" in _secret_refs(off_job)
    assert ftj_res.workload_grant(ftj, base, OFF) is None


def test_the_grant_is_the_output_read_write_and_the_inputs_read_only() -> None:
    grant = ftj_res.workload_grant(_ftj(), _base(), ON)
    assert grant == Grant(
        read_write=(ROOT_A,), read_only=("s3://models/tiny-llama/r1", "s3://datasets/support/train.jsonl")
    )


def test_storeref_default_is_granted_like_no_store() -> None:
    bound = _ftj().spec.output.model_copy(update={"store": default_store(ON), "uri": ROOT_A})
    ftj = _ftj()
    ftj = ftj.model_copy(update={"spec": ftj.spec.model_copy(update={"output": bound})})
    assert ftj_res.workload_grant(ftj, _base(), ON) == ftj_res.workload_grant(_ftj(), _base(), ON)


def test_an_own_store_keeps_its_secret() -> None:
    store = {"endpoint": "http://minio:9000", "credentialsSecretRef": {"name": "team-keys"}}
    assert (
        ftj_res.workload_grant(_ftj(output={"adapterName": "b", "version": "v1", "store": store}), _base(), ON) is None
    )


@pytest.mark.parametrize(
    ("where", "spec", "base"),
    [
        # A team's ArtifactStore equal to the platform's store, rooted at B's prefix, bound as the output.
        ("spec.output.uri", {"output": {"adapterName": "b", "version": "v1", "uri": "s3://lorafleet/prod/team-b"}}, {}),
        ("spec.dataset.uri", {"dataset": {"uri": "s3://lorafleet/prod/team-b/data.jsonl", "format": "chat"}}, {}),
        ("BaseModel spec.source.uri", {}, {"source": {"uri": "s3://lorafleet/prod/team-b/adapters/x/v1"}}),
    ],
)
def test_nothing_is_granted_in_another_namespaces_root(where: str, spec: dict[str, Any], base: dict[str, Any]) -> None:
    ftj = _ftj(**spec)
    if "output" in spec:  # as a bound storeRef would leave it: the platform's store, another root
        bound = ftj.spec.output.model_copy(update={"store": default_store(ON)})
        ftj = ftj.model_copy(update={"spec": ftj.spec.model_copy(update={"output": bound})})
    with pytest.raises(RenderError) as refused:
        ftj_res.workload_grant(ftj, _base(**base), ON)
    assert refused.value.reason == Reason.STORE_NOT_ALLOWED and where in refused.value.message


def test_the_session_policy_names_only_the_granted_prefixes() -> None:
    policy = session_policy(Grant(read_write=(ROOT_A,), read_only=("s3://models/llama/main",)))
    by_sid = {s["Sid"]: s for s in policy["Statement"]}
    assert by_sid["ReadWriteObjects"]["Resource"] == [
        "arn:aws:s3:::lorafleet/prod/team-a",
        "arn:aws:s3:::lorafleet/prod/team-a/*",
    ]
    assert by_sid["ReadWriteList0"]["Condition"] == {"StringLike": {"s3:prefix": ["prod/team-a", "prod/team-a/*"]}}
    assert by_sid["ReadOnlyObjects"]["Action"] == ["s3:GetObject"]
    assert by_sid["Uploads"]["Action"] == ["s3:ListBucketMultipartUploads"]
    assert not any("Delete" in a for a in by_sid["ReadOnlyObjects"]["Action"])
    assert session_name("team-a", "job/with spaces") == "lorafleet.team-a.job-with-spaces"
