"""No takeover: a desired child's name held by an object the owner does not control (made by someone else, or
carrying lorafleet's labels with another owner's uid) is a conflict; then nothing at all is applied or pruned, and
the owner is Degraded with reason ChildConflict naming the object and the fix. A child no object holds yet is
created without force; one the owner controls is applied as before."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from lorafleet.config import OperatorSettings
from lorafleet.controllers import adapterdeployment as ad_controller
from lorafleet.resources import adapterdeployment as ad_res
from lorafleet.resources.children import Conflict, conflict_message, diff, key, stamped, unobserved
from lorafleet.resources.conditions import Reason
from lorafleet.resources.status import (
    AdapterDeploymentObserved,
    FineTuneJobObserved,
    adapterdeployment_status,
    finetunejob_status,
)
from tests.unit import objects

Obj = dict[str, Any]
SETTINGS = OperatorSettings(store_endpoint="http://minio:9000", store_uri="s3://lorafleet")
NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


def _desired() -> tuple[Obj, list[Obj]]:
    ad = objects.adapter_deployment(replicas=2, adapters=[])
    children, error = ad_controller.plan(
        objects.adapter_deployment_obj(ad), objects.basemodel_obj(objects.ready(objects.base_model())), {}, SETTINGS
    )
    assert error is None and children is not None
    return ad, children


def _uid(ad: Obj) -> str:
    return str(ad["metadata"]["uid"])


def _observed(children: list[Obj]) -> dict[str, list[Obj]]:
    """The owner's children as the label-selected cache returns them."""
    found: dict[str, list[Obj]] = {kind: [] for _, kind in ad_res.CHILD_KINDS}
    for child in children:
        body = stamped(child)
        body["metadata"]["resourceVersion"] = "7"
        found[child["kind"]].append(body)
    return found


def _foreign(kind: str, name: str, controller: Obj | None = None) -> Obj:
    """An object a tenant made, without lorafleet's labels (and so in no cache)."""
    meta: Obj = {"name": name, "namespace": "ml", "resourceVersion": "3"}
    if controller is not None:
        meta["ownerReferences"] = [{**controller, "controller": True}]
    return {"apiVersion": "v1", "kind": kind, "metadata": meta}


def test_a_missing_child_is_created_without_force() -> None:
    ad, children = _desired()
    observed = _observed([c for c in children if c["kind"] != "Service"])
    assert unobserved(children, observed) == [("v1", "Service", "chat")]
    plan = diff(children, observed, _uid(ad), existing={("Service", "chat"): None})
    assert [key(c) for c in plan.apply] == [("Service", "chat")]
    assert plan.new == {("Service", "chat")} and plan.conflicts == []


def test_a_name_held_by_a_foreign_object_is_a_conflict_and_nothing_is_applied_or_pruned() -> None:
    ad, children = _desired()
    observed = _observed([c for c in children if c["kind"] != "Service"])
    changed = copy.deepcopy(children)
    next(c for c in changed if c["kind"] == "Deployment")["spec"]["replicas"] = 3  # would be applied
    stale = stamped(next(c for c in children if c["kind"] == "PodDisruptionBudget"))
    stale["metadata"]["name"] = "chat-old-pdb"
    observed["PodDisruptionBudget"].append(stale)  # owned and no longer wanted: would be pruned
    plan = diff(changed, observed, _uid(ad), existing={("Service", "chat"): _foreign("Service", "chat")})
    assert plan.apply == [] and plan.delete == []
    assert plan.conflicts == [Conflict("Service", "chat", "")]
    assert sorted(key(c) for c in plan.unchanged) == sorted(key(c) for items in observed.values() for c in items)


def test_an_object_controlled_by_something_else_is_a_conflict_naming_its_controller() -> None:
    ad, children = _desired()
    observed = _observed([c for c in children if c["kind"] != "ConfigMap"])
    holder = _foreign("ConfigMap", "chat-adapters", {"kind": "FineTuneJob", "name": "chat", "uid": "other"})
    plan = diff(children, observed, _uid(ad), existing={("ConfigMap", "chat-adapters"): holder})
    assert plan.conflicts == [Conflict("ConfigMap", "chat-adapters", "FineTuneJob/chat")]
    assert plan.apply == []


def test_an_object_with_our_labels_and_another_owners_uid_is_never_applied_over() -> None:
    ad, children = _desired()
    observed = _observed(children)
    spoofed = next(c for c in observed["Service"])
    spoofed["metadata"]["ownerReferences"] = [{**spoofed["metadata"]["ownerReferences"][0], "uid": "someone-else"}]
    spoofed["metadata"]["annotations"] = {}  # its hash differs: it would be applied
    plan = diff(children, observed, _uid(ad))
    assert plan.conflicts == [Conflict("Service", "chat", "AdapterDeployment/chat")]
    assert plan.apply == [] and plan.delete == []


def test_a_child_the_owner_controls_but_without_its_labels_is_applied_with_force() -> None:
    ad, children = _desired()
    observed = _observed([c for c in children if c["kind"] != "Service"])
    ours = copy.deepcopy(next(c for c in children if c["kind"] == "Service"))
    ours["metadata"]["labels"] = {}  # someone removed them: not found by the owner's selector
    plan = diff(children, observed, _uid(ad), existing={("Service", "chat"): ours})
    assert plan.conflicts == [] and [key(c) for c in plan.apply] == [("Service", "chat")]
    assert plan.new == frozenset()


def test_the_message_names_the_objects_and_the_fix() -> None:
    message = conflict_message(
        [Conflict("Service", "chat", ""), Conflict("RoleBinding", "x-trainer", "Deployment/web")], "AdapterDeployment"
    )
    assert 'Service "chat" (not created by lorafleet)' in message
    assert 'RoleBinding "x-trainer" (controlled by Deployment/web)' in message
    assert "create the AdapterDeployment under another name, or delete the other object" in message


def test_a_conflict_degrades_a_fine_tune_job() -> None:
    ftj = objects.fine_tune_job_obj(objects.fine_tune_job())
    assert ftj is not None
    base = objects.basemodel_obj(objects.ready(objects.base_model()))
    status = finetunejob_status(ftj, FineTuneJobObserved(base_model=base, conflict="Service x is in the way"), NOW)
    by_type = {c.type: c for c in status.conditions}
    assert status.phase == "Pending"
    assert (by_type["Degraded"].status, by_type["Degraded"].reason) == ("True", Reason.CHILD_CONFLICT)
    assert by_type["Degraded"].message == "Service x is in the way"
    assert (by_type["Ready"].status, by_type["Progressing"].status) == ("False", "False")


def test_a_conflict_degrades_an_adapter_deployment() -> None:
    ad = objects.adapter_deployment_obj(objects.adapter_deployment(adapters=[]))
    base = objects.basemodel_obj(objects.ready(objects.base_model()))
    status = adapterdeployment_status(
        ad, AdapterDeploymentObserved(base_model=base, conflict="Service chat is in the way"), NOW
    )
    by_type = {c.type: c for c in status.conditions}
    assert status.phase == "Degraded"
    assert (by_type["Degraded"].status, by_type["Degraded"].reason) == ("True", Reason.CHILD_CONFLICT)
    assert by_type["Ready"].status == "False" and by_type["Ready"].reason == Reason.CHILD_CONFLICT
