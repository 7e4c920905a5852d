"""Conditions follow the Kubernetes API conventions.

Invariants pinned here: set_condition never mutates its input; lastTransitionTime moves only when the
status flips; observedGeneration always follows the latest pass; order is stable (first appearance);
transitions() reports a condition exactly when it is new or its status or reason changed.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from lorafleet.resources.conditions import (
    ConditionType,
    Reason,
    get_condition,
    notable_transitions,
    rfc3339,
    set_condition,
    transitions,
)

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


def cond(
    type: str = "Ready",
    status: str = "False",
    reason: str = "JobCreating",
    message: str = "",
    at: datetime = T0,
    generation: int | None = 1,
) -> dict[str, Any]:
    c: dict[str, Any] = {
        "type": type,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": rfc3339(at),
    }
    if generation is not None:
        c["observedGeneration"] = generation
    return c


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (T0, "2025-01-02T03:04:05Z"),
        (T0.replace(microsecond=999_999), "2025-01-02T03:04:05Z"),
        (datetime(2025, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2))), "2025-01-02T03:04:05Z"),
        (datetime(2025, 1, 2, 3, 4, 5), "2025-01-02T03:04:05Z"),  # naive is UTC
    ],
)
def test_rfc3339(value: datetime, expected: str) -> None:
    assert rfc3339(value) == expected


def test_set_condition_appends_new_with_now() -> None:
    out = set_condition([], type="Ready", status="False", reason="JobCreating", message="m", generation=3, now=T0)
    assert out == [
        {
            "type": "Ready",
            "status": "False",
            "reason": "JobCreating",
            "message": "m",
            "observedGeneration": 3,
            "lastTransitionTime": "2025-01-02T03:04:05Z",
        }
    ]


@pytest.mark.parametrize(
    ("new_status", "new_reason", "new_message", "expected_time"),
    [
        pytest.param("False", "JobCreating", "same", rfc3339(T0), id="unchanged"),
        pytest.param("False", "JobRunning", "same", rfc3339(T0), id="reason-only-keeps-time"),
        pytest.param("False", "JobCreating", "other", rfc3339(T0), id="message-only-keeps-time"),
        pytest.param("True", "Succeeded", "done", rfc3339(T1), id="status-flip-moves-time"),
        pytest.param("Unknown", "JobCreating", "same", rfc3339(T1), id="to-unknown-moves-time"),
    ],
)
def test_last_transition_time_moves_only_on_status_flip(
    new_status: Any, new_reason: str, new_message: str, expected_time: str
) -> None:
    old = [cond(message="same", generation=1)]
    out = set_condition(
        old, type="Ready", status=new_status, reason=new_reason, message=new_message, generation=2, now=T1
    )
    assert out[0]["lastTransitionTime"] == expected_time
    assert out[0]["observedGeneration"] == 2
    assert (out[0]["status"], out[0]["reason"], out[0]["message"]) == (new_status, new_reason, new_message)


def test_stable_over_many_passes() -> None:
    conds: list[dict[str, Any]] = []
    for minute in range(10):
        conds = set_condition(
            conds,
            type="Ready",
            status="False",
            reason="JobRunning",
            message=f"step {minute}",
            generation=1,
            now=T0 + timedelta(minutes=minute),
        )
    assert conds[0]["lastTransitionTime"] == rfc3339(T0)


def test_missing_transition_time_is_filled() -> None:
    old = [{"type": "Ready", "status": "True", "reason": "Serving"}]
    out = set_condition(old, type="Ready", status="True", reason="Serving", message="", generation=None, now=T1)
    assert out[0]["lastTransitionTime"] == rfc3339(T1)
    assert "observedGeneration" not in out[0]


def test_input_not_mutated_and_order_stable() -> None:
    old = [cond("Ready"), cond("Progressing", "True"), cond("Degraded")]
    snapshot = copy.deepcopy(old)
    out = set_condition(old, type="Progressing", status="False", reason="Succeeded", message="", generation=1, now=T1)
    out = set_condition(out, type="Custom", status="True", reason="X", message="", generation=1, now=T1)
    out = set_condition(out, type="Ready", status="True", reason="Succeeded", message="", generation=1, now=T1)
    assert old == snapshot
    assert [c["type"] for c in out] == ["Ready", "Progressing", "Degraded", "Custom"]


def test_get_condition() -> None:
    conds = [cond("Ready"), cond("Degraded", "True")]
    assert get_condition(conds, "Degraded") == conds[1]
    assert get_condition(conds, "Progressing") is None
    assert get_condition([], "Ready") is None


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        pytest.param(
            [],
            [cond(status="False", reason="JobCreating", message="m")],
            [("Ready", "False", "JobCreating", "m")],
            id="new-condition",
        ),
        pytest.param(
            [cond(status="False")],
            [cond(status="True", reason="Succeeded", message="ok")],
            [("Ready", "True", "Succeeded", "ok")],
            id="status-changed",
        ),
        pytest.param(
            [cond(reason="JobCreating")],
            [cond(reason="JobRunning", message="r")],
            [("Ready", "False", "JobRunning", "r")],
            id="reason-changed",
        ),
        pytest.param(
            [cond(message="step 1")], [cond(message="step 2", at=T1, generation=2)], [], id="message-only-no-event"
        ),
        pytest.param([cond("Ready"), cond("Degraded")], [cond("Ready")], [], id="removed-ignored"),
        pytest.param(
            [cond("Ready"), cond("Degraded")],
            [cond("Ready", "True", "Succeeded"), cond("Degraded", "True", "JobFailed", "x")],
            [("Ready", "True", "Succeeded", ""), ("Degraded", "True", "JobFailed", "x")],
            id="several-in-order",
        ),
    ],
)
def test_transitions(old: list[dict[str, Any]], new: list[dict[str, Any]], expected: list[tuple[str, ...]]) -> None:
    assert transitions(old, new) == expected


def test_transitions_from_none() -> None:
    assert transitions(None, [cond()]) == [("Ready", "False", "JobCreating", "")]


def test_reasons_are_camel_case() -> None:
    reasons = [v for k, v in vars(Reason).items() if k.isupper()]
    types = [v for k, v in vars(ConditionType).items() if k.isupper()]
    for values in (reasons, types):
        assert values and all(isinstance(v, str) and v[:1].isupper() and v.isalnum() for v in values)
        assert len(set(values)) == len(values)


def test_a_first_status_posts_one_event_unless_something_is_wrong() -> None:
    """Creating an object posts Ready's Event (plus Degraded=True's), not one per condition type: each Event is a
    write, paid N times by a burst of N objects. Later, every transition is notable."""
    first = [
        {"type": "Ready", "status": "False", "reason": "JobCreating"},
        {"type": "Succeeded", "status": "False", "reason": "Running"},
        {"type": "Degraded", "status": "False", "reason": "AsExpected"},
    ]
    assert [t[0] for t in notable_transitions(None, first)] == ["Ready"]
    degraded = [*first[:2], {"type": "Degraded", "status": "True", "reason": "StoreUnavailable"}]
    assert [t[0] for t in notable_transitions([], degraded)] == ["Ready", "Degraded"]
    later = [{**first[0], "status": "True", "reason": "Running"}, {**first[1], "reason": "Done"}, first[2]]
    assert [t[0] for t in notable_transitions(first, later)] == ["Ready", "Succeeded"]
