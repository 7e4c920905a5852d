"""Generate Kubernetes CustomResourceDefinition manifests from pydantic v2 models.

The apiserver only accepts *structural* schemas (OpenAPI v3.0 subset): every node has a ``type``
(or an ``x-kubernetes-*`` escape hatch), no ``$ref``, and ``anyOf``/``oneOf`` branches may not carry
``type``/``description``/``default``. Pydantic emits JSON Schema 2020-12, so this module post-processes
``model_json_schema()`` into that shape, in the spirit of azimuth-cloud/kube-custom-resource but without
requiring special base classes or annotated types on the models.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

__all__ = ["CRDInfo", "crd_manifest", "dump_yaml", "structural_schema"]

Schema = dict[str, Any]


@dataclass(frozen=True)
class CRDInfo:
    """Names and presentation of one custom resource kind."""

    group: str
    version: str
    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    printer_columns: tuple[dict[str, Any], ...] = ()  # already in CRD additionalPrinterColumns form
    scope: str = "Namespaced"


# Formats whose apiserver validation matches what pydantic accepts. Others are dropped: e.g. pydantic's
# "duration" is ISO 8601 ("P1D") while k8s expects Go durations ("1h"), and "uri"/"email" use different
# grammars, so keeping them could make the apiserver reject objects the operator considers valid.
_K8S_FORMATS = frozenset({"date-time", "date", "int32", "int64", "float", "double", "byte", "uuid", "ipv4", "ipv6"})

# Value validations copied verbatim (all exist in apiextensions v1 JSONSchemaProps).
_VALIDATION_KEYS = (
    "minimum",
    "maximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
)

# Output key order: fixed so generated YAML diffs stay minimal and golden checks are stable.
_KEY_ORDER = (
    "type",
    "format",
    "description",
    "nullable",
    "default",
    "enum",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "anyOf",
    "oneOf",
)


class _Converter:
    """Walks one pydantic JSON schema, inlining ``$defs`` and rewriting nodes into structural form."""

    def __init__(self, root_model: type[BaseModel], root: Schema) -> None:
        self.root_name = root_model.__name__
        self.defs: dict[str, Schema] = root.get("$defs", {})

    # -- reference / combinator flattening -------------------------------------------------------

    def _deref(self, node: Schema, stack: tuple[str, ...]) -> tuple[Schema, tuple[str, ...]]:
        """Inline ``$ref`` (and pydantic's legacy single-item ``allOf`` wrapper) one level.

        Sibling keys (field description/default/json_schema_extra) override the referenced definition,
        except x-kubernetes-validations, which concatenate so model- and field-level rules both apply.
        """
        node = dict(node)
        if "allOf" in node and len(node["allOf"]) == 1:
            node = {**node.pop("allOf")[0], **node}
        ref = node.pop("$ref", None)
        if ref is None:
            return node, stack
        name = str(ref).rsplit("/", 1)[-1]
        if name in stack:
            cycle = " -> ".join((*stack, name))
            raise ValueError(
                f"{self.root_name}: recursive model reference {cycle}; structural CRD schemas cannot express recursion"
            )
        if name not in self.defs:
            raise ValueError(f"{self.root_name}: unresolvable schema reference {ref!r}")
        target, stack = self._deref(self.defs[name], (*stack, name))
        return _overlay(target, node), stack

    def _flatten_union(self, node: Schema, path: str, stack: tuple[str, ...]) -> tuple[Schema, tuple[str, ...]]:
        """Rewrite ``anyOf``/``oneOf`` into something structural; see the branch comments."""
        key = "anyOf" if "anyOf" in node else "oneOf"
        outer = {k: v for k, v in node.items() if k not in (key, "discriminator")}
        branches: list[Schema] = []
        # Definitions entered by any branch; kept so recursion through a union is still detected.
        seen: dict[str, None] = dict.fromkeys(stack)
        nullable = False
        for raw in node[key]:
            branch, branch_stack = self._deref(raw, stack)
            if branch.get("type") == "null":
                nullable = True  # Optional[X]: OpenAPI v3.0 has no null type, it has nullable.
            else:
                branches.append(branch)
                seen.update(dict.fromkeys(branch_stack))
        stack = tuple(seen)
        if nullable:
            outer["nullable"] = True
        if len(branches) == 1:
            # Optional[X] -> X's schema; the field's own keys (description, default) win over X's.
            return self._deref(_overlay(branches[0], outer), stack)

        types = {b.get("type") for b in branches}
        if types == {"integer", "string"} and len(branches) == 2:
            # The one place k8s allows typed anyOf branches: the int-or-string escape hatch.
            outer.pop("type", None)
            outer["x-kubernetes-int-or-string"] = True
            outer["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            return outer, stack
        if types == {"integer", "number"}:
            return {**branches[0], **outer, "type": "number"}, stack
        if types == {"object"}:
            # Structural schemas forbid type/description/default inside branches, and pruning only keeps
            # fields declared at the parent. So declare the union of all branches' properties on the parent
            # and only require what every branch requires. The per-branch exclusivity is dropped rather
            # than expressed as oneOf[{required: ...}] because branches with identical required lists
            # (typical for discriminated unions) would make oneOf unsatisfiable; pydantic still enforces
            # the exact branch when the operator parses the object.
            merged: Schema = {"type": "object", "properties": {}}
            required: set[str] | None = None
            for b in branches:
                for pname, pschema in b.get("properties", {}).items():
                    existing = merged["properties"].get(pname)
                    if existing is not None:
                        existing_d, _ = self._deref(existing, stack)
                        new_d, _ = self._deref(pschema, stack)
                        if "enum" in existing_d or "const" in existing_d:
                            # Discriminator fields: accept every branch's tag value.
                            values = _enum_values(existing_d)
                            values += [v for v in _enum_values(new_d) if v not in values]
                            existing_d.pop("const", None)
                            merged["properties"][pname] = {**existing_d, "enum": values}
                        continue
                    merged["properties"][pname] = pschema
                breq = set(b.get("required", []))
                required = breq if required is None else required & breq
            if required:
                merged["required"] = [p for p in merged["properties"] if p in required]
            return _overlay(merged, outer), stack
        raise ValueError(
            f"{self.root_name}.{path}: union of {sorted(str(t) for t in types)} has no structural "
            "equivalent; use a single type, Optional[X], int | str, or a union of models"
        )

    # -- main conversion -------------------------------------------------------------------------

    def convert(self, raw: Schema, path: str, model: str, stack: tuple[str, ...] = ()) -> Schema:
        node, stack = self._deref(raw, stack)
        # Twice for Optional[union] (Optional[Quantity]): the outer union leaves the inner one to flatten.
        while ("anyOf" in node or "oneOf" in node) and not node.get("x-kubernetes-int-or-string"):
            node, stack = self._flatten_union(node, path, stack)
        if node.get("x-kubernetes-int-or-string"):
            return self._finish(node, {"anyOf": node["anyOf"]})

        out: Schema = {}
        typ = node.get("type")
        if isinstance(typ, list):
            # JSON Schema type lists: only ["X", "null"] maps onto OpenAPI v3.0.
            non_null = [t for t in typ if t != "null"]
            if len(non_null) != 1:
                raise ValueError(f"{self.root_name}.{path}: type list {typ} has no structural equivalent")
            typ = non_null[0]
            if "null" in node["type"]:
                node["nullable"] = True
        if typ is None and ("properties" in node or "additionalProperties" in node):
            typ = "object"
        if typ is None and "const" in node:
            typ = _json_type(node["const"])
        if typ is None and "enum" in node:
            enum_types = {_json_type(v) for v in node["enum"] if v is not None}
            typ = enum_types.pop() if len(enum_types) == 1 else None

        if typ is None:
            # Any / unconstrained: the only structural way to say "anything" is to stop pruning.
            out["x-kubernetes-preserve-unknown-fields"] = True
            return self._finish(node, out)

        out["type"] = typ
        if typ == "object":
            props = node.get("properties", {})
            if "title" in node and props:
                model = str(node["title"])
            if props:
                out["properties"] = {}
                for pname, pschema in props.items():
                    ppath = f"{path}.{pname}" if path else pname
                    child = self.convert(pschema, ppath, model, stack)
                    if not child.get("description"):
                        raise ValueError(
                            f"{self.root_name}.{ppath}: field {pname!r} of model {model} has no description "
                            "(every CRD field needs Field(description=...) so `kubectl explain` documents it)"
                        )
                    out["properties"][pname] = child
                if node.get("required"):
                    out["required"] = list(node["required"])
            extra = node.get("additionalProperties")
            if isinstance(extra, dict) and extra and not props:
                # dict[str, X]: typed map.
                value = self.convert(extra, f"{path}{{}}", model, stack)
                if value.get("x-kubernetes-preserve-unknown-fields") and "type" not in value:
                    out["x-kubernetes-preserve-unknown-fields"] = True
                else:
                    out["additionalProperties"] = value
            elif (extra is True or extra == {}) or (not props and extra is None):
                # dict[str, Any], free-form objects and extra="allow" models: keep unknown keys rather
                # than have the apiserver silently prune them. (additionalProperties: false from
                # extra="forbid" is dropped: k8s forbids it alongside properties and pruning does the job.)
                out["x-kubernetes-preserve-unknown-fields"] = True
        elif typ == "array":
            if "prefixItems" in node:
                raise ValueError(f"{self.root_name}.{path}: tuples have no structural equivalent; use a list")
            items = node.get("items")
            if not isinstance(items, dict):
                raise ValueError(f"{self.root_name}.{path}: array has no item schema")
            out["items"] = self.convert(items, f"{path}[]", model, stack)
            # k8s rejects uniqueItems: true; a set list-type is the supported spelling for scalars.
            scalar_items = out["items"].get("type") in ("string", "integer", "number", "boolean")
            if node.get("uniqueItems") and scalar_items and "x-kubernetes-list-type" not in node:
                out["x-kubernetes-list-type"] = "set"
        return self._finish(node, out)

    def _finish(self, node: Schema, out: Schema) -> Schema:
        """Copy descriptions, defaults and value validations, then order keys canonically."""
        if node.get("description"):
            out["description"] = node["description"]
        if node.get("nullable"):
            out["nullable"] = True
        if node.get("default") is not None:
            # A null default would be rejected for non-nullable types and is meaningless otherwise.
            out["default"] = copy.deepcopy(node["default"])
        if "const" in node:
            out["enum"] = [node["const"]]
        elif "enum" in node:
            out["enum"] = [v for v in node["enum"] if v is not None]
            if None in node["enum"]:
                out["nullable"] = True
        fmt = node.get("format")
        if fmt in _K8S_FORMATS:
            out["format"] = fmt
        for key in _VALIDATION_KEYS:
            if key in node:
                out[key] = node[key]
        # JSON Schema 2020-12 numeric exclusive bounds -> OpenAPI v3.0 boolean flags (k8s rejects numbers).
        for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
            value = node.get(exclusive)
            if isinstance(value, bool):
                if value:
                    out[exclusive] = True
            elif value is not None:
                out[bound] = value
                out[exclusive] = True
        for key, value in node.items():
            if key.startswith("x-kubernetes-") and key not in out:
                out[key] = copy.deepcopy(value)
        if "example" in node:
            out["example"] = copy.deepcopy(node["example"])
        return _ordered(out)


def _overlay(base: Schema, over: Schema) -> Schema:
    """``over``'s keys win, except CEL rules, which accumulate so model- and field-level rules both apply."""
    merged = {**base, **over}
    key = "x-kubernetes-validations"
    if key in base and key in over:
        merged[key] = [*base[key], *(r for r in over[key] if r not in base[key])]
    return merged


def _enum_values(schema: Schema) -> list[Any]:
    return [*schema.get("enum", []), *([schema["const"]] if "const" in schema else [])]


def _json_type(value: Any) -> str | None:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return None


def _ordered(node: Schema) -> Schema:
    known = {k: node[k] for k in _KEY_ORDER if k in node}
    rest = {k: node[k] for k in sorted(node) if k not in known}
    return {**known, **rest}


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """Return the structural openAPIV3Schema for ``model`` (aliases as property names).

    Raises ValueError for recursive models, unsupported unions and fields without a description.
    """
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _Converter(model, raw).convert(raw, "", model.__name__)


def crd_manifest(
    info: CRDInfo,
    spec_model: type[BaseModel],
    status_model: type[BaseModel],
    description: str,
    spec_validations: list[dict[str, str]] | None = None,
    object_validations: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Build a complete apiextensions.k8s.io/v1 CustomResourceDefinition for one served+storage version."""
    spec = structural_schema(spec_model)
    spec.setdefault("description", f"Desired state of the {info.kind}.")
    if spec_validations:
        spec["x-kubernetes-validations"] = [*spec.get("x-kubernetes-validations", []), *spec_validations]
    spec = _ordered(spec)
    status = structural_schema(status_model)
    status.setdefault("description", f"Observed state of the {info.kind}, written by the operator.")
    status = _ordered(status)

    columns = [copy.deepcopy(c) for c in info.printer_columns]
    if not any(c.get("name") == "Age" for c in columns):
        columns.append({"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"})

    names: dict[str, Any] = {
        "kind": info.kind,
        "listKind": f"{info.kind}List",
        "plural": info.plural,
        "singular": info.singular,
    }
    if info.short_names:
        names["shortNames"] = list(info.short_names)
    if info.categories:
        names["categories"] = list(info.categories)

    root: Schema = {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": "APIVersion defines the versioned schema of this representation of an object.",
            },
            "kind": {
                "type": "string",
                "description": "Kind is the REST resource this object represents.",
            },
            # The API server allows nothing but type here (it documents metadata itself).
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    if object_validations:  # at the root, where CEL sees metadata.name
        root["x-kubernetes-validations"] = list(object_validations)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{info.plural}.{info.group}"},
        "spec": {
            "group": info.group,
            "names": names,
            "scope": info.scope,
            "versions": [
                {
                    "name": info.version,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


class _Dumper(yaml.SafeDumper):
    """SafeDumper without anchors/aliases (kubectl and reviewers expect plain trees)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    # Multi-line descriptions (docstrings) read far better as literal blocks.
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_representer)


def dump_yaml(manifest: dict[str, Any]) -> str:
    """Serialize deterministically: insertion order (canonical by construction), no wrapping, no aliases."""
    return yaml.dump(
        manifest,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=1 << 16,
    )
