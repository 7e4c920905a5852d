"""The default store (an object naming neither `store` nor `storeRef`) keeps each namespace apart: a FineTuneJob
writes under `<artifactStore.uri>/<namespace>/adapters/<name>/<version>`, an AdapterDeployment serves from it only
URIs under its own namespace's root (whole segments), and read-only inputs (base models, datasets) may come from
anywhere but another namespace's root. Keys with '.', '..' or empty segments are never inside a root."""

from __future__ import annotations

from typing import Any

import pytest

from lorafleet.config import OperatorSettings
from lorafleet.controllers import store_refs as binding
from lorafleet.resources import finetunejob as ftj_res
from lorafleet.resources.conditions import Reason
from lorafleet.resources.store_refs import default_location, require_shared_readable, require_within, within
from lorafleet.resources.stores import RenderError
from tests.unit import objects

SETTINGS = OperatorSettings(store_endpoint="http://minio:9000", store_uri="s3://lorafleet/prod/")
ROOT_A = "s3://lorafleet/prod/team-a"
BASE = objects.as_base_model(objects.base_model()).spec


def _ftj(namespace: str = "team-a", **output: Any) -> ftj_res.FineTuneJobObject:
    obj = objects.fine_tune_job(namespace=namespace)
    obj["spec"]["output"].update(output)
    return objects.as_fine_tune_job(obj)


def test_each_namespace_writes_under_its_own_root() -> None:
    a = ftj_res.output_target(_ftj("team-a"), SETTINGS)
    b = ftj_res.output_target(_ftj("team-b"), SETTINGS)
    assert a.adapter_uri == f"{ROOT_A}/adapters/support-bot/v1"
    assert b.adapter_uri == "s3://lorafleet/prod/team-b/adapters/support-bot/v1"  # same name, no collision
    assert a.checkpoint_uri.startswith(f"{ROOT_A}/checkpoints/")
    config = ftj_res.trainer_config(_ftj("team-a"), "tiny-llama", BASE, SETTINGS)
    assert config.output.adapter_uri == a.adapter_uri  # what the trainer publishes is what the operator verifies


def test_an_own_store_without_uri_also_gets_the_namespace_root() -> None:
    store = {"endpoint": "http://minio:9000", "credentialsSecretRef": {"name": "team-keys"}}
    target = ftj_res.output_target(_ftj(store=store), SETTINGS)
    assert target.adapter_uri == f"{ROOT_A}/adapters/support-bot/v1"


@pytest.mark.parametrize(
    ("uri", "allowed"),
    [
        (ROOT_A, True),
        (f"{ROOT_A}/experiments", True),
        ("s3://lorafleet/prod/team-b", False),  # another team's root
        ("s3://lorafleet/prod/team-ab", False),  # a prefix of the name is not the namespace
        ("s3://lorafleet/prod", False),  # everyone's
        ("s3://elsewhere/x", False),  # the platform's keys write only into the namespace's root
        (f"{ROOT_A}/../team-b", False),
    ],
)
def test_an_output_uri_in_the_default_store_stays_in_the_namespace_root(uri: str, allowed: bool) -> None:
    ftj = _ftj(uri=uri)
    if allowed:
        assert ftj_res.output_target(ftj, SETTINGS).adapter_uri.startswith(ROOT_A + "/")
        return
    with pytest.raises(RenderError) as refused:
        ftj_res.output_target(ftj, SETTINGS)
    assert refused.value.reason == Reason.STORE_NOT_ALLOWED
    assert "spec.output.uri" in refused.value.message and f"({ROOT_A}/)" in refused.value.message


def test_the_default_location_is_the_implicit_default_cluster_store() -> None:
    resolved = default_location("team-a", SETTINGS, "spec.adapters[0].artifact")
    assert resolved.root == ROOT_A and resolved.label == 'ClusterArtifactStore "default"'
    with pytest.raises(RenderError) as missing:
        default_location("team-a", OperatorSettings(store_endpoint="http://minio:9000"), "spec.output")
    assert missing.value.reason == Reason.STORE_NOT_CONFIGURED and "artifactStore.uri" in missing.value.message


@pytest.mark.parametrize(
    ("uri", "inside"),
    [
        (f"{ROOT_A}/adapters/x/v1", True),
        (f"{ROOT_A}/", True),
        ("s3://lorafleet/prod/team-ab/adapters/x/v1", False),
        ("s3://lorafleet/prod/team-b/adapters/x/v1", False),
        (f"{ROOT_A}/../team-b/adapters/x/v1", False),
        (f"{ROOT_A}/./adapters/x/v1", False),
        (f"{ROOT_A}//adapters/x/v1", False),
        (f"{ROOT_A}/%2e%2e/team-b", False),
        (f"{ROOT_A}/a\\b", False),
    ],
)
def test_within_compares_whole_plain_segments(uri: str, inside: bool) -> None:
    assert within(uri, ROOT_A) is inside


@pytest.mark.parametrize(
    ("uri", "readable"),
    [
        ("s3://models/llama/main", True),  # shared base models live outside the per-namespace area
        ("s3://lorafleet/shared-models/llama/main", True),  # the same bucket, outside <uri>/
        (f"{ROOT_A}/models/mine/r1", True),  # the team's own
        ("s3://lorafleet/prod/team-b/adapters/x/v1", False),  # another team's adapter
        ("s3://lorafleet/prod/team-b/checkpoints/team-b/job-1234", False),  # or checkpoint
        ("s3://lorafleet/prod/models/llama/main", False),  # <uri>/<segment>/ is some namespace's root
        ("s3://models/../lorafleet/prod/team-b/adapters/x/v1", False),  # a normalising proxy would go there
    ],
)
def test_read_only_inputs_may_come_from_anywhere_but_another_namespace_root(uri: str, readable: bool) -> None:
    if readable:
        require_shared_readable(uri, "team-a", SETTINGS, "spec.source.uri")
        return
    with pytest.raises(RenderError) as refused:
        require_shared_readable(uri, "team-a", SETTINGS, "spec.source.uri")
    assert refused.value.reason == Reason.STORE_NOT_ALLOWED and "spec.source.uri" in refused.value.message


def test_a_dataset_in_another_namespace_root_is_refused_before_the_trainer_runs() -> None:
    obj = objects.fine_tune_job(namespace="team-a")
    obj["spec"]["dataset"]["evalUri"] = "s3://lorafleet/prod/team-b/adapters/x/v1/data/u/adapter_model.safetensors"
    with pytest.raises(RenderError) as refused:
        ftj_res.trainer_config(objects.as_fine_tune_job(obj), "tiny-llama", BASE, SETTINGS)
    assert "spec.dataset.evalUri" in refused.value.message


def test_an_adapterdeployment_serves_from_the_default_store_only_its_own_root(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(binding, "SETTINGS", SETTINGS)
    ours = {"name": "ours", "artifact": {"uri": f"{ROOT_A}/adapters/ours/v1"}}
    theirs = {"name": "theirs", "artifact": {"uri": "s3://lorafleet/prod/team-ab/adapters/x/v1"}}
    ok = objects.adapter_deployment_obj(objects.adapter_deployment(namespace="team-a", adapters=[ours]))
    assert binding.bind_adapterdeployment(ok)[1] is None
    bad = objects.adapter_deployment_obj(objects.adapter_deployment(namespace="team-a", adapters=[ours, theirs]))
    _, refused = binding.bind_adapterdeployment(bad)
    assert refused is not None and refused.reason == Reason.STORE_NOT_ALLOWED
    assert "spec.adapters[1].artifact.uri" in refused.message and f"({ROOT_A}/)" in refused.message
    assert 'ClusterArtifactStore "default"' in refused.message  # the same wording as through storeRef


def test_a_base_model_in_the_default_store_is_shared_but_not_from_another_root(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(binding, "SETTINGS", SETTINGS)
    shared = objects.as_base_model(objects.base_model(namespace="team-a", source={"uri": "s3://models/llama/main"}))
    assert binding.bind_basemodel(shared)[1] is None
    stolen = objects.base_model(namespace="team-a", source={"uri": "s3://lorafleet/prod/team-b/adapters/x/v1"})
    _, refused = binding.bind_basemodel(objects.as_base_model(stolen))
    assert refused is not None and refused.reason == Reason.STORE_NOT_ALLOWED


def test_require_within_names_the_root() -> None:
    with pytest.raises(RenderError, match=r"outside ClusterArtifactStore \"default\"'s location"):
        require_within("s3://lorafleet/prod/team-b/x", default_location("team-a", SETTINGS, "f"), "f.uri")
