"""Execute only the difference: a child whose observed content hash equals the desired one is not applied, a
changed or missing one is; owned children no longer desired are pruned, and nothing else ever is (another owner's
child, an object without our controller reference, a kind that was not listed, anything while the plan holds)."""

from __future__ import annotations

import copy

from lorafleet.config import OperatorSettings
from lorafleet.controllers import adapterdeployment as ad_controller
from lorafleet.resources import adapterdeployment as ad_res
from lorafleet.resources.children import HASH_ANNOTATION, content_hash, diff, owner_selector, stamped
from tests.unit import objects

SETTINGS = OperatorSettings(store_endpoint="http://minio:9000", store_uri="s3://lorafleet")


def _desired(replicas: int = 2, network_policy: bool = True) -> tuple[dict, list[dict]]:
    ad = objects.adapter_deployment(replicas=replicas, adapters=[])
    settings = SETTINGS.model_copy(update={"network_policy": network_policy})
    children, error = ad_controller.plan(
        objects.adapter_deployment_obj(ad), objects.basemodel_obj(objects.ready(objects.base_model())), {}, settings
    )
    assert error is None and children is not None
    return ad, children


def _as_observed(children: list[dict]) -> dict[str, list[dict]]:
    """What listing the children back returns: stamped bodies plus server-owned fields."""
    observed: dict[str, list[dict]] = {kind: [] for _, kind in ad_res.CHILD_KINDS}
    for child in children:
        body = stamped(child)
        body["metadata"].update(resourceVersion="42", uid="child-uid", managedFields=[{"manager": "lorafleet"}])
        body["status"] = {"observedGeneration": 1}
        observed[child["kind"]].append(body)
    return observed


def _uid(ad: dict) -> str:
    return str(ad["metadata"]["uid"])


def test_unchanged_children_are_not_applied() -> None:
    ad, children = _desired()
    plan = diff(children, _as_observed(children), _uid(ad))
    assert plan.apply == [] and plan.delete == []
    assert len(plan.unchanged) == len(children)


def test_missing_or_changed_children_are_applied_with_their_hash() -> None:
    ad, children = _desired()
    observed = _as_observed(children)
    observed["Service"] = []  # deleted by someone
    changed = copy.deepcopy(children)
    deployment = next(c for c in changed if c["kind"] == "Deployment")
    deployment["spec"]["replicas"] = 3
    plan = diff(changed, observed, _uid(ad))
    assert sorted(c["kind"] for c in plan.apply) == ["Deployment", "Service"]
    for child in plan.apply:
        assert child["metadata"]["annotations"][HASH_ANNOTATION] == content_hash(child)
    assert plan.delete == []


def test_the_hash_ignores_server_fields_and_itself() -> None:
    _, children = _desired()
    child = children[0]
    observed = _as_observed([child])[child["kind"]][0]
    assert content_hash(observed) == content_hash(child) == content_hash(stamped(child))
    other = copy.deepcopy(child)
    other["data"] = {"x": "y"}
    assert content_hash(other) != content_hash(child)


def test_pdb_is_pruned_when_replicas_go_to_one_and_policy_when_switched_off() -> None:
    ad, before = _desired(replicas=2)
    observed = _as_observed(before)
    _, after = _desired(replicas=1, network_policy=False)
    plan = diff(after, observed, _uid(ad))
    assert sorted(c["kind"] for c in plan.delete) == ["NetworkPolicy", "NetworkPolicy", "PodDisruptionBudget"]
    assert {c["kind"] for c in plan.apply} == {"Deployment"}  # replicas changed; the rest is as it was


def test_only_children_controlled_by_this_owner_are_pruned() -> None:
    ad, before = _desired(replicas=2)
    observed = _as_observed(before)
    pdb = observed["PodDisruptionBudget"][0]
    pdb["metadata"]["ownerReferences"] = [{**pdb["metadata"]["ownerReferences"][0], "uid": "another-owner"}]
    for policy in observed["NetworkPolicy"]:
        policy["metadata"]["ownerReferences"] = [{**policy["metadata"]["ownerReferences"][0], "controller": False}]
    _, after = _desired(replicas=1, network_policy=False)
    assert diff(after, observed, _uid(ad)).delete == []
    assert diff(after, observed, None).delete == []


def test_a_kind_not_listed_is_applied_and_never_pruned() -> None:
    ad, before = _desired(replicas=2)
    observed = _as_observed(before)
    del observed["PodDisruptionBudget"]  # RBAC without "list"
    plan = diff(before, observed, _uid(ad))
    assert [c["kind"] for c in plan.apply] == ["PodDisruptionBudget"]
    _, after = _desired(replicas=1)
    assert [c["kind"] for c in diff(after, observed, _uid(ad)).delete] == []


def test_a_plan_that_holds_touches_nothing() -> None:
    ad, before = _desired()
    plan = diff(None, _as_observed(before), _uid(ad))
    assert plan.apply == [] and plan.delete == [] and plan.unchanged == []


def test_owner_selector_matches_the_labels_every_child_carries() -> None:
    ad, children = _desired()
    selector = dict(part.split("=") for part in owner_selector("AdapterDeployment", "chat").split(","))
    for child in children:
        assert selector.items() <= child["metadata"]["labels"].items()
    assert ad["metadata"]["name"] == "chat"


def test_a_running_job_is_never_reapplied_only_created() -> None:
    """A Job's pod template is immutable: a changed render leaves the existing Job alone; a missing one is created."""
    from lorafleet.resources import finetunejob as ftj_res

    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "support-train", "ownerReferences": [{"uid": "u", "controller": True}]},
        "spec": {"template": {"spec": {"containers": [{"name": "trainer", "image": "old"}]}}},
    }
    changed = copy.deepcopy(job)
    changed["spec"]["template"]["spec"]["containers"][0]["image"] = "new"
    observed = {"Job": [stamped(job)]}
    assert diff([changed], observed, "u", ftj_res.CREATE_ONLY).apply == []
    assert diff([changed], observed, "u").apply != []
    assert [c["kind"] for c in diff([changed], {"Job": []}, "u", ftj_res.CREATE_ONLY).apply] == ["Job"]
