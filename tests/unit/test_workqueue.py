"""One reconcile at a time per object: every trigger adds a key to one queue; duplicates coalesce, a key added while
it is being reconciled runs once more afterwards (never twice at once), errors back off per key; the resync skips
finished FineTuneJobs."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

import kopf

from lorafleet.controllers.workqueue import WorkQueue


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_duplicates_coalesce_and_the_earliest_due_time_wins() -> None:
    seen: list[str] = []
    clock = _Clock()
    queue: WorkQueue[str] = WorkQueue(seen.append, clock=clock)
    queue.add("a", delay=10)
    queue.add("a")
    queue.add("a", delay=5)
    queue.add("b")
    assert len(queue) == 2
    while queue.run_one():
        pass
    assert seen == ["a", "b"]
    assert not queue.run_one()


def test_a_key_added_while_reconciled_runs_again_after_never_concurrently() -> None:
    running = threading.Event()
    release = threading.Event()
    active: list[str] = []
    overlaps: list[str] = []
    calls: list[str] = []

    def process(key: str) -> None:
        if key in active:
            overlaps.append(key)
        active.append(key)
        calls.append(key)
        if len(calls) == 1:
            running.set()
            release.wait(5)
        active.remove(key)

    queue: WorkQueue[str] = WorkQueue(process, workers=4)
    queue.start()
    try:
        queue.add("x")
        assert running.wait(5)
        for _ in range(5):
            queue.add("x")  # while x is being reconciled: marked dirty, not started on another worker
        time.sleep(0.1)
        assert calls == ["x"]
        release.set()
        deadline = time.monotonic() + 5
        while (len(calls) < 2 or queue.pending("x")) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        queue.stop()
    assert calls == ["x", "x"]  # the five adds coalesced into one more pass
    assert overlaps == []


def test_errors_back_off_per_key_and_a_success_resets() -> None:
    clock = _Clock()
    failing = {"bad"}
    calls: list[str] = []

    def process(key: str) -> None:
        calls.append(key)
        if key in failing:
            raise RuntimeError("store hangs")

    queue: WorkQueue[str] = WorkQueue(process, base_delay=1, max_delay=8, clock=clock)
    delays = []
    queue.add("bad")
    for _ in range(5):
        assert queue.run_one()
        due = queue._due["bad"]
        delays.append(due - clock.now)
        assert not queue.run_one()  # not due yet: other keys are not held up
        queue.add("good")
        assert queue.run_one() and calls[-1] == "good"
        clock.now = due
    assert delays == [1, 2, 4, 8, 8]
    failing.clear()
    assert queue.run_one()
    assert "bad" not in queue._failures


def test_health_shows_overdue_keys_and_time_since_progress() -> None:
    clock = _Clock()
    queue: WorkQueue[str] = WorkQueue(lambda key: None, clock=clock)
    queue.add("a")
    queue.add("b", delay=60)
    clock.now += 30
    assert queue.health() == {"depth": 2.0, "active": 0.0, "overdue": 1.0, "secondsSinceProgress": 30.0}
    assert queue.run_one()
    assert queue.health()["secondsSinceProgress"] == 0.0


def test_a_retry_waits_at_least_as_long_as_the_error_asks() -> None:
    clock = _Clock()

    def process(key: str) -> None:
        raise kopf.TemporaryError("throttled", delay=30)

    queue: WorkQueue[str] = WorkQueue(process, base_delay=1, clock=clock)
    queue.add("k")
    assert queue.run_one()
    assert queue._due["k"] - clock.now == 30


def test_resync_skips_finished_fine_tune_jobs_only() -> None:
    from lorafleet.controllers.resync import finished

    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

    def ftj(phase: str, observed: int, generation: int = 1, **status: Any) -> dict:
        return {
            "kind": "FineTuneJob",
            "metadata": {"generation": generation},
            "status": {"phase": phase, "observedGeneration": observed, **status},
        }

    stored = {"uri": "s3://b/a/v1", "digest": "sha256:" + "a" * 64, "sizeBytes": 1}
    assert finished(ftj("Failed", 1), now)
    assert finished(ftj("Succeeded", 1, artifact=stored), now)
    # Succeeded without its artifact yet: a later pass may still record it, for an hour after completion.
    assert not finished(ftj("Succeeded", 1, completionTime="2026-12-01T11:30:00Z"), now)
    assert finished(ftj("Succeeded", 1, completionTime="2026-12-01T10:30:00Z"), now)
    assert not finished(ftj("Running", 1), now)
    assert not finished(ftj("Failed", 1, generation=2), now)  # its final status is not written for this spec yet
    assert not finished({"kind": "AdapterDeployment", "metadata": {}, "status": {"phase": "Failed"}}, now)
