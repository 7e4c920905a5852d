"""A change seen by the caches queues exactly the reconciles it can affect: a custom resource itself only when its
spec moved past its observed generation (never for our own status write), the objects waiting for it, and for a
child or pod its lorafleet owner."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from lorafleet import API_VERSION
from lorafleet.controllers import triggers
from lorafleet.controllers.caches import CACHES
from lorafleet.controllers.informer import Informer, Store, WatchTarget

Obj = dict[str, Any]


def custom(kind: str, name: str, generation: int = 1, observed: int | None = 1, **spec: Any) -> Obj:
    body: Obj = {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name, "namespace": "t",
                 "generation": generation, "resourceVersion": str(generation)}, "spec": spec}  # fmt: skip
    if observed is not None:
        body["status"] = {"observedGeneration": observed}
    return body


@pytest.fixture
def queued(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, str, str]]]:
    """The keys the triggers queue, and caches serving the custom kinds from in-memory stores."""
    keys: list[tuple[str, str, str]] = []
    monkeypatch.setattr(triggers, "enqueue", lambda kind, ns, name, delay=0.0: keys.append((kind, ns, name)))
    stores = {kind: Store() for kind in ("BaseModel", "FineTuneJob", "AdapterDeployment")}
    for kind, store in stores.items():
        informer = Informer(WatchTarget("/unused"), None, store)  # type: ignore[arg-type]  # never started
        informer.synced.set()
        monkeypatch.setitem(CACHES._informers, (API_VERSION, kind), [informer])
        monkeypatch.setitem(CACHES._stores, (API_VERSION, kind), store)
    stores["FineTuneJob"].apply("ADDED", custom("FineTuneJob", "uses-llama", baseModelRef={"name": "llama"}))
    stores["FineTuneJob"].apply("ADDED", custom("FineTuneJob", "uses-other", baseModelRef={"name": "other"}))
    stores["AdapterDeployment"].apply(
        "ADDED",
        custom("AdapterDeployment", "serve", baseModelRef={"name": "llama"},
               adapters=[{"name": "a", "fineTuneJobRef": {"name": "uses-llama"}}]),
    )  # fmt: skip
    yield keys


def test_new_or_changed_spec_queues_the_object_but_our_status_write_does_not(queued: list[Any]) -> None:
    triggers.on_change((API_VERSION, "FineTuneJob"), ("ADDED", custom("FineTuneJob", "x", observed=None)))
    triggers.on_change((API_VERSION, "FineTuneJob"), ("MODIFIED", custom("FineTuneJob", "y", generation=2)))
    triggers.on_change((API_VERSION, "FineTuneJob"), ("MODIFIED", custom("FineTuneJob", "z", generation=2, observed=2)))
    triggers.on_change((API_VERSION, "FineTuneJob"), ("DELETED", custom("FineTuneJob", "w")))
    assert queued == [("FineTuneJob", "t", "x"), ("FineTuneJob", "t", "y")]


def test_a_base_model_change_queues_what_waits_for_it(queued: list[Any]) -> None:
    triggers.on_change((API_VERSION, "BaseModel"), ("MODIFIED", custom("BaseModel", "llama", observed=1)))
    assert sorted(queued) == [("AdapterDeployment", "t", "serve"), ("FineTuneJob", "t", "uses-llama")]


def test_a_fine_tune_job_change_queues_the_deployments_serving_its_adapter(queued: list[Any]) -> None:
    triggers.on_change((API_VERSION, "FineTuneJob"), ("MODIFIED", custom("FineTuneJob", "uses-llama")))
    triggers.on_change((API_VERSION, "FineTuneJob"), ("MODIFIED", custom("FineTuneJob", "uses-other")))
    assert queued == [("AdapterDeployment", "t", "serve")]


def test_children_queue_their_controller_owner_and_pods_their_labelled_owner(queued: list[Any]) -> None:
    def ref(kind: str, api_version: str = API_VERSION, controller: bool = True) -> Obj:
        return {"apiVersion": api_version, "kind": kind, "name": "o", "controller": controller}

    job = {"metadata": {"name": "j", "namespace": "t", "ownerReferences": [ref("FineTuneJob")]}}
    foreign = {"metadata": {"name": "k", "namespace": "t", "ownerReferences": [ref("CronJob", "batch/v1")]}}
    not_controller = {
        "metadata": {"name": "l", "namespace": "t", "ownerReferences": [ref("FineTuneJob", controller=False)]}
    }
    trainer = {"metadata": {"name": "p", "namespace": "t", "labels": {"lorafleet.io/finetunejob": "ft"}}}
    replica = {"metadata": {"name": "q", "namespace": "t", "labels": {"lorafleet.io/adapterdeployment": "ad"}}}
    triggers.on_change(("batch/v1", "Job"), ("MODIFIED", job))
    triggers.on_change(("batch/v1", "Job"), ("DELETED", foreign))
    triggers.on_change(("v1", "ConfigMap"), ("DELETED", not_controller))
    triggers.on_change(("v1", "Pod"), ("MODIFIED", trainer))
    triggers.on_change(("v1", "Pod"), ("ADDED", replica))
    assert queued == [("FineTuneJob", "t", "o"), ("FineTuneJob", "t", "ft"), ("AdapterDeployment", "t", "ad")]
