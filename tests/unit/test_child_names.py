"""Child names and label values fit Kubernetes' limits whatever the owner's name (up to 253 characters): DNS
labels (Services, an indexed Job's pod hostnames) and label values at most 63 characters, shortened
deterministically with a hash (distinct owners keep distinct names); short names are left as they were."""

from __future__ import annotations

from typing import Any

import pytest

from lorafleet.config import OperatorSettings
from lorafleet.controllers import adapterdeployment as ad_controller
from lorafleet.controllers import finetunejob as ftj_controller
from lorafleet.controllers import triggers
from lorafleet.controllers.caches import CACHES
from lorafleet.resources import adapterdeployment as ad_res
from lorafleet.resources import finetunejob as ftj_res
from lorafleet.resources.children import owner_labels
from lorafleet.resources.common import fit, label_value
from tests.unit import objects

Obj = dict[str, Any]
SETTINGS = OperatorSettings(store_endpoint="http://minio:9000", store_uri="s3://lorafleet")
BASE = objects.basemodel_obj(objects.ready(objects.base_model()))
LONG_NAMES = ["a" * 60, "team-" + "x" * 58, "b" * 100 + ".v1", "c" * 253]


def _labels_everywhere(obj: Any) -> list[dict[str, str]]:
    """Every label map and selector in a child (metadata, templates, selectors)."""
    found: list[dict[str, str]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("labels", "matchLabels") or (k == "selector" and isinstance(v, dict) and "matchLabels" not in v):
                found.append(v)
            found.extend(_labels_everywhere(v))
    elif isinstance(obj, list):
        for item in obj:
            found.extend(_labels_everywhere(item))
    return found


def test_short_values_are_unchanged_and_long_ones_fit_deterministically() -> None:
    assert fit("chat") == "chat" and fit("a" * 63) == "a" * 63
    long = "a" * 64
    assert len(fit(long)) == 63 and fit(long) == fit(long)
    assert fit(long) != fit("a" * 65)  # a shared head keeps distinct names apart
    assert fit("a" * 50 + "." + "b" * 20)[-1].isalnum()


@pytest.mark.parametrize("name", LONG_NAMES)
def test_fine_tune_job_children_fit(name: str) -> None:
    for nodes in (1, 128):
        ftj = objects.fine_tune_job_obj(objects.fine_tune_job(name, resources={"gpusPerNode": 1, "nodes": nodes}))
        assert ftj is not None
        children, error = ftj_controller.plan(ftj, BASE, SETTINGS)
        assert error is None and children is not None
        for child in children:
            limit = 63 if child["kind"] in ("Service", "Job") else 253
            assert len(child["metadata"]["name"]) <= limit, child["kind"]
            for labels in _labels_everywhere(child):
                assert all(len(v) <= 63 for v in labels.values()), (child["kind"], labels)
        job = ftj_res.names_of(ftj).job
        if nodes > 1:
            assert len(f"{job}-{nodes - 1}") <= 63  # the indexed pods' hostnames
        selector = owner_labels("FineTuneJob", name)
        assert all(selector.items() <= c["metadata"]["labels"].items() for c in children)


def test_an_indexed_job_name_leaves_room_for_the_index_only_when_distributed() -> None:
    name = "a" * 55  # "-train" makes 61: fits a single pod's Job, not `<job>-127`
    assert ftj_res.names(name).job == f"{name}-train"
    assert len(ftj_res.names(name, distributed=True).job) == 59


@pytest.mark.parametrize("name", LONG_NAMES)
def test_adapter_deployment_children_fit(name: str) -> None:
    ad = objects.adapter_deployment_obj(objects.adapter_deployment(name, adapters=[]))
    children, error = ad_controller.plan(ad, BASE, {}, SETTINGS)
    assert error is None and children is not None
    for child in children:
        limit = 63 if child["kind"] == "Service" else 253
        assert len(child["metadata"]["name"]) <= limit, child["kind"]
        for labels in _labels_everywhere(child):
            assert all(len(v) <= 63 for v in labels.values()), (child["kind"], labels)
    service = next(c for c in children if c["kind"] == "Service")["metadata"]["name"]
    assert ad_res.service_host(ad).startswith(f"{service}.")


def test_a_pod_with_a_shortened_label_queues_its_owner(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "d" * 80
    owner = {"metadata": {"name": name, "namespace": "t"}}
    monkeypatch.setattr(CACHES, "all", lambda _v, kind, _ns=None: [owner] if kind == "FineTuneJob" else [])
    pod = {"metadata": {"name": "p", "namespace": "t", "labels": {"lorafleet.io/finetunejob": label_value(name)}}}
    assert list(triggers.owners("Pod", pod)) == [("FineTuneJob", name)]
