"""The process a training run lives in: signals, its rank among the torchrun workers and the few collectives the
run needs outside the Trainer, and how many CPU threads torch may use.

Imported by the training side only (torch.distributed): the operator never imports it.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch.distributed as dist

from lorafleet.trainer.errors import Interrupted

# -- signals -------------------------------------------------------------------------------------------------------


class StopSignal:
    """SIGTERM (and SIGINT): outside the training loop it interrupts at once; inside, it asks the loop to save a
    checkpoint and stop at the end of the current optimizer step."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self.in_loop = False

    def install(self) -> None:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def uninstall(self) -> None:
        for sig, handler in getattr(self, "_previous", {}).items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.requested is None
        self.requested = signum
        if not self.in_loop and first:
            raise Interrupted(f"{signal.Signals(signum).name} before training started; nothing to checkpoint")


# -- distributed ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranks:
    rank: int
    local_rank: int
    world_size: int

    @classmethod
    def from_environment(cls) -> Ranks:
        env = os.environ
        return cls(int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env.get("WORLD_SIZE", "1")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's value on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def local_main_first(ranks: Ranks) -> Iterator[None]:
    """The node's first process runs the block first (downloads), the others after it (and find the files)."""
    if not ranks.is_local_main:
        barrier()
    try:
        yield
    finally:
        if ranks.is_local_main:
            barrier()


# -- CPU threads ---------------------------------------------------------------------------------------------------


def cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs this container may use by its cgroup quota (v2 cpu.max or v1 cfs quota), None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def cpu_threads() -> int:
    """Threads for torch on CPU: the CPUs we may run on, capped by the cgroup quota. torch's default counts the
    node's cores, and more threads than the quota allows stall each other at every parallel region."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota()
    return max(1, min(available, int(quota) if quota else available))
