"""Kubernetes Events, posted off the reconcile path at a bounded rate.

A reconcile hands its Events to EVENTS and goes on: the Events are informational (the status carries the truth),
so they must not hold a work-queue thread on the API server, nor compete with the writes that do the work when a
burst of objects arrives (each new object posts at least one). One thread posts them in order, at most
`rate` a second after a `burst`; when more than `capacity` wait, the newest are dropped and counted, as client-go's
event broadcaster does, so a storm cannot grow the operator's memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter

Obj = dict[str, Any]
log = logging.getLogger("lorafleet.controllers")

EVENTS_DROPPED = Counter(
    "lorafleet_events_dropped_total", "Events not posted because too many were waiting (the status has the truth)."
)


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up (pure but for the clock it is given)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens = float(burst)
        self._at = clock()

    def wait_time(self) -> float:
        """Seconds until a token is free (0: take it now, and it is taken)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate


class EventSink:
    """A bounded FIFO of Events and the one thread that posts them with `post` (started on the first Event)."""

    def __init__(self, post: Callable[[Obj], None], rate: float, burst: int, capacity: int) -> None:
        self._post = post
        self._bucket = TokenBucket(rate, burst)
        self._capacity = capacity
        self._queue: deque[Obj] = deque()
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self._busy = False

    def submit(self, event: Obj) -> bool:
        """Queue the Event; False (counted) when `capacity` are already waiting."""
        with self._ready:
            if len(self._queue) >= self._capacity:
                EVENTS_DROPPED.inc()
                log.warning("event %s for %s dropped: %d waiting", event.get("reason"), _about(event), self._capacity)
                return False
            self._queue.append(event)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lorafleet-events", daemon=True)
                self._thread.start()
            self._ready.notify()
        return True

    def waiting(self) -> int:
        with self._ready:
            return len(self._queue)

    def flush(self, timeout: float) -> bool:
        """Wait until every queued Event was posted (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._ready:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._ready.wait(min(left, 0.05))
        return True

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    self._ready.wait()
                self._busy = True
            delay = self._bucket.wait_time()
            while delay > 0:
                time.sleep(delay)
                delay = self._bucket.wait_time()
            with self._ready:
                event = self._queue.popleft()
            try:
                self._post(event)
            except Exception:  # the poster logs what it can; this thread must outlive any one Event
                log.warning("could not post event for %s", _about(event), exc_info=True)
            finally:
                with self._ready:
                    self._busy = False
                    self._ready.notify_all()


def _about(event: Obj) -> str:
    involved = event.get("involvedObject") or {}
    return f"{involved.get('kind')} {involved.get('namespace')}/{involved.get('name')}"
