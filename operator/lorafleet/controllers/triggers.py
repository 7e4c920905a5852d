"""Which reconciles a change seen by the caches asks for (controller-runtime's "watches" and event handlers).

* A custom resource: itself when it is new, its spec changed (generation ahead of observedGeneration) or it is
  being deleted; a status-only change (our own write) asks for nothing. The objects that wait for it too: a
  BaseModel's FineTuneJobs and AdapterDeployments, a FineTuneJob's AdapterDeployments (a job succeeding puts its
  adapter into the deployments that serve it); an AdapterDeployment's change, the FineTuneJobs of its namespace
  being deleted (their deletion waits while a deployment references the adapter).
* A child: its controller owner, when that is one of ours (a Job finishing, a Deployment's replicas becoming
  ready, a ConfigMap deleted by hand).
* A pod: the FineTuneJob or AdapterDeployment named by its label (training progress, a replica starting).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from lorafleet import API_VERSION
from lorafleet.controllers.base import enqueue
from lorafleet.controllers.caches import CACHES, CUSTOM_KINDS, Kind
from lorafleet.controllers.informer import Change
from lorafleet.resources.adapter_guard import adapter_sources
from lorafleet.resources.common import LABEL_PREFIX, LABEL_VALUE_MAX, label_value

Obj = dict[str, Any]
OUR_KINDS = frozenset(kind for _, kind in CUSTOM_KINDS)
POD_OWNER_LABELS = {
    f"{LABEL_PREFIX}/finetunejob": "FineTuneJob",
    f"{LABEL_PREFIX}/adapterdeployment": "AdapterDeployment",
}


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def _ref_name(value: Any) -> str | None:
    return str(value["name"]) if isinstance(value, Mapping) and value.get("name") else None


def wants_own_reconcile(type_: str, obj: Obj) -> bool:
    if type_ == "DELETED":
        return False
    meta = _meta(obj)
    if type_ == "ADDED" or meta.get("deletionTimestamp"):
        return True
    return (obj.get("status") or {}).get("observedGeneration") != meta.get("generation")


def dependents(kind: str, namespace: str, name: str) -> Iterator[tuple[str, str]]:
    """(kind, name) of the objects in `namespace` whose spec refers to this one, from the caches."""
    if kind == "BaseModel":
        for dependent in ("FineTuneJob", "AdapterDeployment"):
            for obj in CACHES.all(API_VERSION, dependent, namespace) or []:
                if _ref_name((obj.get("spec") or {}).get("baseModelRef")) == name:
                    yield dependent, str(_meta(obj).get("name"))
    elif kind == "FineTuneJob":
        for obj in CACHES.all(API_VERSION, "AdapterDeployment", namespace) or []:
            adapters = [a for a in (obj.get("spec") or {}).get("adapters") or [] if isinstance(a, Mapping)]
            sources = [source for adapter in adapters for source in adapter_sources(adapter)]
            if any(_ref_name(source.get("fineTuneJobRef")) == name for source in sources):
                yield "AdapterDeployment", str(_meta(obj).get("name"))
    elif kind == "AdapterDeployment":
        # A FineTuneJob whose deletion waits for the deployments that reference its adapter looks again.
        for obj in CACHES.all(API_VERSION, "FineTuneJob", namespace) or []:
            if _meta(obj).get("deletionTimestamp"):
                yield "FineTuneJob", str(_meta(obj).get("name"))


def _named_by_label(kind: str, namespace: str, value: str) -> str:
    """The name of the object whose label value (resources.common.label_value) this is: the value itself, or
    for a name over 63 characters, the cached object's whose name shortens to it."""
    if len(value) < LABEL_VALUE_MAX:
        return value
    for obj in CACHES.all(API_VERSION, kind, namespace) or []:
        name = str(_meta(obj).get("name") or "")
        if label_value(name) == value:
            return name
    return value


def owners(kind: str, obj: Obj) -> Iterator[tuple[str, str]]:
    """(kind, name) of the lorafleet object a child or pod belongs to."""
    meta = _meta(obj)
    if kind == "Pod":
        labels = meta.get("labels") or {}
        for label, owner_kind in POD_OWNER_LABELS.items():
            if labels.get(label):
                yield owner_kind, _named_by_label(owner_kind, str(meta.get("namespace") or ""), str(labels[label]))
        return
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller") and ref.get("apiVersion") == API_VERSION and ref.get("kind") in OUR_KINDS:
            yield str(ref["kind"]), str(ref["name"])


def on_change(kind: Kind, change: Change) -> None:
    type_, obj = change
    meta = _meta(obj)
    namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
    if kind in CUSTOM_KINDS:
        if wants_own_reconcile(type_, obj):
            enqueue(kind[1], namespace, name)
        for dependent_kind, dependent in dependents(kind[1], namespace, name):
            enqueue(dependent_kind, namespace, dependent)
        return
    for owner_kind, owner in owners(kind[1], obj):
        enqueue(owner_kind, namespace, owner)
