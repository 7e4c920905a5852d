"""The pure decisions of each reconcile pass: what is applied when, and what the trainer reported.

Children are rendered whole or not at all: nothing while the BaseModel is missing or not Ready, nothing for a
finished FineTuneJob (never restarted), and an unrenderable spec becomes a condition instead of an exception.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from lorafleet.config import OperatorSettings
from lorafleet.controllers import adapterdeployment as ad_controller
from lorafleet.controllers import finetunejob as ftj_controller
from lorafleet.controllers.base import controller_owner, with_render_error
from lorafleet.resources.conditions import get_condition
from lorafleet.resources.stores import RenderError
from tests.unit import objects

SETTINGS = OperatorSettings(store_endpoint="http://minio:9000", store_uri="s3://lorafleet")
NO_STORE = OperatorSettings()
RBAC = ["ServiceAccount", "Role", "RoleBinding"]
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def _kinds(children: list[dict]) -> list[str]:
    return [c["kind"] for c in children]


def test_finetunejob_waits_for_a_missing_base_model() -> None:
    assert ftj_controller.plan(objects.fine_tune_job(), None, SETTINGS) == ([], None)


def test_finetunejob_waits_for_a_base_model_that_is_not_ready() -> None:
    assert ftj_controller.plan(objects.fine_tune_job(), objects.base_model(), SETTINGS) == ([], None)


def test_finetunejob_renders_config_job_and_policy_when_base_is_ready() -> None:
    children, error = ftj_controller.plan(objects.fine_tune_job(), objects.ready(objects.base_model()), SETTINGS)
    assert error is None
    assert _kinds(children) == ["ConfigMap", *RBAC, "Job", "NetworkPolicy"]


def test_distributed_finetunejob_adds_a_headless_service() -> None:
    ftj = objects.fine_tune_job(resources={"nodes": 2, "gpusPerNode": 1})
    children, _ = ftj_controller.plan(ftj, objects.ready(objects.base_model()), SETTINGS)
    assert _kinds(children) == ["ConfigMap", *RBAC, "Service", "Job", "NetworkPolicy"]
    assert children[4]["spec"]["clusterIP"] == "None"


def test_finished_finetunejob_is_never_restarted() -> None:
    for phase in ("Succeeded", "Failed"):
        ftj = {**objects.fine_tune_job(), "status": {"phase": phase}}
        assert ftj_controller.plan(ftj, objects.ready(objects.base_model()), SETTINGS) == ([], None)


def test_missing_store_is_an_error_not_a_crash() -> None:
    base_on_pvc = objects.ready(objects.base_model(source={"uri": "pvc://models/tiny"}))
    children, error = ftj_controller.plan(objects.fine_tune_job(), base_on_pvc, NO_STORE)
    assert children == []
    assert isinstance(error, RenderError)
    assert error.reason == "StoreNotConfigured"
    assert "spec.output.uri" in error.message
    _, error = ftj_controller.plan(objects.fine_tune_job(), objects.ready(objects.base_model()), NO_STORE)
    assert error is not None and "BaseModel spec.source.store" in error.message


def test_render_error_becomes_conditions() -> None:
    status = with_render_error({"phase": "Pending"}, RenderError("StoreNotConfigured", "no store"), 3, NOW)
    ready = get_condition(status["conditions"], "Ready")
    degraded = get_condition(status["conditions"], "Degraded")
    assert ready is not None and ready["status"] == "False" and ready["reason"] == "StoreNotConfigured"
    assert degraded is not None and degraded["status"] == "True" and degraded["observedGeneration"] == 3


def _pod(message: str, finished: str, container: str = "trainer") -> dict:
    terminated = {"exitCode": 0, "message": message, "finishedAt": finished}
    return {"status": {"containerStatuses": [{"name": container, "state": {"terminated": terminated}}]}}


def test_trainer_report_takes_the_newest_json_termination_message() -> None:
    old = _pod(json.dumps({"progress": {"step": 10}}), "2026-11-22T10:00:00Z")
    new = _pod(json.dumps({"progress": {"step": 20}}), "2026-11-22T11:00:00Z")
    logs = _pod("Traceback (most recent call last): ...", "2026-11-22T12:00:00Z")
    other = _pod(json.dumps({"progress": {"step": 99}}), "2026-11-22T13:00:00Z", container="fetch-base-model")
    assert ftj_controller.trainer_report([old, new, logs, other]) == {"progress": {"step": 20}}
    assert ftj_controller.trainer_report([]) is None


def test_adapterdeployment_waits_for_base_model() -> None:
    assert ad_controller.plan(objects.adapter_deployment(), None, {}, SETTINGS) == ([], None)


def test_adapterdeployment_serves_only_adapters_that_can_be_served() -> None:
    ad = objects.adapter_deployment()
    running = {**objects.fine_tune_job(), "status": {"phase": "Running"}}
    children, error = ad_controller.plan(ad, objects.ready(objects.base_model()), {"support": running}, SETTINGS)
    assert error is None
    assert _kinds(children) == ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"]
    desired = json.loads(children[0]["data"]["adapters.json"])
    assert [a["name"] for a in desired["adapters"]] == ["sql"]  # support-bot waits for its FineTuneJob


def test_adapter_set_changes_do_not_touch_the_pod_template() -> None:
    """Adding an adapter must not roll the pods: it only changes the ConfigMap."""
    ad = objects.adapter_deployment()
    base = objects.ready(objects.base_model())
    running = {**objects.fine_tune_job(), "status": {"phase": "Running"}}
    artifact = {"uri": "s3://lorafleet/adapters/support-bot/v1", "digest": "sha256:" + "12" * 32, "sizeBytes": 1}
    done = {**objects.fine_tune_job(), "status": {"phase": "Succeeded", "artifact": artifact}}
    before, _ = ad_controller.plan(ad, base, {"support": running}, SETTINGS)
    after, _ = ad_controller.plan(ad, base, {"support": done}, SETTINGS)
    assert before[0] != after[0]
    assert before[1]["spec"]["template"] == after[1]["spec"]["template"]


def test_adapter_ranks_come_from_fine_tune_jobs() -> None:
    ad = objects.adapter_deployment()
    ftj = objects.fine_tune_job(lora={"r": 64})
    assert ad_controller.adapter_ranks(ad, {"support": ftj}) == {"support-bot": 64, "sql": None}
    assert ad_controller.adapter_ranks(ad, {"support": objects.fine_tune_job()}) == {"support-bot": 16, "sql": None}


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
    assert controller_owner(child, "FineTuneJob") == "z"
    assert controller_owner({"metadata": {}}, "FineTuneJob") is None


def test_live_progress_annotation_is_used_until_a_final_report_exists() -> None:
    running = {
        "metadata": {
            "creationTimestamp": "2026-11-22T10:00:00Z",
            "annotations": {"lorafleet.io/progress": json.dumps({"step": 7, "totalSteps": 100, "loss": 1.5})},
        },
        "status": {"containerStatuses": [{"name": "trainer", "state": {"running": {}}}]},
    }
    assert ftj_controller.trainer_report([running]) == {"progress": {"step": 7, "totalSteps": 100, "loss": 1.5}}
    final = _pod(json.dumps({"progress": {"step": 100}, "metrics": {"train_loss": 0.1}}), "2026-11-22T11:00:00Z")
    assert ftj_controller.trainer_report([running, final])["metrics"] == {"train_loss": 0.1}  # type: ignore[index]
    broken = {"metadata": {"annotations": {"lorafleet.io/progress": "{not json"}}}
    assert ftj_controller.trainer_report([broken]) is None


def test_operator_and_sidecar_agree_on_the_gateway_routes() -> None:
    from lorafleet.resources import adapterdeployment as builders
    from lorafleet.serving import gateway

    assert (builders.READY_PATH, builders.STATE_PATH) == (gateway.READY, gateway.STATE)


def test_unreachable_pod_counts_as_not_loaded() -> None:
    pod = {"metadata": {"name": "chat-vllm-0"}, "status": {"phase": "Running"}}
    assert ad_controller._fetch_state(pod) == {"pod": "chat-vllm-0", "error": "no pod IP yet"}
    pod["status"]["podIP"] = "127.0.0.1"  # nothing listens on the gateway port here
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
    from lorafleet.controllers.resync import _watched

    assert _watched("team-a", ["team-*"])
    assert not _watched("other", ["team-*"])
    assert not _watched("team-secret", ["team-*", "!team-secret"])
    assert _watched("ml", ["ml", "team-*"])


def test_finetunejob_pins_the_base_models_verified_digest() -> None:
    """The fetch refuses any other version and the trainer records the digest in the adapter's lineage."""
    digest = "sha256:" + "a" * 64
    base = objects.ready(objects.base_model(), digest=digest)
    children, error = ftj_controller.plan(objects.fine_tune_job(), base, SETTINGS)
    assert error is None
    job = next(c for c in children if c["kind"] == "Job")
    fetch = next(c for c in job["spec"]["template"]["spec"]["initContainers"] if c["name"] == "fetch-base-model")
    assert fetch["command"][-2:] == ["--digest", digest]
    config_map = next(c for c in children if c["kind"] == "ConfigMap")
    assert json.loads(config_map["data"]["trainer.json"])["baseModel"]["digest"] == digest


def test_replicas_are_nudged_once_per_desired_set() -> None:
    """Each replica gets the desired set's digest as an annotation (the kubelet then refreshes its ConfigMap
    volume at once); a replica that has it is left alone; another set gives another digest."""
    from lorafleet.resources import adapterdeployment as ad_res

    ad = objects.adapter_deployment()
    children, error = ad_controller.plan(ad, objects.ready(objects.base_model()), {}, SETTINGS)
    assert error is None
    digest = ad_res.desired_set_digest(children, ad["metadata"]["name"])
    assert digest is not None and len(digest) == 16
    pods = [
        {"metadata": {"name": "a", "namespace": "ml"}},
        {"metadata": {"name": "b", "namespace": "ml", "annotations": {ad_res.DESIRED_SET_ANNOTATION: digest}}},
        {"metadata": {"name": "c", "namespace": "ml", "annotations": {ad_res.DESIRED_SET_ANNOTATION: "old"}}},
    ]
    nudges = ad_res.pod_nudges(pods, digest)
    assert [n["metadata"]["name"] for n in nudges] == ["a", "c"]
    assert nudges[0] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "a", "namespace": "ml", "annotations": {ad_res.DESIRED_SET_ANNOTATION: digest}},
    }
    other = [
        {**c, "data": {k: v.replace("tiny", "other") for k, v in c["data"].items()}} if c["kind"] == "ConfigMap" else c
        for c in children
    ]
    assert ad_res.desired_set_digest(other, ad["metadata"]["name"]) not in (None, digest)
    assert ad_res.desired_set_digest([], ad["metadata"]["name"]) is None
