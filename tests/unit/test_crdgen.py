"""lorafleet.api.crdgen turns pydantic models into structural CRD schemas.

Invariants: every schema node has a type (structural) and camelCase names; nested models are inlined with their
descriptions and CEL rules; Optional is nullable; enums, bounds, maps, lists and int-or-string map to their
OpenAPI forms; an unsupported union, a recursive model or a field without a description raises naming the model
and path; the YAML dump is deterministic and round-trips.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Any, Literal

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from lorafleet.api.crdgen import CRDInfo, crd_manifest, dump_yaml, structural_schema

CAMEL = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

# Keys the apiserver forbids inside anyOf/oneOf/allOf/not branches of a structural schema.
_FORBIDDEN_IN_BRANCH = {"type", "description", "default", "additionalProperties", "nullable"}


def assert_structural(node: Any, path: str = "$", in_branch: bool = False) -> None:
    """Recursively check the structural-schema rules the apiserver enforces (subset we rely on)."""
    assert isinstance(node, dict), path
    assert "$ref" not in node and "$defs" not in node, f"{path}: unresolved ref"
    assert "title" not in node, f"{path}: title left in"
    assert "const" not in node and "allOf" not in node, f"{path}: non-OpenAPI-v3.0 keyword"
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        # OpenAPI v3.0 (what k8s speaks) has boolean exclusive bounds, not JSON Schema 2020 numbers.
        assert isinstance(node.get(key, False), bool), f"{path}: numeric {key}"
    if in_branch:
        # Only int-or-string may carry bare types in branches (checked by the parent).
        return
    int_or_string = node.get("x-kubernetes-int-or-string") is True
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    assert "type" in node or int_or_string or preserve, f"{path}: no type"
    if node.get("type") == "object":
        assert not ("properties" in node and "additionalProperties" in node), f"{path}: props+additional"
    if node.get("type") == "array":
        assert "items" in node, f"{path}: array without items"
        assert_structural(node["items"], f"{path}[]")
    for name, child in node.get("properties", {}).items():
        assert_structural(child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        assert_structural(node["additionalProperties"], f"{path}{{}}")
    for key in ("anyOf", "oneOf"):
        for i, branch in enumerate(node.get(key, [])):
            if int_or_string:
                assert branch in ({"type": "integer"}, {"type": "string"}), f"{path}.{key}[{i}]"
            else:
                assert not (_FORBIDDEN_IN_BRANCH & branch.keys()), f"{path}.{key}[{i}]: forbidden keys"
                assert_structural(branch, f"{path}.{key}[{i}]", in_branch=True)


# -- test models ---------------------------------------------------------------------------------


class Color(enum.StrEnum):
    RED = "red"
    BLUE = "blue"


class Limits(BaseModel):
    """Resource limits."""

    model_config = ConfigDict(
        **CAMEL,
        json_schema_extra={"x-kubernetes-validations": [{"rule": "self.maxReplicas >= self.minReplicas"}]},
    )
    min_replicas: int = Field(1, ge=0, description="Minimum replicas.")
    max_replicas: int = Field(4, le=64, gt=0, description="Maximum replicas.")


class Port(BaseModel):
    model_config = CAMEL
    name: str = Field(description="Port name.", min_length=1, max_length=15, pattern=r"^[a-z]+$")
    number: int = Field(description="Port number.", ge=1, le=65535)


class Spec(BaseModel):
    """Spec of a widget."""

    model_config = CAMEL
    base_model: str = Field(description="Name of the base model.")
    limits: Limits = Field(default_factory=Limits, description="Scaling limits.")
    overrides: Limits | None = Field(
        None,
        description="Optional overrides.",
        json_schema_extra={"x-kubernetes-validations": [{"rule": "self.minReplicas <= 8"}]},
    )
    mode: Literal["fast", "slow"] = Field("fast", description="Mode.")
    color: Color = Field(Color.RED, description="Color.")
    learning_rate: float = Field(1e-4, gt=0, lt=1, description="LR.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels.")
    extra_args: dict[str, Any] = Field(default_factory=dict, description="Free-form args.")
    anything: Any = Field(None, description="Anything at all.")
    max_unavailable: int | str = Field(1, description="Int or percentage.")
    ports: list[Port] = Field(default_factory=list, max_length=8, description="Ports.")
    tags: Annotated[list[str], Field(description="Tags.", json_schema_extra={"x-kubernetes-list-type": "set"})] = []
    unique: set[str] = Field(default_factory=set, description="A set.")
    deadline: datetime | None = Field(None, description="Deadline.")
    homepage: str | None = Field(None, description="Homepage.", json_schema_extra={"format": "uri"})


class Status(BaseModel):
    model_config = CAMEL
    phase: str = Field("Pending", description="Phase.")
    ready_replicas: int = Field(0, description="Ready replicas.")


# -- structural_schema ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spec_schema() -> dict[str, Any]:
    return structural_schema(Spec)


def test_schema_is_structural(spec_schema: dict[str, Any]) -> None:
    assert_structural(spec_schema)
    assert spec_schema["type"] == "object"
    assert spec_schema["description"] == "Spec of a widget."
    assert spec_schema["required"] == ["baseModel"]


def test_aliases_are_camel_case(spec_schema: dict[str, Any]) -> None:
    props = spec_schema["properties"]
    assert "baseModel" in props and "base_model" not in props
    assert set(props["limits"]["properties"]) == {"minReplicas", "maxReplicas"}


def test_nested_model_inlined_with_field_description_and_model_cel(spec_schema: dict[str, Any]) -> None:
    limits = spec_schema["properties"]["limits"]
    assert limits["type"] == "object"
    assert limits["description"] == "Scaling limits."  # field description wins over the docstring
    assert limits["x-kubernetes-validations"] == [{"rule": "self.maxReplicas >= self.minReplicas"}]
    assert "default" not in limits  # default_factory is not representable; pydantic applies it


def test_optional_becomes_nullable_and_cel_accumulates(spec_schema: dict[str, Any]) -> None:
    ov = spec_schema["properties"]["overrides"]
    assert ov["type"] == "object" and ov["nullable"] is True
    assert "default" not in ov and "anyOf" not in ov
    assert ov["x-kubernetes-validations"] == [
        {"rule": "self.maxReplicas >= self.minReplicas"},
        {"rule": "self.minReplicas <= 8"},
    ]
    deadline = spec_schema["properties"]["deadline"]
    assert deadline == {"type": "string", "format": "date-time", "description": "Deadline.", "nullable": True}


def test_enums_literal_and_enum_class(spec_schema: dict[str, Any]) -> None:
    props = spec_schema["properties"]
    assert props["mode"] == {
        "type": "string",
        "description": "Mode.",
        "default": "fast",
        "enum": ["fast", "slow"],
    }
    assert props["color"]["enum"] == ["red", "blue"]
    assert props["color"]["default"] == "red"
    assert props["color"]["type"] == "string"


def test_single_literal_const_becomes_enum() -> None:
    class M(BaseModel):
        kind: Literal["x"] = Field("x", description="Tag.")

    assert structural_schema(M)["properties"]["kind"] == {
        "type": "string",
        "description": "Tag.",
        "default": "x",
        "enum": ["x"],
    }


def test_bounds_and_string_constraints(spec_schema: dict[str, Any]) -> None:
    props = spec_schema["properties"]
    lim = props["limits"]["properties"]
    assert lim["minReplicas"]["minimum"] == 0 and "exclusiveMinimum" not in lim["minReplicas"]
    # JSON Schema 2020 numeric exclusive bounds -> OpenAPI v3.0 booleans.
    assert lim["maxReplicas"]["minimum"] == 0 and lim["maxReplicas"]["exclusiveMinimum"] is True
    assert lim["maxReplicas"]["maximum"] == 64
    lr = props["learningRate"]
    assert lr["type"] == "number"
    assert (lr["minimum"], lr["exclusiveMinimum"], lr["maximum"], lr["exclusiveMaximum"]) == (
        0,
        True,
        1,
        True,
    )
    port = props["ports"]["items"]["properties"]
    assert port["name"]["minLength"] == 1 and port["name"]["maxLength"] == 15
    assert port["name"]["pattern"] == "^[a-z]+$"


def test_maps_and_free_form(spec_schema: dict[str, Any]) -> None:
    props = spec_schema["properties"]
    assert props["labels"] == {
        "type": "object",
        "description": "Labels.",
        "additionalProperties": {"type": "string"},
    }
    assert props["extraArgs"] == {
        "type": "object",
        "description": "Free-form args.",
        "x-kubernetes-preserve-unknown-fields": True,
    }
    assert props["anything"] == {
        "description": "Anything at all.",
        "x-kubernetes-preserve-unknown-fields": True,
    }


def test_int_or_string(spec_schema: dict[str, Any]) -> None:
    mu = spec_schema["properties"]["maxUnavailable"]
    assert "type" not in mu
    assert mu["x-kubernetes-int-or-string"] is True
    assert mu["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    assert mu["default"] == 1


def test_lists(spec_schema: dict[str, Any]) -> None:
    props = spec_schema["properties"]
    ports = props["ports"]
    assert ports["type"] == "array" and ports["maxItems"] == 8
    assert ports["items"]["type"] == "object"
    assert ports["items"]["required"] == ["name", "number"]
    assert props["tags"]["x-kubernetes-list-type"] == "set"
    assert props["tags"]["items"] == {"type": "string"}
    # uniqueItems is rejected by k8s; sets become list-type=set instead.
    assert "uniqueItems" not in props["unique"]
    assert props["unique"]["x-kubernetes-list-type"] == "set"


def test_unknown_formats_dropped(spec_schema: dict[str, Any]) -> None:
    assert "format" not in spec_schema["properties"]["homepage"]


def test_field_cel_and_list_map_passthrough() -> None:
    class Item(BaseModel):
        name: str = Field(description="Key.")

    class M(BaseModel):
        items: list[Item] = Field(
            description="Items.",
            json_schema_extra={
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["name"],
                "x-kubernetes-validations": [{"rule": "size(self) < 5", "message": "too many"}],
            },
        )
        meta: dict[str, str] = Field(description="Atomic map.", json_schema_extra={"x-kubernetes-map-type": "atomic"})

    props = structural_schema(M)["properties"]
    assert props["items"]["x-kubernetes-list-type"] == "map"
    assert props["items"]["x-kubernetes-list-map-keys"] == ["name"]
    assert props["items"]["x-kubernetes-validations"] == [{"rule": "size(self) < 5", "message": "too many"}]
    assert props["meta"]["x-kubernetes-map-type"] == "atomic"


def test_union_of_models_merges_properties() -> None:
    class A(BaseModel):
        kind: Literal["a"] = Field(description="Tag.")
        x: int = Field(description="X.")

    class B(BaseModel):
        kind: Literal["b"] = Field(description="Tag.")
        y: str = Field(description="Y.")

    class M(BaseModel):
        source: Annotated[A | B, Field(discriminator="kind", description="Source.")]

    src = structural_schema(M)["properties"]["source"]
    assert_structural(src)
    assert src["type"] == "object" and src["description"] == "Source."
    assert set(src["properties"]) == {"kind", "x", "y"}
    assert src["properties"]["kind"]["enum"] == ["a", "b"]
    assert src["required"] == ["kind"]
    assert "anyOf" not in src and "oneOf" not in src


def test_unsupported_union_raises() -> None:
    class M(BaseModel):
        v: str | list[str] = Field(description="V.")

    with pytest.raises(ValueError, match=r"M\.v: union"):
        structural_schema(M)


def test_missing_description_names_model_and_path() -> None:
    class Inner(BaseModel):
        model_config = CAMEL
        lora_rank: int = 8

    class Outer(BaseModel):
        model_config = CAMEL
        training: list[Inner] = Field(description="Training.")

    with pytest.raises(ValueError, match=r"Outer\.training\[\]\.loraRank.*'loraRank' of model Inner"):
        structural_schema(Outer)


def test_recursion_raises() -> None:
    class Node(BaseModel):
        children: list[Node] = Field(default_factory=list, description="Children.")

    with pytest.raises(ValueError, match="recursive model reference"):
        structural_schema(Node)


def test_recursion_through_optional_raises() -> None:
    class Node(BaseModel):
        name: str = Field(description="Name.")
        next: Node | None = Field(None, description="Next.")

    with pytest.raises(ValueError, match="recursive"):
        structural_schema(Node)


# -- crd_manifest / dump_yaml --------------------------------------------------------------------

INFO = CRDInfo(
    group="lorafleet.example.com",
    version="v1alpha1",
    kind="Widget",
    plural="widgets",
    singular="widget",
    short_names=("wd",),
    categories=("lorafleet",),
    printer_columns=({"name": "Phase", "type": "string", "jsonPath": ".status.phase"},),
)


def test_crd_manifest_shape() -> None:
    crd = crd_manifest(INFO, Spec, Status, "A widget.", spec_validations=[{"rule": "has(self.baseModel)"}])
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == "widgets.lorafleet.example.com"
    spec = crd["spec"]
    assert spec["group"] == INFO.group and spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "Widget",
        "listKind": "WidgetList",
        "plural": "widgets",
        "singular": "widget",
        "shortNames": ["wd"],
        "categories": ["lorafleet"],
    }
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Age"]
    assert version["additionalPrinterColumns"][-1]["jsonPath"] == ".metadata.creationTimestamp"
    root = version["schema"]["openAPIV3Schema"]
    assert_structural(root)
    assert root["description"] == "A widget."
    assert root["required"] == ["spec"]
    assert list(root["properties"]) == ["apiVersion", "kind", "metadata", "spec", "status"]
    # The API server refuses anything but type on metadata.
    assert root["properties"]["metadata"] == {"type": "object"}
    for name, prop in root["properties"].items():
        assert name == "metadata" or prop["description"]
    assert root["properties"]["spec"]["x-kubernetes-validations"] == [{"rule": "has(self.baseModel)"}]
    assert "required" not in root["properties"]["status"]


def test_dump_yaml_is_deterministic_and_round_trips() -> None:
    a = dump_yaml(crd_manifest(INFO, Spec, Status, "A widget.\nSecond line."))
    b = dump_yaml(crd_manifest(INFO, Spec, Status, "A widget.\nSecond line."))
    assert a == b
    assert "&id" not in a and "*id" not in a  # no YAML anchors/aliases
    assert a.startswith("apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\n")
    loaded = yaml.safe_load(a)
    assert loaded == crd_manifest(INFO, Spec, Status, "A widget.\nSecond line.")
    assert "description: |" in a  # multi-line descriptions as literal blocks


def test_model_default_uses_aliases_and_extra_allow_preserves() -> None:
    class Open(BaseModel):
        model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")
        min_replicas: int = Field(1, description="Min.")

    class M(BaseModel):
        model_config = CAMEL
        open_cfg: Open = Field(Open(), description="Open config.")

    schema = structural_schema(M)
    assert_structural(schema)
    open_cfg = schema["properties"]["openCfg"]
    assert open_cfg["default"] == {"minReplicas": 1}
    assert open_cfg["x-kubernetes-preserve-unknown-fields"] is True
    assert "additionalProperties" not in open_cfg and "additionalProperties" not in schema
