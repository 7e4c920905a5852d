"""What to do with an owner's children (pure): apply only those whose desired content differs from what is in the
cluster, delete the owned ones that are no longer desired.

Each child is applied with a content-hash annotation of its desired body (`HASH_ANNOTATION`); a child whose
observed annotation equals the desired hash is left alone, so an unchanged object costs no write. The hash covers
what lorafleet renders, not what others change afterwards: a child edited by hand keeps its annotation and is
corrected when lorafleet's desired content changes, or at once when it is deleted (it is then missing).

Pruning only touches children selected by lorafleet's owner label and carrying a controller owner reference to
this very owner (its uid), and only of kinds that were listed: a kind that could not be listed (RBAC without
"list") is applied whole, as before, and never pruned.

No takeover: a desired child whose name is held by an object this owner does not control (someone else's
Service, or an object carrying lorafleet's labels with another owner's uid) is a conflict. The controller reads
the objects of the desired names it did not find among the owner's children (`unobserved`); when any of them, or
any labelled one, is not controlled by this owner, nothing at all is applied or pruned and the conflicts are
reported (the owner's Degraded condition), so a tenant cannot have lorafleet overwrite, or through garbage
collection delete, an object that is not its own. A child no object holds yet is created without `force`
(`ChildPlan.new`), so an object someone creates between the read and the apply makes the apply fail, not win.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lorafleet.resources.common import LABEL_PREFIX, MANAGED_BY, MANAGED_BY_LABEL, label_value

Obj = dict[str, Any]
HASH_ANNOTATION = f"{LABEL_PREFIX}/applied-hash"
ChildKind = tuple[str, str]  # (apiVersion, kind)

# Metadata the API server owns; never part of the desired content.
_SERVER_METADATA = ("managedFields", "resourceVersion", "uid", "creationTimestamp", "generation", "selfLink")


def owner_labels(owner_kind: str, owner_name: str) -> dict[str, str]:
    """The labels every child of an owner carries (resources.common.labels puts both on every child)."""
    return {MANAGED_BY_LABEL: MANAGED_BY, f"{LABEL_PREFIX}/{owner_kind.lower()}": label_value(owner_name)}


def owner_selector(owner_kind: str, owner_name: str) -> str:
    """The label selector of an owner's children."""
    return ",".join(f"{k}={v}" for k, v in owner_labels(owner_kind, owner_name).items())


def content_hash(child: Mapping[str, Any]) -> str:
    """Hash of a desired child's content: everything but status, server-owned metadata and the hash itself."""
    body = copy.deepcopy(dict(child))
    body.pop("status", None)
    metadata = body.get("metadata") or {}
    for key in _SERVER_METADATA:
        metadata.pop(key, None)
    annotations = dict(metadata.get("annotations") or {})
    annotations.pop(HASH_ANNOTATION, None)
    if annotations:
        metadata["annotations"] = annotations
    else:
        metadata.pop("annotations", None)
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:20]


def stamped(child: Mapping[str, Any]) -> Obj:
    """A copy of the desired child carrying its content hash."""
    out = copy.deepcopy(dict(child))
    metadata = out.setdefault("metadata", {})
    metadata["annotations"] = {**(metadata.get("annotations") or {}), HASH_ANNOTATION: content_hash(child)}
    return out


def key(obj: Mapping[str, Any]) -> tuple[str, str]:
    return str(obj.get("kind")), str((obj.get("metadata") or {}).get("name"))


def controlled_by(child: Mapping[str, Any], owner_uid: str | None) -> bool:
    """True when the child's controller owner reference points at this owner (by uid)."""
    if not owner_uid:
        return False
    refs = (child.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("controller") and ref.get("uid") == owner_uid for ref in refs)


def _hash_of(observed: Mapping[str, Any]) -> str | None:
    value = ((observed.get("metadata") or {}).get("annotations") or {}).get(HASH_ANNOTATION)
    return str(value) if value is not None else None


def controller_of(obj: Mapping[str, Any]) -> str:
    """`Kind/name` of an object's controller owner reference, or "" when it has none."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return f"{ref.get('kind')}/{ref.get('name')}"
    return ""


@dataclass(frozen=True)
class Conflict:
    """A desired child's name held by an object this owner does not control."""

    kind: str
    name: str
    controller: str  # `Kind/name` of the object's controller, "" when none

    def describe(self) -> str:
        held = f"controlled by {self.controller}" if self.controller else "not created by lorafleet"
        return f'{self.kind} "{self.name}" ({held})'


def conflict_message(conflicts: Sequence[Conflict], owner_kind: str) -> str:
    """The owner's Degraded message: what is in the way and how to resolve it."""
    things = ", ".join(c.describe() for c in conflicts)
    return (
        f"{things} already exists and is not controlled by this {owner_kind}; lorafleet changes nothing until "
        f"the name is free: create the {owner_kind} under another name, or delete the other object"
    )


def unobserved(desired: Sequence[Obj] | None, observed: Mapping[str, Iterable[Obj]]) -> list[tuple[str, str, str]]:
    """(apiVersion, kind, name) of each desired child not among the owner's observed children: the objects of
    those names, if any, are read by name (they may lack lorafleet's labels) and passed to `diff` as `existing`."""
    found = {(kind, str(item["metadata"]["name"])) for kind, items in observed.items() for item in items}
    return [(str(c.get("apiVersion")), *key(c)) for c in desired or [] if key(c) not in found]


@dataclass(frozen=True)
class ChildPlan:
    """Children to apply (stamped with their hash), to delete (as observed), and unchanged ones (as observed).
    `new` are the keys of the children no object holds yet (created without force); `conflicts` the desired
    names held by objects this owner does not control (then nothing is applied or deleted)."""

    apply: list[Obj] = field(default_factory=list)
    delete: list[Obj] = field(default_factory=list)
    unchanged: list[Obj] = field(default_factory=list)
    new: frozenset[tuple[str, str]] = frozenset()
    conflicts: list[Conflict] = field(default_factory=list)


def diff(
    desired: Sequence[Obj] | None,
    observed: Mapping[str, Iterable[Obj]],
    owner_uid: str | None,
    create_only: frozenset[str] = frozenset(),
    existing: Mapping[tuple[str, str], Obj | None] | None = None,
) -> ChildPlan:
    """The work that turns `observed` into `desired`.

    `desired` None means "leave the children as they are" (the inputs are not ready, or the owner is finished):
    nothing is applied or pruned. `observed` maps each kind that was listed to its children found with the owner's
    label selector; a desired child of a kind not in `observed` is always applied and never pruned. Kinds in
    `create_only` are applied only when missing: a batch/v1 Job's pod template is immutable, so a Job that runs
    keeps the template it started with (a changed render would only be refused with 422 at every pass).
    `existing` holds the objects read by name for the desired children not in `observed` (`unobserved`; None
    or absent: no object of that name).
    """
    if desired is None:
        return ChildPlan()
    found: dict[tuple[str, str], Obj] = {}
    for kind, items in observed.items():
        for item in items:
            found[(kind, str(item["metadata"]["name"]))] = item
    conflicts: list[Conflict] = []
    new: set[tuple[str, str]] = set()
    for child in desired:
        k = key(child)
        holder = found.get(k) or (existing or {}).get(k)
        if holder is None:
            new.add(k)
        elif not controlled_by(holder, owner_uid):
            conflicts.append(Conflict(k[0], k[1], controller_of(holder)))
    if conflicts:  # change nothing: not the free children either (a Job would mount someone else's ConfigMap)
        return ChildPlan(unchanged=list(found.values()), conflicts=conflicts)
    to_apply: list[Obj] = []
    unchanged: list[Obj] = []
    wanted: set[tuple[str, str]] = set()
    for child in desired:
        k = key(child)
        wanted.add(k)
        current = found.get(k)
        digest = content_hash(child)
        same = current is not None and (_hash_of(current) == digest or k[0] in create_only)
        if current is not None and same and not current["metadata"].get("deletionTimestamp"):
            unchanged.append(current)
            continue
        to_apply.append(stamped(child))
    to_delete = [
        item
        for k, item in found.items()
        if k not in wanted and controlled_by(item, owner_uid) and not item["metadata"].get("deletionTimestamp")
    ]
    return ChildPlan(apply=to_apply, delete=to_delete, unchanged=unchanged, new=frozenset(new))
