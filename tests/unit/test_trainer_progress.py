"""Progress lines and the published progress (lorafleet.trainer.progress).

Invariants: off a terminal every line is one JSON object with time, level and event; tokens/s and the ETA come
from the reporter's own clock; the published progress carries {version, step, totalSteps, epoch, loss,
tokensPerSecond} only, fits contracts.trainer.MAX_PROGRESS_BYTES, only its newest value is sent, and a refusal by
the API server stops further attempts without raising.
"""

from __future__ import annotations

import io
import json
import threading
from typing import Any

import pytest

from lorafleet.contracts.trainer import MAX_PROGRESS_BYTES, PROGRESS_CONFIG_MAP_ENV, PROGRESS_KEY, parse_progress
from lorafleet.trainer.progress import ProgressPublisher, ProgressReporter, config_map_patch


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_json_lines_with_rates_and_eta() -> None:
    out, clock = io.StringIO(), Clock()
    reporter = ProgressReporter(out, tty=False, clock=clock)
    reporter.start(0)
    clock.now += 10
    reporter.progress(step=10, total_steps=40, epoch=0.5, loss=2.5, learning_rate=1e-4, tokens_seen=1000)
    clock.now += 10
    annotation = reporter.progress(step=20, total_steps=40, epoch=1.0, loss=float("nan"), tokens_seen=3000)
    reporter.event("checkpoint", step=20, uri="s3://b/c")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["progress", "progress", "checkpoint"]
    first, second = lines[0], lines[1]
    assert first["step"] == 10 and first["totalSteps"] == 40 and first["learningRate"] == 1e-4
    assert first["etaSeconds"] == 30.0 and "tokensPerSecond" not in first
    assert second["tokensPerSecond"] == 200.0 and second["etaSeconds"] == 20.0
    assert "loss" not in second  # NaN is left out, not written as invalid JSON
    assert all(line["level"] == "info" and "time" in line for line in lines)
    assert annotation == {"version": 1, "step": 20, "totalSteps": 40, "epoch": 1.0, "tokensPerSecond": 200.0}
    assert "version" not in second  # the log line is for people and log pipelines, not a contract


def test_eta_counts_from_the_resumed_step() -> None:
    out, clock = io.StringIO(), Clock()
    reporter = ProgressReporter(out, tty=False, clock=clock)
    reporter.start(100)
    clock.now += 5
    reporter.progress(step=110, total_steps=200, epoch=None, loss=1.0)
    assert json.loads(out.getvalue())["etaSeconds"] == 45.0


def test_terminal_progress_bar() -> None:
    out = io.StringIO()
    reporter = ProgressReporter(out, tty=True, clock=Clock())
    reporter.progress(step=5, total_steps=10, epoch=1.0, loss=1.2345, learning_rate=2e-4)
    reporter.event("checkpoint", step=5)
    text = out.getvalue()
    assert text.startswith("\r[############............] 5/10  loss 1.2345  lr 2.00e-04")
    assert "\n[checkpoint] step=5\n" in text


def test_disabled_reporter_still_feeds_the_publisher() -> None:
    out = io.StringIO()
    posted: list[dict[str, Any]] = []
    done = threading.Event()

    def patch(progress: dict[str, Any]) -> None:
        posted.append(progress)
        done.set()

    reporter = ProgressReporter(out, tty=False, enabled=False, publisher=ProgressPublisher(patch))
    reporter.progress(step=1, total_steps=2, epoch=0.5, loss=1.0)
    assert done.wait(5)
    reporter.close()
    assert out.getvalue() == "" and posted == [{"version": 1, "step": 1, "totalSteps": 2, "epoch": 0.5, "loss": 1.0}]


def test_publisher_sends_only_the_newest_value() -> None:
    gate, sent = threading.Event(), []

    def slow_patch(progress: dict[str, Any]) -> None:
        gate.wait(5)
        sent.append(progress["step"])

    publisher = ProgressPublisher(slow_patch)
    publisher.post({"step": 1})
    for step in range(2, 10):
        publisher.post({"step": step})
    gate.set()
    publisher.close()
    assert sent[0] in (1, 9) and sent[-1] == 9 and len(sent) <= 2


class Refused(Exception):
    status = 403


def test_publisher_stops_after_a_refusal_and_never_raises() -> None:
    calls = []

    def refuse(progress: dict[str, Any]) -> None:
        calls.append(progress)
        raise Refused("forbidden")

    publisher = ProgressPublisher(refuse)
    publisher.post({"step": 1})
    publisher.close()
    assert publisher.disabled == "HTTP 403"
    publisher.post({"step": 2})  # after close: nothing happens, nothing raises
    assert len(calls) == 1


def test_publisher_needs_the_pod_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROGRESS_CONFIG_MAP_ENV, raising=False)
    assert ProgressPublisher.from_environment() is None
    monkeypatch.setenv(PROGRESS_CONFIG_MAP_ENV, "p")
    monkeypatch.setenv("POD_NAMESPACE", "ns")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert ProgressPublisher.from_environment() is None


def test_published_progress_parses_back_and_fits_the_cap() -> None:
    reporter = ProgressReporter(io.StringIO(), tty=False, enabled=False)
    big = 10**18
    published = reporter.progress(step=big, total_steps=big, epoch=1e300, loss=-1e-300, tokens_seen=big)
    text = json.dumps(published, separators=(",", ":"))
    assert len(text) <= MAX_PROGRESS_BYTES
    parsed = parse_progress(text)
    assert parsed is not None and parsed.step == big and parsed.epoch == 1e300


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "not json",
        "[1, 2]",
        '"a string"',
        json.dumps({"step": 1, "pad": "x" * MAX_PROGRESS_BYTES}),  # over the cap: refused before parsing
        "[" * 600 + "]" * 600,
    ],
)
def test_untrusted_progress_reads_as_none(text: str | None) -> None:
    assert parse_progress(text) is None


def test_odd_progress_fields_read_as_absent_and_unknown_ones_are_ignored() -> None:
    parsed = parse_progress('{"version": 7, "step": "9", "totalSteps": true, "loss": 0.5, "future": {"x": 1}}')
    assert parsed is not None
    assert (parsed.version, parsed.step, parsed.total_steps, parsed.loss) == (7, None, None, 0.5)


def test_publisher_patches_only_the_progress_key() -> None:
    body = config_map_patch({"version": 1, "step": 3})
    assert body == {"data": {PROGRESS_KEY: '{"version":1,"step":3}'}}
    parsed = parse_progress(body["data"][PROGRESS_KEY])
    assert parsed is not None and parsed.step == 3
