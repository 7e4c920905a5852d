"""Progress: one line per logging step (JSON when not on a terminal, a progress bar on one), and the job's
progress ConfigMap (lorafleet.contracts.trainer.TrainerProgress under PROGRESS_KEY) that the operator shows as
status.progress. Free of torch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

from lorafleet.contracts.trainer import PROGRESS_CONFIG_MAP_ENV, PROGRESS_KEY, TrainerProgress

SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
FIELD_MANAGER = "lorafleet-trainer"

log = logging.getLogger("lorafleet.trainer")


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    return value


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def config_map_patch(progress: dict[str, Any]) -> dict[str, Any]:
    """The merge patch of the progress ConfigMap: its one data key (any other key the patch would keep)."""
    return {"data": {PROGRESS_KEY: json.dumps(progress, separators=(",", ":"))}}


class ProgressPublisher:
    """Best-effort PATCH of the job's progress ConfigMap from a background thread: only the newest value is sent,
    a slow or failing API server never slows training, and a refusal (no RBAC, no ConfigMap) stops the attempts."""

    def __init__(self, patch: Callable[[dict[str, Any]], None], *, timeout: float = 5.0) -> None:
        self._patch = patch
        self._timeout = timeout
        self._latest: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self.sent = 0
        self.disabled: str | None = None
        self._thread = threading.Thread(target=self._run, name="progress-publisher", daemon=True)
        self._thread.start()

    @classmethod
    def from_environment(cls) -> ProgressPublisher | None:
        """A publisher to the ConfigMap PROGRESS_CONFIG_MAP_ENV names in POD_NAMESPACE with the in-cluster service
        account, when all exist (the account's Role lets it patch that ConfigMap only)."""
        name, namespace = os.environ.get(PROGRESS_CONFIG_MAP_ENV), os.environ.get("POD_NAMESPACE")
        in_cluster = os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(SERVICE_ACCOUNT_TOKEN)
        if not (name and namespace and in_cluster):
            return None
        try:
            from kubernetes import client, config

            config.load_incluster_config()  # type: ignore[no-untyped-call]
            core = client.CoreV1Api()
        except Exception as e:  # no kubernetes client, bad service account files
            log.warning("progress reports disabled: %s", e)
            return None

        def patch(progress: dict[str, Any]) -> None:
            body = config_map_patch(progress)
            core.patch_namespaced_config_map(name, namespace, body, field_manager=FIELD_MANAGER, _request_timeout=5)

        return cls(patch)

    def post(self, progress: dict[str, Any]) -> None:
        with self._lock:
            self._latest = dict(progress)
        self._wake.set()

    def close(self, timeout: float = 3.0) -> None:
        """Send the last value (waiting at most timeout seconds) and stop."""
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                latest, self._latest = self._latest, None
            if latest is not None and self.disabled is None:
                try:
                    self._patch(latest)
                    self.sent += 1
                except Exception as e:
                    status = getattr(e, "status", None)
                    if status in (401, 403, 404):
                        self.disabled = f"HTTP {status}"
                        log.warning("progress reports disabled: the API server answered %s", status)
                    else:
                        log.debug("progress not written: %s", e)
            if self._stopped:
                return


class ProgressReporter:
    """Log lines for people and machines. On a terminal: a progress bar redrawn in place and short event lines.
    Elsewhere: one JSON object per line ({"time", "level", "event", ...})."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        tty: bool | None = None,
        publisher: ProgressPublisher | None = None,
        clock: Callable[[], float] = time.monotonic,
        enabled: bool = True,
    ) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.publisher = publisher
        self.clock = clock
        self.enabled = enabled
        self._start: float | None = None
        self._start_step = 0
        self._last_time: float | None = None
        self._last_tokens: int | None = None
        self._bar_open = False
        self.last: dict[str, Any] = {}

    def event(self, event: str, level: str = "info", **fields: Any) -> None:
        if not self.enabled:
            return
        clean = {k: _clean(v) for k, v in fields.items() if v is not None}
        if self.tty:
            self._end_bar()
            details = " ".join(f"{k}={v}" for k, v in clean.items())
            self.stream.write(f"[{event}] {details}\n" if level == "info" else f"[{event}] {level}: {details}\n")
        else:
            record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "level": level, "event": event}
            self.stream.write(json.dumps({**record, **clean}, separators=(",", ":")) + "\n")
        self.stream.flush()

    def start(self, step: int) -> None:
        """Training (re)starts at this optimizer step: rates and ETA count from here."""
        self._start = self._last_time = self.clock()
        self._start_step = step
        self._last_tokens = None

    def progress(
        self,
        *,
        step: int,
        total_steps: int,
        epoch: float | None,
        loss: float | None,
        learning_rate: float | None = None,
        tokens_seen: int | None = None,
        grad_norm: float | None = None,
    ) -> dict[str, Any]:
        """Report one logging step; returns the progress it publishes."""
        now = self.clock()
        if self._start is None:
            self.start(step)
        assert self._start is not None
        tokens_per_second = None
        if tokens_seen is not None and self._last_tokens is not None and self._last_time is not None:
            elapsed = now - self._last_time
            if elapsed > 0:
                tokens_per_second = (tokens_seen - self._last_tokens) / elapsed
        self._last_tokens, self._last_time = tokens_seen, now
        done = step - self._start_step
        eta = (now - self._start) / done * (total_steps - step) if done > 0 and total_steps >= step else None
        published = TrainerProgress(
            step=step,
            total_steps=total_steps,
            epoch=_clean(epoch),
            loss=_clean(loss),
            tokens_per_second=_clean(tokens_per_second),
        ).wire()
        self.last = published
        if self.publisher is not None:
            self.publisher.post(published)
        if not self.enabled:
            return published
        if self.tty:
            width = 24
            filled = int(width * step / total_steps) if total_steps else 0
            bar = "#" * filled + "." * (width - filled)
            parts = [f"[{bar}] {step}/{total_steps}"]
            if loss is not None:
                parts.append(f"loss {loss:.4f}")
            if learning_rate is not None:
                parts.append(f"lr {learning_rate:.2e}")
            if tokens_per_second is not None:
                parts.append(f"{tokens_per_second:,.0f} tok/s")
            if eta is not None:
                parts.append(f"ETA {_duration(eta)}")
            self.stream.write("\r" + "  ".join(parts) + "\033[K")
            self._bar_open = True
            self.stream.flush()
        else:
            self.event(
                "progress",
                **{k: v for k, v in published.items() if k != "version"},
                learningRate=learning_rate,
                gradNorm=grad_norm,
                tokensSeen=tokens_seen,
                etaSeconds=round(eta, 1) if eta is not None else None,
            )
        return published

    def close(self) -> None:
        self._end_bar()
        if self.publisher is not None:
            self.publisher.close()

    def _end_bar(self) -> None:
        if self._bar_open:
            self.stream.write("\n")
            self._bar_open = False
