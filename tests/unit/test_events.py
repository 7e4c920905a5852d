"""Events leave the reconcile path: submitting one never waits on the API server; they are posted in order, one
thread, at most `rate` a second after `burst`; beyond `capacity` waiting the newest are dropped and counted; a
poster that fails does not stop the ones after it."""

from __future__ import annotations

import threading
import time

from lorafleet.controllers.events import EVENTS_DROPPED, EventSink, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def event(i: int) -> dict[str, object]:
    return {"reason": f"R{i}", "involvedObject": {"kind": "FineTuneJob", "namespace": "ns", "name": f"o{i}"}}


def test_the_bucket_allows_a_burst_then_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=3, clock=clock)
    assert [bucket.wait_time() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert abs(bucket.wait_time() - 0.1) < 1e-9  # empty: the next token in 1/rate
    clock.t += 0.11
    assert bucket.wait_time() == 0.0
    clock.t += 60  # saved up no more than the burst
    assert [bucket.wait_time() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.wait_time() > 0


def test_events_are_posted_in_order_by_one_thread_without_blocking_the_submitter() -> None:
    posted: list[str] = []
    threads: set[str] = set()
    gate = threading.Event()

    def post(e: dict[str, object]) -> None:
        gate.wait(5)  # an API server that takes its time
        threads.add(threading.current_thread().name)
        posted.append(str(e["reason"]))

    sink = EventSink(post, rate=1000, burst=1000, capacity=100)
    started = time.monotonic()
    for i in range(20):
        assert sink.submit(event(i))
    assert time.monotonic() - started < 1.0, "submit waited for the poster"
    gate.set()
    assert sink.flush(5)
    assert posted == [f"R{i}" for i in range(20)]
    assert threads == {"lorafleet-events"}


def test_the_rate_holds_after_the_burst() -> None:
    posted: list[float] = []
    sink = EventSink(lambda e: posted.append(time.monotonic()), rate=20, burst=5, capacity=100)
    started = time.monotonic()
    for i in range(15):
        sink.submit(event(i))
    assert sink.flush(10)
    took = posted[-1] - started
    # 5 at once, then 10 at 20 a second: about 0.5 s (not all at once, and not serialised far beyond the rate)
    assert 0.4 <= took < 3.0, took


def test_beyond_capacity_the_newest_are_dropped_and_counted() -> None:
    gate = threading.Event()
    posted: list[str] = []

    def post(e: dict[str, object]) -> None:
        gate.wait(5)
        posted.append(str(e["reason"]))

    sink = EventSink(post, rate=1000, burst=1000, capacity=3)
    before = EVENTS_DROPPED._value.get()
    accepted = [sink.submit(event(i)) for i in range(8)]
    # the first is being posted (out of the queue) or still waiting: at most capacity + 1 accepted
    assert accepted[:3] == [True, True, True] and accepted[-1] is False
    dropped = accepted.count(False)
    assert EVENTS_DROPPED._value.get() - before == dropped
    gate.set()
    assert sink.flush(5)
    assert posted == [f"R{i}" for i, ok in enumerate(accepted) if ok]


def test_a_failing_post_does_not_stop_the_next() -> None:
    posted: list[str] = []

    def post(e: dict[str, object]) -> None:
        if e["reason"] == "R1":
            raise RuntimeError("boom")
        posted.append(str(e["reason"]))

    sink = EventSink(post, rate=1000, burst=1000, capacity=10)
    for i in range(3):
        sink.submit(event(i))
    assert sink.flush(5)
    assert posted == ["R0", "R2"]
