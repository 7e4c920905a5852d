"""Liveness fails only when the work queue stops moving: work is due or running and no reconcile has finished for
more than the stall threshold (measured from when that work began waiting, not from the last progress alone), or a
worker thread has died. An idle queue is never stalled however long it has been idle, a queue whose workers never
started (a standby replica) never is, and a finished reconcile, even a failed one, resets the clock. The "queue"
probe turns a stall into kopf.PermanentError, the one kind of failure that makes kopf's /healthz answer 500 at once.

Pure: a fake clock, and worker threads that are real but never touch a socket or a process.
"""

from __future__ import annotations

from typing import Any

import kopf
import pytest

from lorafleet.controllers.liveness import QueueSnapshot, stalled
from lorafleet.controllers.workqueue import WorkQueue

STALL = 300.0


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Thread:
    """Stands in for a worker thread: alive or not."""

    def __init__(self, alive: bool = True) -> None:
        self.alive = alive

    def is_alive(self) -> bool:
        return self.alive


def _running(queue: WorkQueue[Any], threads: int = 2) -> list[_Thread]:
    """A queue whose workers count as started (fake threads; keys are taken with run_one or _next)."""
    fakes = [_Thread() for _ in range(threads)]
    queue._threads.extend(fakes)  # type: ignore[arg-type]
    queue.last_progress = queue._clock()  # as start() does
    return fakes


def _queue(clock: _Clock, process: Any = lambda key: None) -> WorkQueue[str]:
    return WorkQueue(process, clock=clock)


def test_an_idle_queue_is_never_stalled() -> None:
    clock = _Clock()
    queue = _queue(clock)
    _running(queue)
    clock.now += 100 * STALL
    assert stalled(queue.snapshot(), STALL) is None
    queue.add("later", delay=10 * STALL)  # waiting for its time, not due: still idle
    clock.now += STALL
    assert queue.snapshot().depth == 1
    assert stalled(queue.snapshot(), STALL) is None


def test_overdue_work_with_no_progress_past_the_threshold_is_stalled() -> None:
    clock = _Clock()
    queue = _queue(clock)
    _running(queue)
    queue.add("a")
    queue.add("b")
    clock.now += STALL
    assert stalled(queue.snapshot(), STALL) is None  # not past it yet
    clock.now += 1
    reason = stalled(queue.snapshot(), STALL)
    assert reason is not None
    assert "depth 2" in reason and "overdue 2" in reason and "301 s" in reason and "LORAFLEET_STALL_SECONDS" in reason


def test_work_arriving_after_a_long_idle_spell_is_not_stalled_at_once() -> None:
    clock = _Clock()
    queue = _queue(clock)
    _running(queue)
    clock.now += 10 * STALL  # idle: the last progress is old
    queue.add("a")
    assert stalled(queue.snapshot(), STALL) is None
    assert queue._next() == "a"  # a worker took it: a reconcile that just started
    clock.now += STALL - 1
    assert stalled(queue.snapshot(), STALL) is None
    clock.now += 2
    assert stalled(queue.snapshot(), STALL) is not None  # that reconcile has hung past the threshold


def test_progress_resets_the_clock_even_a_failed_reconcile() -> None:
    clock = _Clock()

    def process(key: str) -> None:
        if key == "bad":
            raise RuntimeError("store hangs")

    queue = _queue(clock, process)
    _running(queue)
    queue.add("a")
    queue.add("bad")
    clock.now += STALL + 1
    assert stalled(queue.snapshot(), STALL) is not None
    assert queue.run_one()  # one reconcile finishes: the queue moves
    assert stalled(queue.snapshot(), STALL) is None
    assert queue.run_one()  # the failing one finishes too (an error is progress) and backs off: not due
    clock.now += STALL + 1
    assert queue.snapshot().overdue == 1  # its backoff (1 s) is over: due again, for STALL s now
    assert stalled(queue.snapshot(), STALL) is None
    clock.now += 1
    assert stalled(queue.snapshot(), STALL) is not None  # and nobody took it since
    assert queue.run_one()
    assert stalled(queue.snapshot(), STALL) is None


def test_active_but_hung_reconciles_are_stalled() -> None:
    clock = _Clock()
    queue = _queue(clock)
    _running(queue, threads=2)
    queue.add("a")
    queue.add("b")
    assert queue._next() == "a" and queue._next() == "b"  # both workers hold a key and never finish
    snapshot = queue.snapshot()
    assert (snapshot.active, snapshot.overdue, snapshot.depth) == (2, 0, 0)
    clock.now += STALL + 1
    reason = stalled(queue.snapshot(), STALL)
    assert reason is not None and "active 2" in reason


def test_one_hung_worker_is_not_a_stall_while_others_finish_reconciles() -> None:
    clock = _Clock()
    queue = _queue(clock)
    _running(queue, threads=2)
    queue.add("hung")
    assert queue._next() == "hung"
    for i in range(5):
        clock.now += STALL / 2
        queue.add(f"k{i}")
        assert queue.run_one()
        assert stalled(queue.snapshot(), STALL) is None


def test_a_dead_worker_thread_is_a_stall_at_once() -> None:
    clock = _Clock()
    queue = _queue(clock)
    threads = _running(queue, threads=3)
    assert stalled(queue.snapshot(), STALL) is None
    threads[1].alive = False
    reason = stalled(queue.snapshot(), STALL)  # idle, and no time has passed: a dead worker never comes back
    assert reason is not None and "1 of 3 worker threads have died" in reason


def test_workers_not_started_or_stopping_are_never_stalled() -> None:
    clock = _Clock()
    queue = _queue(clock)  # a standby replica: the startup handler never ran, no worker exists
    queue.add("a")
    clock.now += 100 * STALL
    assert not queue.snapshot().running
    assert stalled(queue.snapshot(), STALL) is None
    threads = _running(queue)
    queue._stopped = True  # stop() in progress: threads exiting are not dead workers
    for thread in threads:
        thread.alive = False
    assert stalled(queue.snapshot(), STALL) is None


def test_starting_the_workers_resets_the_progress_clock() -> None:
    """Time a standby spent waiting for the Lease is no stall once it leads: start() counts from now."""
    clock = _Clock()
    queue: WorkQueue[str] = WorkQueue(lambda key: None, workers=1, clock=clock)
    clock.now += 100 * STALL
    queue.start()  # a real worker thread, waiting for keys
    try:
        snapshot = queue.snapshot()
        assert snapshot.running and snapshot.workers == snapshot.workers_alive == 1
        assert snapshot.since_progress == 0
    finally:
        queue.stop()
    assert not queue.snapshot().running


def test_the_rule_on_snapshots() -> None:
    base = QueueSnapshot(
        depth=0, overdue=0, active=0, since_progress=0, oldest_waiting=0, running=True, workers=8, workers_alive=8
    )

    def with_(**changes: Any) -> QueueSnapshot:
        return QueueSnapshot(**{**base.__dict__, **changes})

    assert stalled(with_(since_progress=10**6), STALL) is None  # idle
    assert stalled(with_(overdue=1, since_progress=10**6, oldest_waiting=STALL), STALL) is None  # at, not past
    assert stalled(with_(overdue=1, since_progress=10**6, oldest_waiting=STALL + 1), STALL) is not None
    assert stalled(with_(active=8, since_progress=STALL + 1, oldest_waiting=10**6), STALL) is not None
    assert stalled(with_(active=8, since_progress=5, oldest_waiting=10**6), STALL) is None  # something finished
    assert stalled(with_(workers_alive=0), STALL) is not None
    assert stalled(with_(running=False, workers_alive=0, overdue=9, since_progress=10**6), STALL) is None


def test_the_queue_probe_raises_a_permanent_error_when_stalled(monkeypatch: pytest.MonkeyPatch) -> None:
    from lorafleet.controllers import resync

    clock = _Clock()
    queue = _queue(clock)
    _running(queue)
    monkeypatch.setattr(resync, "QUEUE", queue)
    monkeypatch.setattr(resync.SETTINGS, "stall_seconds", STALL)
    queue.add("a")
    health = resync.queue_health()
    assert health == {"depth": 1.0, "active": 0.0, "overdue": 1.0, "secondsSinceProgress": 0.0}
    clock.now += STALL + 1
    # A plain exception would be retried by kopf inside the /healthz request (ErrorsMode.TEMPORARY, 60 s):
    # only a PermanentError makes /healthz answer 500 now.
    with pytest.raises(kopf.PermanentError) as raised:
        resync.queue_health()
    message = str(raised.value)
    assert "work queue stalled" in message and "depth 1, overdue 1, active 0" in message
    assert "no reconcile finished for 301 s (limit 300 s, LORAFLEET_STALL_SECONDS)" in message
