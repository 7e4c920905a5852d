"""One work queue for every reconcile: kopf's handlers, child events, dependency events and the periodic resync
only add a key (kind, namespace, name); worker threads reconcile it.

- A key is never reconciled by two workers at once: added while it is being reconciled, it is marked dirty and
  reconciled once more afterwards (so the last change is always seen).
- Duplicates coalesce: a key already waiting is not queued twice; the earlier due time wins.
- Errors back off per key, exponentially (base * 2**(failures-1), capped), or by the error's own delay when
  it asks for more (kopf.TemporaryError's delay: 409, 429 with Retry-After); a success resets the key.
- `snapshot()` tells liveness (lorafleet.controllers.liveness) whether the queue still moves.

This is controller-runtime's workqueue in a few dozen lines (kueue, KServe and cert-manager rely on it).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from lorafleet.controllers.liveness import QueueSnapshot

K = TypeVar("K", bound=Hashable)
log = logging.getLogger("lorafleet.controllers.workqueue")


class WorkQueue(Generic[K]):
    def __init__(
        self,
        process: Callable[[K], None],
        *,
        workers: int = 8,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        name: str = "reconcile",
    ) -> None:
        self._process = process
        self._workers = workers
        self._base, self._max = base_delay, max_delay
        self._clock = clock
        self._name = name
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()
        self._due: dict[K, float] = {}  # keys waiting, and when they are due
        self._active: dict[K, float] = {}  # keys being reconciled, and when a worker took them
        self._dirty: dict[K, float] = {}  # keys added while being reconciled
        self._failures: dict[K, int] = {}
        self._threads: list[threading.Thread] = []
        self._stopped = False
        self.processed = 0  # reconciles finished (success or error), for liveness and tests
        self.last_progress = clock()

    # --- producers -------------------------------------------------------------------------------------

    def add(self, key: K, delay: float = 0.0) -> None:
        """Reconcile `key` once `delay` seconds have passed (or sooner if it is already due sooner)."""
        when = self._clock() + max(delay, 0.0)
        with self._cond:
            if key in self._active:
                self._dirty[key] = min(self._dirty.get(key, when), when)
                return
            self._schedule(key, when)

    def _schedule(self, key: K, when: float) -> None:
        current = self._due.get(key)
        if current is not None and current <= when:
            return  # coalesced
        self._due[key] = when
        heapq.heappush(self._heap, (when, next(self._seq), key))
        self._cond.notify()

    def backoff(self, failures: int) -> float:
        return float(min(self._max, self._base * 2 ** max(failures - 1, 0)))

    def __len__(self) -> int:
        with self._cond:
            return len(self._due)

    def pending(self, key: K) -> bool:
        with self._cond:
            return key in self._due or key in self._active

    def health(self) -> dict[str, float]:
        """Depth, keys overdue, and seconds since a reconcile last finished: overdue keys with no progress for
        long mean the workers are stuck (a liveness probe's truth, unlike the event loop's)."""
        s = self.snapshot()
        return {
            "depth": float(s.depth),
            "active": float(s.active),
            "overdue": float(s.overdue),
            "secondsSinceProgress": round(s.since_progress, 1),
        }

    def snapshot(self) -> QueueSnapshot:
        """The queue at this instant, for the liveness rule (lorafleet.controllers.liveness.stalled)."""
        with self._cond:
            now = self._clock()
            overdue = [when for when in self._due.values() if when <= now]
            waiting_since = min([*overdue, *self._active.values()], default=now)
            return QueueSnapshot(
                depth=len(self._due),
                overdue=len(overdue),
                active=len(self._active),
                since_progress=now - self.last_progress,
                oldest_waiting=max(now - waiting_since, 0.0),
                running=bool(self._threads) and not self._stopped,
                workers=len(self._threads),
                workers_alive=sum(1 for thread in self._threads if thread.is_alive()),
            )

    # --- workers ---------------------------------------------------------------------------------------

    def _next(self) -> K | None:
        """The next due key that no worker holds, or None once stopped."""
        with self._cond:
            while not self._stopped:
                while self._heap and self._due.get(self._heap[0][2]) != self._heap[0][0]:
                    heapq.heappop(self._heap)  # superseded by an earlier schedule, or taken
                if not self._heap:
                    self._cond.wait()
                    continue
                when, _, key = self._heap[0]
                wait = when - self._clock()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                del self._due[key]
                self._active[key] = self._clock()
                return key
            return None

    def _done(self, key: K, error: BaseException | None) -> None:
        with self._cond:
            self._active.pop(key, None)
            self.processed += 1
            self.last_progress = self._clock()
            dirty = self._dirty.pop(key, None)
            if error is not None:
                failures = self._failures.get(key, 0) + 1
                self._failures[key] = failures
                asked = getattr(error, "delay", None)
                delay = max(self.backoff(failures), float(asked) if isinstance(asked, int | float) else 0.0)
                self._schedule(key, self._clock() + delay)
                return
            self._failures.pop(key, None)
            if dirty is not None:
                self._schedule(key, dirty)

    def run_one(self) -> bool:
        """Take and reconcile one due key in this thread (tests); False when none is due."""
        with self._cond:
            due = any(self._due.get(k) == t and t <= self._clock() for t, _, k in self._heap)
        if not due:
            return False
        key = self._next()
        if key is None:
            return False
        self._run(key)
        return True

    def _run(self, key: K) -> None:
        error: BaseException | None = None
        try:
            self._process(key)
        except Exception as exc:  # one broken object must not stop the others
            error = exc
            log.warning("%s of %s failed, retrying with backoff: %s", self._name, key, exc)
        self._done(key, error)

    def _loop(self) -> None:
        while (key := self._next()) is not None:
            self._run(key)

    def start(self, runner: Callable[[Callable[[], None]], None] | None = None) -> None:
        """Start the worker threads; `runner` wraps each thread's loop (a contextvars copy, say)."""
        with self._cond:
            self._stopped = False
            self.last_progress = self._clock()  # time before the workers ran (a standby's wait) is no stall
        wrap = runner
        for i in range(self._workers):
            if wrap is None:
                thread = threading.Thread(target=self._loop, name=f"{self._name}-{i}", daemon=True)
            else:
                thread = threading.Thread(target=wrap, args=(self._loop,), name=f"{self._name}-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()
