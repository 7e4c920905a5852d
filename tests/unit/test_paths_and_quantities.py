"""A pvc:// path never leaves its claim, and cpu/memory are Kubernetes quantities, at admission and in the operator.

Invariants: lorafleet.uris.pvc_subpath refuses '.', '..' and empty segments, backslashes, percent-encoded dots or
slashes and control characters, and normalises a trailing slash; the CRDs' CEL rule (api.common.PVC_UNSAFE, read
by RE2 as by Python's re) refuses exactly the same URIs; the models refuse them too, naming the field; cpu and
memory accept what the apiserver's quantity grammar accepts and nothing else, and their generated schema is the
apiserver's int-or-string with the pattern; an object whose spec the operator cannot parse gets a status whose
conditions name the field (InvalidSpec).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from lorafleet.api.basemodel import ModelSource
from lorafleet.api.common import PVC_UNSAFE, QUANTITY, PodSettings
from lorafleet.api.crdgen import structural_schema
from lorafleet.api.finetunejob import Dataset, FineTuneJobSpec
from lorafleet.api.objects import FineTuneJobObject
from lorafleet.resources.status.invalid import field_path, invalid_spec_status
from lorafleet.uris import parse
from tests.unit import objects

SAFE = {
    "pvc://claim": "",
    "pvc://claim/": "",
    "pvc://claim/train.jsonl": "train.jsonl",
    "pvc://claim/data/train.jsonl": "data/train.jsonl",
    "pvc://claim/models/llama/": "models/llama",
    "pvc://claim/.hidden/a..b/...": ".hidden/a..b/...",
    "pvc://claim/100%25/x": "100%25/x",  # other percent escapes are plain characters
}
UNSAFE = [
    "pvc://claim/../other",
    "pvc://claim/..",
    "pvc://claim/data/../../other/x",
    "pvc://claim/./x",
    "pvc://claim/.",
    "pvc://claim//etc/passwd",
    "pvc://claim//",
    "pvc://claim/a//b",
    "pvc://claim/a/b//",
    "pvc://claim/%2e%2e/other",
    "pvc://claim/%2E%2e/other",
    "pvc://claim/a%2fb",
    "pvc://claim/a%5C..%5Cb",
    "pvc://claim/..\\other",
    "pvc://claim/a\x00b",
    "pvc://claim/a\nb",
]


@pytest.mark.parametrize(("uri", "path"), SAFE.items())
def test_safe_pvc_paths_are_normalised(uri: str, path: str) -> None:
    location = parse(uri)
    assert (location.scheme, location.authority, location.path) == ("pvc", "claim", path)
    assert re.search(PVC_UNSAFE, uri) is None


@pytest.mark.parametrize("uri", UNSAFE)
def test_unsafe_pvc_paths_are_refused_alike_by_the_parser_and_the_crd_rule(uri: str) -> None:
    with pytest.raises(ValueError, match="pvc:// path may not hold"):
        parse(uri)
    assert re.search(PVC_UNSAFE, uri) is not None


def test_s3_uris_are_left_to_their_own_rules() -> None:
    assert re.search(PVC_UNSAFE, "s3://bucket/a/../b") is None  # the rule applies to pvc:// only
    assert parse("s3://bucket/a/b").path == "a/b"


@pytest.mark.parametrize("field", ["uri", "evalUri"])
def test_dataset_refuses_a_path_outside_its_claim(field: str) -> None:
    body = {"uri": "s3://data/train.jsonl", "format": "chat", field: "pvc://claim/../other/x.jsonl"}
    with pytest.raises(ValidationError) as raised:
        Dataset.model_validate(body)
    assert raised.value.errors()[0]["loc"][0] == field
    assert "must stay inside its claim" in str(raised.value)


def test_base_model_source_refuses_a_path_outside_its_claim() -> None:
    with pytest.raises(ValidationError, match="must stay inside its claim"):
        ModelSource.model_validate({"uri": "pvc://models//etc"})
    assert ModelSource.model_validate({"uri": "pvc://models/llama/"}).uri == "pvc://models/llama/"


def test_the_crd_carries_the_pvc_rule_and_keeps_the_uri_pattern() -> None:
    dataset = structural_schema(FineTuneJobSpec)["properties"]["dataset"]["properties"]
    for field in ("uri", "evalUri"):
        assert dataset[field]["pattern"].startswith("^(s3://")
        assert dataset[field]["maxLength"] == 1024
        (rule,) = dataset[field]["x-kubernetes-validations"]
        assert PVC_UNSAFE in rule["rule"] and "inside its claim" in rule["message"]


GOOD_QUANTITIES: list[Any] = [0, 4, "4", "500m", "1.5", ".5", "64Gi", "16G", "1e3", "1E-3", "+2", "128974848"]
BAD_QUANTITIES: list[Any] = ["lots", "", "64 Gi", "64gi", "1.2.3", "-1", "Gi", "1Gb", "1e", "0x10", "9" * 65]
BAD_QUANTITIES += [-1, 1.5, True]


@pytest.mark.parametrize("value", GOOD_QUANTITIES)
@pytest.mark.parametrize("field", ["cpu", "memory"])
def test_quantities_the_apiserver_accepts_are_accepted(field: str, value: Any) -> None:
    assert getattr(PodSettings.model_validate({field: value}), field) == value


@pytest.mark.parametrize("value", BAD_QUANTITIES)
@pytest.mark.parametrize("field", ["cpu", "memory"])
def test_quantities_that_are_not_are_refused_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as raised:
        PodSettings.model_validate({field: value})
    assert {e["loc"][0] for e in raised.value.errors()} == {field}


def test_quantity_schema_is_the_apiservers_int_or_string_with_the_pattern() -> None:
    for field in ("cpu", "memory"):
        node = structural_schema(PodSettings)["properties"][field]
        assert node["x-kubernetes-int-or-string"] is True
        assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}]
        assert node["pattern"] == QUANTITY and node["minimum"] == 0 and node["nullable"] is True
        assert "x-kubernetes-preserve-unknown-fields" not in node  # it was: any value, even an object


def test_field_path_reads_like_the_apiservers() -> None:
    assert field_path(("spec", "resources", "memory", "str")) == "spec.resources.memory"
    assert field_path(("spec", "adapters", 0, "artifact", "uri")) == "spec.adapters[0].artifact.uri"
    assert field_path(("spec", "dataset", "uri", "function-after[pvc_inside_claim()]")) == "spec.dataset.uri"


def test_a_spec_the_operator_cannot_parse_gets_conditions_naming_the_fields() -> None:
    body = objects.fine_tune_job()
    body["spec"]["resources"] = {"memory": "lots"}
    body["spec"]["dataset"]["uri"] = "pvc://claim/../other/x.jsonl"
    with pytest.raises(ValidationError) as raised:
        FineTuneJobObject.model_validate(body)
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    status = invalid_spec_status(body, raised.value, now)
    by_type = {c["type"]: c for c in status["conditions"]}
    assert {t: (c["status"], c["reason"]) for t, c in by_type.items()} == {
        "Ready": ("False", "InvalidSpec"),
        "Progressing": ("False", "InvalidSpec"),
        "Degraded": ("True", "InvalidSpec"),
    }
    message = by_type["Degraded"]["message"]
    assert "spec.resources.memory: " in message and "spec.dataset.uri: " in message
    assert "must stay inside its claim" in message and "Fix the spec" in message
    assert status["observedGeneration"] == body["metadata"]["generation"]
