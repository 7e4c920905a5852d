"""When the work queue counts as stalled, so that /healthz fails and Kubernetes restarts the operator.

The rule (`stalled`) is pure: it reads a `QueueSnapshot` taken by `WorkQueue.snapshot()` under the queue's lock.

* Workers not running (never started: a standby replica, or kopf before its startup handler; or stopping):
  never stalled. Nothing is supposed to move, and a standby must stay live.
* A worker thread that has died: stalled at once. `WorkQueue._run` catches every Exception, so only a
  BaseException escaping a reconcile ends a worker, and nothing starts it again.
* Idle (no key overdue, none being reconciled): never stalled, however long since the last reconcile finished.
* Otherwise stalled when no reconcile has finished for more than `stall_after` seconds AND the oldest waiting work
  (an overdue key since it fell due, a running reconcile since a worker took it) has waited that long too: a key
  added after an hour of idleness is not stalled at once, though the last progress is an hour old.

A reconcile finishing with an error is progress (the queue moves; the key backs off). A key waiting for its
backoff is not due, so it never counts. One hung worker while the others keep finishing reconciles is not a
stall: the queue still moves (the resync queues every unfinished object each period, so a busy cluster always has
work that finishes).

The default `stall_after` (300 s, LORAFLEET_STALL_SECONDS) is far above the longest legitimate reconcile: a store
check gives up after 2 attempts of connect 3 s + read 10 s (lorafleet.controllers.artifacts), a pod's state call
after 2 s (5 s for all pods), and a reconcile makes a handful of such calls and API requests.

How /healthz fails (kopf 1.45, kopf/_core/engines/probing.py and activities.py): kopf's /healthz runs every
@kopf.on.probe handler as an activity (`run_activity`) and answers their results as JSON with 200. It has no
status code of its own to set: it fails only when `run_activity` raises, which it does (activities.py:142-146,
ActivityError) once a handler has failed for good; the exception escapes aiohttp's request handler, which answers
500. A handler raising a plain exception is not failed for good: activities default to ErrorsMode.TEMPORARY, so
kopf retries it inside the same request after `settings.execution.default_backoff` (60 s), holding the probing lock
(activities.py:127-137, execution.py:337-343): /healthz would hang instead of failing. `kopf.PermanentError` ends
the handler at once (execution.py:303-305), so the "queue" probe raises that. A successful answer is cached for
10 s (probing.py:38, 49-64) and a failure is not (the timestamp is set only after success), so a stall shows within
10 s of the rule firing and recovery shows at the next probe.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QueueSnapshot:
    """The work queue at one instant, as far as liveness is concerned."""

    depth: int  # keys waiting (due or not)
    overdue: int  # keys due that no worker has taken
    active: int  # keys being reconciled
    since_progress: float  # seconds since a reconcile last finished (or since the workers started)
    oldest_waiting: float  # seconds the longest-waiting overdue key or running reconcile has waited; 0 if none
    running: bool  # workers started and not stopping
    workers: int  # worker threads started
    workers_alive: int


def stalled(snapshot: QueueSnapshot, stall_after: float) -> str | None:
    """Why the queue is stalled, or None when it is not (see the module docstring for the rule)."""
    s = snapshot
    if not s.running:
        return None
    if s.workers_alive < s.workers:
        dead = s.workers - s.workers_alive
        return (
            f"work queue stalled: {dead} of {s.workers} worker threads have died "
            f"(depth {s.depth}, overdue {s.overdue}, active {s.active})"
        )
    if s.overdue == 0 and s.active == 0:
        return None
    stuck_for = min(s.since_progress, s.oldest_waiting)
    if stuck_for <= stall_after:
        return None
    return (
        f"work queue stalled: no reconcile finished for {s.since_progress:.0f} s (limit {stall_after:g} s, "
        f"LORAFLEET_STALL_SECONDS) with depth {s.depth}, overdue {s.overdue}, active {s.active}; "
        f"the oldest work has waited {s.oldest_waiting:.0f} s"
    )
