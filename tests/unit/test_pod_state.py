"""Asking the replicas for their adapters is bounded: a response over the size cap, a pod that trickles bytes past
the deadline and a pod that never answers each count as "not reporting" for that pod only; the others' answers
are used, and the reconcile waits no longer than the deadline."""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.request
from typing import Any

import pytest

from lorafleet.controllers import adapterdeployment as ad_controller


def _pod(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"phase": "Running", "podIP": f"10.0.0.{len(name)}"}}


class _Response(io.BytesIO):
    def __enter__(self) -> _Response:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def test_an_oversized_state_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    huge = b'{"adapters": "' + b"x" * (ad_controller.POD_STATE_MAX_BYTES + 10) + b'"}'
    monkeypatch.setattr(urllib.request, "urlopen", lambda *_, **__: _Response(huge))
    state = ad_controller._fetch_state(_pod("a"))
    assert "larger than" in state["error"]


def test_a_trickling_pod_is_cut_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    class Trickle(_Response):
        def read1(self, n: int = -1) -> bytes:
            time.sleep(0.02)
            return b" "

    monkeypatch.setattr(ad_controller, "POD_STATE_DEADLINE", 0.1)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *_, **__: Trickle())
    state = ad_controller._fetch_state(_pod("a"))
    assert "within" in state["error"]


def test_a_pod_that_never_answers_does_not_hold_up_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def fetch(pod: dict[str, Any]) -> dict[str, Any]:
        if pod["metadata"]["name"] == "hung":
            release.wait(5)
        return {"pod": pod["metadata"]["name"], "adapters": []}

    monkeypatch.setattr(ad_controller, "_fetch_state", fetch)
    monkeypatch.setattr(ad_controller, "POD_STATE_DEADLINE", 0.2)
    monkeypatch.setattr(ad_controller, "POD_STATE_TIMEOUT", 0.1)
    started = time.monotonic()
    try:
        states = ad_controller.pod_states([_pod("ok"), _pod("hung")])
    finally:
        release.set()
    assert time.monotonic() - started < 2
    assert states[0] == {"pod": "ok", "adapters": []}
    assert states[1] == {"pod": "hung", "error": "no answer in time"}


def test_a_normal_answer_is_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    body = json.dumps({"adapters": [{"name": "sql", "state": "Loaded"}]}).encode()
    monkeypatch.setattr(urllib.request, "urlopen", lambda *_, **__: _Response(body))
    assert ad_controller._fetch_state(_pod("a")) == {"pod": "a", "adapters": [{"name": "sql", "state": "Loaded"}]}
