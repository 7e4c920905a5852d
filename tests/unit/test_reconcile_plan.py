"""The pure decisions of each reconcile pass: what is applied when, and what the trainer reported.

Children are rendered whole or not at all: nothing while the BaseModel is missing or not Ready, nothing for a
finished FineTuneJob (never restarted), and an unrenderable spec becomes a condition instead of an exception.
"""

from __future__ import annotations

import json
import urllib.request
from datetime import UTC, datetime

import pytest

from lorafleet import k8s
from lorafleet.config import OperatorSettings
from lorafleet.contracts.trainer import PROGRESS_CONFIG_MAP_ENV, PROGRESS_KEY, TrainerReport
from lorafleet.controllers import adapterdeployment as ad_controller
from lorafleet.controllers import finetunejob as ftj_controller
from lorafleet.controllers.triggers import owners
from lorafleet.resources import finetunejob as ftj_res
from lorafleet.resources.conditions import get_condition
from lorafleet.resources.stores import RenderError
from tests.unit import objects

SETTINGS = OperatorSettings(store_endpoint="http://minio:9000", store_uri="s3://lorafleet")
NO_STORE = OperatorSettings()
RBAC = ["ServiceAccount", "Role", "RoleBinding"]
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _pure(monkeypatch: pytest.MonkeyPatch) -> None:
    """plan is pure: besides the refused sockets of this tier, any read of the store, a Secret or the API server
    from a plan fails the test."""

    def refused(*_: object, **__: object) -> None:
        raise AssertionError("plan read from outside: observe reads, plan only computes")

    monkeypatch.setattr(ad_controller.artifacts, "check_version", refused)
    monkeypatch.setattr(ad_controller.artifacts.MANIFESTS, "get", refused)
    for name in ("get", "list_", "apply", "delete", "patch_status"):
        monkeypatch.setattr(k8s, name, refused)


def _kinds(children: list[dict]) -> list[str]:
    return [c["kind"] for c in children]


# The controllers' plans on typed objects, as the handlers parse them.
def _ftj_plan(ftj: dict, base: dict | None, settings: OperatorSettings) -> tuple[list[dict] | None, RenderError | None]:
    typed = objects.fine_tune_job_obj(ftj)
    assert typed is not None
    return ftj_controller.plan(typed, objects.basemodel_obj(base), settings)


def _ad_plan(
    ad: dict, base: dict | None, jobs: dict[str, dict | None], settings: OperatorSettings
) -> tuple[list[dict] | None, RenderError | None]:
    typed_jobs = objects.fine_tune_jobs(jobs)
    return ad_controller.plan(objects.adapter_deployment_obj(ad), objects.basemodel_obj(base), typed_jobs, settings)


def _ranks(ad: dict, jobs: dict[str, dict | None]) -> dict[str, int | None]:
    return ad_controller.adapter_ranks(objects.adapter_deployment_obj(ad), objects.fine_tune_jobs(jobs))


def test_finetunejob_waits_for_a_missing_base_model() -> None:
    assert _ftj_plan(objects.fine_tune_job(), None, SETTINGS) == (None, None)


def test_finetunejob_waits_for_a_base_model_that_is_not_ready() -> None:
    assert _ftj_plan(objects.fine_tune_job(), objects.base_model(), SETTINGS) == (None, None)


def test_finetunejob_renders_progress_rbac_policy_and_job_when_base_is_ready() -> None:
    children, error = _ftj_plan(objects.fine_tune_job(), objects.ready(objects.base_model()), SETTINGS)
    assert error is None
    assert _kinds(children) == ["ConfigMap", *RBAC, "NetworkPolicy", "Job"]  # the Job last


def test_the_trainer_config_rides_in_the_pod_template_and_cannot_be_replaced() -> None:
    """The config is bound to the immutable Job (no ConfigMap a tenant could edit): mounted by the downward API
    from an annotation that a user's podAnnotations of the same key cannot replace."""
    ftj = objects.fine_tune_job(resources={"podAnnotations": {ftj_res.CONFIG_ANNOTATION: "{}", "team": "a"}})
    children, error = _ftj_plan(ftj, objects.ready(objects.base_model()), SETTINGS)
    assert error is None and children is not None
    job = next(c for c in children if c["kind"] == "Job")
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    assert annotations["team"] == "a"
    assert json.loads(annotations[ftj_res.CONFIG_ANNOTATION])["job"]["name"] == "support"
    volume = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    field = volume["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"]
    assert field == f"metadata.annotations['{ftj_res.CONFIG_ANNOTATION}']"


def test_a_config_too_large_for_an_annotation_is_a_condition_naming_the_fields(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ftj_res, "CONFIG_MAX_BYTES", 64)
    children, error = _ftj_plan(objects.fine_tune_job(), objects.ready(objects.base_model()), SETTINGS)
    assert children is None and error is not None
    assert error.reason == "InvalidSpec" and "spec.evaluation" in error.message


def test_distributed_finetunejob_adds_a_headless_service() -> None:
    ftj = objects.fine_tune_job(resources={"nodes": 2, "gpusPerNode": 1})
    children, _ = _ftj_plan(ftj, objects.ready(objects.base_model()), SETTINGS)
    assert _kinds(children) == ["ConfigMap", *RBAC, "Service", "NetworkPolicy", "Job"]
    assert children[4]["spec"]["clusterIP"] == "None"


def test_finished_finetunejob_is_never_restarted() -> None:
    for phase in ("Succeeded", "Failed"):
        ftj = {**objects.fine_tune_job(), "status": {"phase": phase}}
        assert _ftj_plan(ftj, objects.ready(objects.base_model()), SETTINGS) == (None, None)


def test_missing_store_is_an_error_not_a_crash() -> None:
    base_on_pvc = objects.ready(objects.base_model(source={"uri": "pvc://models/tiny"}))
    children, error = _ftj_plan(objects.fine_tune_job(), base_on_pvc, NO_STORE)
    assert children is None  # an unrenderable spec leaves the children as they are
    assert isinstance(error, RenderError)
    assert error.reason == "StoreNotConfigured"
    assert "spec.output.uri" in error.message
    _, error = _ftj_plan(objects.fine_tune_job(), objects.ready(objects.base_model()), NO_STORE)
    assert error is not None and "BaseModel spec.source.store" in error.message


def test_render_error_becomes_conditions() -> None:
    """A render error is an input of the status function: Ready and Progressing False, Degraded True, and the
    conditions' lastTransitionTime holds while the error does."""
    ftj = objects.fine_tune_job()
    ftj["metadata"]["generation"] = 3
    error = RenderError("StoreNotConfigured", "no store")
    base = objects.ready(objects.base_model())
    status = objects.finetunejob_status(ftj, base_model=base, job=None, now=NOW, render_error=error)
    assert status["phase"] == "Pending"
    ready = get_condition(status["conditions"], "Ready")
    progressing = get_condition(status["conditions"], "Progressing")
    degraded = get_condition(status["conditions"], "Degraded")
    assert ready is not None and ready["status"] == "False" and ready["reason"] == "StoreNotConfigured"
    assert progressing is not None and progressing["status"] == "False"
    assert degraded is not None and degraded["status"] == "True" and degraded["observedGeneration"] == 3
    later = NOW.replace(hour=13)
    again = objects.finetunejob_status(
        {**ftj, "status": status}, base_model=base, job=None, now=later, render_error=error
    )
    assert again["conditions"] == status["conditions"]
    ad = objects.adapter_deployment()
    ad_status = objects.adapterdeployment_status(
        ad, base_model=base, fine_tune_jobs={}, deployment=None, service_host=None, now=NOW, render_error=error
    )
    ad_degraded = get_condition(ad_status["conditions"], "Degraded")
    assert ad_degraded is not None and ad_degraded["reason"] == "StoreNotConfigured"


def _pod(message: str, finished: str, container: str = "trainer") -> dict:
    terminated = {"exitCode": 0, "message": message, "finishedAt": finished}
    return {"status": {"containerStatuses": [{"name": container, "state": {"terminated": terminated}}]}}


def test_trainer_report_takes_the_newest_json_termination_message() -> None:
    old = _pod(json.dumps({"progress": {"step": 10}}), "2026-11-22T10:00:00Z")
    new = _pod(json.dumps({"progress": {"step": 20}}), "2026-11-22T11:00:00Z")
    logs = _pod("Traceback (most recent call last): ...", "2026-11-22T12:00:00Z")
    other = _pod(json.dumps({"progress": {"step": 99}}), "2026-11-22T13:00:00Z", container="fetch-base-model")
    assert ftj_controller.trainer_report([old, new, logs, other]) == TrainerReport.model_validate(
        {"progress": {"step": 20}}
    )
    assert ftj_controller.trainer_report([]) is None


def test_adapterdeployment_waits_for_base_model() -> None:
    assert _ad_plan(objects.adapter_deployment(), None, {}, SETTINGS) == (None, None)


def test_adapterdeployment_serves_only_adapters_that_can_be_served() -> None:
    ad = objects.adapter_deployment()
    running = {**objects.fine_tune_job(), "status": {"phase": "Running"}}
    children, error = _ad_plan(ad, objects.ready(objects.base_model()), {"support": running}, SETTINGS)
    assert error is None
    # The Deployment last: its pods never start before their ConfigMap and policies exist.
    assert _kinds(children) == [
        "ConfigMap", "Service", "PodDisruptionBudget", "NetworkPolicy", "NetworkPolicy", "Deployment"
    ]  # fmt: skip
    desired = json.loads(children[0]["data"]["adapters.json"])
    assert [a["name"] for a in desired["adapters"]] == ["sql"]  # support-bot waits for its FineTuneJob


def test_adapter_set_changes_do_not_touch_the_pod_template() -> None:
    """Adding an adapter must not roll the pods: it only changes the ConfigMap."""
    ad = objects.adapter_deployment()
    base = objects.ready(objects.base_model())
    running = {**objects.fine_tune_job(), "status": {"phase": "Running"}}
    artifact = {"uri": "s3://lorafleet/adapters/support-bot/v1", "digest": "sha256:" + "12" * 32, "sizeBytes": 1}
    done = {**objects.fine_tune_job(), "status": {"phase": "Succeeded", "artifact": artifact}}
    before, _ = _ad_plan(ad, base, {"support": running}, SETTINGS)
    after, _ = _ad_plan(ad, base, {"support": done}, SETTINGS)
    assert before[0] != after[0]
    assert before[-1]["spec"]["template"] == after[-1]["spec"]["template"]


def test_adapter_ranks_come_from_fine_tune_jobs() -> None:
    ad = objects.adapter_deployment()
    ftj = objects.fine_tune_job(lora={"r": 64})
    assert _ranks(ad, {"support": ftj}) == {"support-bot": 64, "sql": None}
    assert _ranks(ad, {"support": objects.fine_tune_job()}) == {"support-bot": 16, "sql": None}


def test_stored_ranks_come_from_the_observe_step_and_size_vllm() -> None:
    """The plan gets a stored adapter's rank from what observe read (the manifest cache), never reads it."""
    ad = objects.adapter_deployment()
    typed = objects.adapter_deployment_obj(ad)
    assert ad_controller.adapter_ranks(typed, {}, {"sql": 64}) == {"support-bot": None, "sql": 64}
    base = objects.basemodel_obj(objects.ready(objects.base_model()))
    children, error = ad_controller.plan(typed, base, {}, SETTINGS, {"sql": 64})
    assert error is None and children is not None
    deployment = next(c for c in children if c["kind"] == "Deployment")
    assert "--max-lora-rank=64" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]


def test_controller_owner_matches_only_our_controller_reference() -> None:
    child = {
        "metadata": {
            "ownerReferences": [
                {"apiVersion": "batch/v1", "kind": "FineTuneJob", "name": "x", "controller": True},
                {"apiVersion": "lorafleet.io/v1alpha1", "kind": "FineTuneJob", "name": "y", "controller": False},
                {"apiVersion": "lorafleet.io/v1alpha1", "kind": "FineTuneJob", "name": "z", "controller": True},
            ]
        }
    }
    assert list(owners("Job", child)) == [("FineTuneJob", "z")]
    assert list(owners("Job", {"metadata": {}})) == []


def test_live_progress_from_the_config_map_is_used_until_a_final_report_exists() -> None:
    running = {"status": {"containerStatuses": [{"name": "trainer", "state": {"running": {}}}]}}
    progress = {"data": {PROGRESS_KEY: json.dumps({"step": 7, "totalSteps": 100, "loss": 1.5})}}
    assert ftj_controller.trainer_report([running], progress) == TrainerReport.model_validate(
        {"progress": {"step": 7, "totalSteps": 100, "loss": 1.5}}
    )
    final = _pod(json.dumps({"progress": {"step": 100}, "metrics": {"train_loss": 0.1}}), "2026-11-22T11:00:00Z")
    report = ftj_controller.trainer_report([running, final], progress)
    assert report is not None and report.metrics == {"train_loss": 0.1}
    assert ftj_controller.trainer_report([running], {"data": {PROGRESS_KEY: "{not json"}}) is None
    # The pod annotation of earlier versions is no longer read: only the trainer's Role-limited ConfigMap counts.
    annotated = {"metadata": {"annotations": {"lorafleet.io/progress": json.dumps({"step": 7})}}, **running}
    assert ftj_controller.trainer_report([annotated], None) is None


def test_the_trainer_may_patch_its_progress_config_map_and_nothing_else() -> None:
    children, _ = _ftj_plan(objects.fine_tune_job(), objects.ready(objects.base_model()), SETTINGS)
    progress = ftj_res.names("support").progress
    config_map = next(c for c in children if c["kind"] == "ConfigMap" and c["metadata"]["name"] == progress)
    assert "data" not in config_map  # created empty; the trainer's patches own data
    (role,) = [c for c in children if c["kind"] == "Role"]
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [progress], "verbs": ["patch"]}
    ]
    job = next(c for c in children if c["kind"] == "Job")
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[PROGRESS_CONFIG_MAP_ENV] == progress


def test_operator_and_sidecar_agree_on_the_gateway_routes() -> None:
    from lorafleet.contracts import serving as contract
    from lorafleet.serving import gateway

    assert (contract.READY_PATH, contract.STATE_PATH) == (gateway.READY, gateway.STATE)
    children, _ = _ad_plan(objects.adapter_deployment(), objects.ready(objects.base_model()), {}, SETTINGS)
    pod = next(c for c in children if c["kind"] == "Deployment")["spec"]["template"]["spec"]
    sidecar = next(c for c in pod["containers"] if c["name"] == "adapter-sync")
    assert sidecar["readinessProbe"]["httpGet"] == {"path": gateway.READY, "port": contract.GATEWAY_PORT}


def test_unreachable_pod_counts_as_not_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    pod = {"metadata": {"name": "chat-vllm-0"}, "status": {"phase": "Running"}}
    assert ad_controller._fetch_state(pod) == {"pod": "chat-vllm-0", "error": "no pod IP yet"}

    def refused(*_: object, **__: object) -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(urllib.request, "urlopen", refused)  # nothing listens on the gateway port
    pod["status"]["podIP"] = "127.0.0.1"
    state = ad_controller._fetch_state(pod)
    assert state["pod"] == "chat-vllm-0" and "error" in state


def test_transition_event_names_the_object_and_flags_trouble() -> None:
    from lorafleet.controllers.base import transition_event

    ftj = objects.fine_tune_job()
    bad = transition_event(ftj, "Ready", "False", "BaseModelNotFound", "waiting", NOW)
    assert bad["type"] == "Warning" and bad["reason"] == "BaseModelNotFound"
    assert bad["involvedObject"] == {
        "apiVersion": "lorafleet.io/v1alpha1",
        "kind": "FineTuneJob",
        "name": "support",
        "namespace": "ml",
        "uid": ftj["metadata"]["uid"],
    }
    assert bad["metadata"]["name"].startswith("support.") and bad["metadata"]["namespace"] == "ml"
    assert transition_event(ftj, "Ready", "True", "Succeeded", "", NOW)["type"] == "Normal"
    assert transition_event(ftj, "Degraded", "True", "JobFailed", "", NOW)["type"] == "Warning"
    assert transition_event(ftj, "Degraded", "False", "AsExpected", "", NOW)["type"] == "Normal"


def test_resync_matches_namespace_patterns_like_kopf() -> None:
    from lorafleet.controllers.caches import watched as _watched

    assert _watched("team-a", ["team-*"])
    assert not _watched("other", ["team-*"])
    assert not _watched("team-secret", ["team-*", "!team-secret"])
    assert _watched("ml", ["ml", "team-*"])


def test_finetunejob_pins_the_base_models_verified_digest() -> None:
    """The fetch refuses any other version and the trainer records the digest in the adapter's lineage."""
    digest = "sha256:" + "a" * 64
    base = objects.ready(objects.base_model(), digest=digest)
    children, error = _ftj_plan(objects.fine_tune_job(), base, SETTINGS)
    assert error is None
    job = next(c for c in children if c["kind"] == "Job")
    fetch = next(c for c in job["spec"]["template"]["spec"]["initContainers"] if c["name"] == "fetch-base-model")
    assert fetch["command"][-2:] == ["--digest", digest]
    config = job["spec"]["template"]["metadata"]["annotations"][ftj_res.CONFIG_ANNOTATION]
    assert json.loads(config)["baseModel"]["digest"] == digest
