"""The status of an object whose spec the operator cannot parse: a condition naming each bad field.

The API server refuses such specs (the CRDs carry the same rules as the models), so this is defence in depth:
objects created under older CRDs, or a CRD that lags the operator. Nothing is rendered for such an object.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import ValidationError

from lorafleet.resources.conditions import ConditionStatus, ConditionType, Reason, set_condition

Obj = dict[str, Any]
MAX_LISTED = 5


def field_path(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as the API server writes a field path: spec.adapters[0].uri. The tags of
    union branches (int, constrained-str, function-after[...]) are not fields and are left out."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("int", "str") or "[" in part or "-" in part:  # camelCase field names have neither
            continue
        else:
            path += f".{part}" if path else part
    return path


def invalid_spec_message(exc: ValidationError) -> str:
    """One line per bad field (at most MAX_LISTED), each with what pydantic said about it."""
    problems: dict[str, list[str]] = {}
    for error in exc.errors(include_url=False):
        problems.setdefault(field_path(error["loc"]), []).append(str(error["msg"]))
    listed = [f"{path}: {' or '.join(dict.fromkeys(msgs))}" for path, msgs in list(problems.items())[:MAX_LISTED]]
    more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return (
        f"invalid spec: {'; '.join(listed)}{more}. Fix the spec (the API server would refuse it today: the CRDs "
        "may have been installed before this operator's)"
    )


def invalid_spec_status(body: Obj, exc: ValidationError, now: datetime) -> Obj:
    """The object's status with Ready and Progressing False and Degraded True, reason InvalidSpec (pure)."""
    status = dict(body.get("status") or {})
    generation = (body.get("metadata") or {}).get("generation")
    message = invalid_spec_message(exc)
    conditions = list(status.get("conditions") or [])
    values: list[tuple[str, ConditionStatus]] = [
        (ConditionType.READY, "False"),
        (ConditionType.PROGRESSING, "False"),
        (ConditionType.DEGRADED, "True"),
    ]
    for type_, value in values:
        conditions = set_condition(
            conditions, type=type_, status=value, reason=Reason.INVALID_SPEC, message=message,
            generation=generation, now=now,
        )  # fmt: skip
    status["conditions"] = conditions
    if generation is not None:
        status["observedGeneration"] = generation
    return status
