"""Helpers shared by the kinds' status functions: conditions on typed statuses, the BaseModel dependency, what the
artifact store said, and turning a Status model into the JSON merge patch the controller writes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from lorafleet.api.common import Condition
from lorafleet.api.objects import BaseModelObject
from lorafleet.resources.conditions import ConditionStatus, ConditionType, Reason, set_condition
from lorafleet.resources.stores import RenderError

Obj = dict[str, Any]


@dataclass(frozen=True)
class Cond:
    """A condition's value, before it is merged with the object's current conditions."""

    status: ConditionStatus
    reason: str
    message: str


@dataclass(frozen=True)
class ArtifactCheck:
    """What the operator found in the artifact store for a version folder (read by the controller)."""

    digest: str | None = None
    size_bytes: int | None = None
    revision: str | None = None
    rank: int | None = None  # an adapter's LoRA rank, from the lineage the trainer wrote
    job_uid: str | None = None  # the FineTuneJob UID its lineage names (hyperparameters.job.uid)
    # An adapter's task evaluation as its manifest stores it (lorafleet.contracts.evaluation.parse_result reads it).
    evaluation: Mapping[str, Any] | None = None
    # (reason, message) when the version could not be verified; transient unless reason is DigestMismatch.
    problem: tuple[str, str] | None = None


def merge_conditions(
    old: Sequence[Condition], conds: Mapping[str, Cond], generation: int | None, now: datetime
) -> list[Condition]:
    """Set the given conditions (by type) on top of the current ones (conditions.set_condition's rules)."""
    result: list[Obj] = [c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in old]
    for type_, c in conds.items():
        result = set_condition(
            result, type=type_, status=c.status, reason=c.reason, message=c.message, generation=generation, now=now
        )
    return [Condition.model_validate(c) for c in result]


def ready_triplet(
    old: Sequence[Condition],
    generation: int | None,
    now: datetime,
    *,
    ready: Cond,
    progressing: Cond,
    degraded: Cond,
    render_error: RenderError | None = None,
) -> list[Condition]:
    """Ready, Progressing and Degraded. A render error (the inputs exist but cannot be turned into children)
    overrides all three: not ready, not progressing, degraded with the error's reason."""
    if render_error is not None:
        ready = Cond("False", render_error.reason, render_error.message)
        progressing = Cond("False", render_error.reason, render_error.message)
        degraded = Cond("True", render_error.reason, render_error.message)
    conds = {ConditionType.READY: ready, ConditionType.PROGRESSING: progressing, ConditionType.DEGRADED: degraded}
    return merge_conditions(old, conds, generation, now)


def condition_message(conditions: Sequence[Condition], type_: str) -> str | None:
    return next((c.message for c in conditions if c.type == type_ and c.message), None)


def base_model_problem(name: str, base_model: BaseModelObject | None, waiter: str) -> Cond | None:
    """Why a dependant must wait for its BaseModel, or None when the BaseModel is Ready."""
    if base_model is None:
        return Cond("False", Reason.BASE_MODEL_NOT_FOUND, f'BaseModel "{name}" not found; the {waiter} once it exists')
    status = base_model.status
    phase = status.phase if status is not None else None
    if phase != "Ready":
        detail = condition_message(status.conditions, ConditionType.READY) if status is not None else None
        suffix = f": {detail}" if detail else ""
        return Cond(
            "False",
            Reason.BASE_MODEL_NOT_READY,
            f'BaseModel "{name}" is not Ready (phase {phase or "Pending"}){suffix}; the {waiter} once it is',
        )
    return None


def dig(obj: Obj | None, *path: str) -> Any:
    """A value inside a Kubernetes object the operator does not model (a Job, a Deployment), or None."""
    cur: Any = obj
    for key in path:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(key)
    return cur


def status_dict(status: BaseModel) -> Obj:
    """A Status model as the JSON the API server stores: camelCase, no None, no empty maps (metrics)."""
    body = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    return {k: v for k, v in body.items() if v != {}}


def status_patch(old: Obj | None, new: Obj) -> Obj:
    """`new` as a JSON merge patch over `old`: keys `new` dropped are set to None (null) so they are removed.

    The status functions leave None out, and a merge patch leaves keys it does not name untouched, so an
    endpoint or a progress field that went away would otherwise stay on the object. Lists are replaced
    whole by a merge patch and need nothing.
    """
    patch: Obj = {k: None for k in (old or {}) if k not in new}
    for key, value in new.items():
        before = (old or {}).get(key)
        patch[key] = status_patch(before, value) if isinstance(value, dict) and isinstance(before, dict) else value
    return patch
