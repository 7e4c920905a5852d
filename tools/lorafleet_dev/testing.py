"""Helpers for tests against a real API server (used by tests/integration/conftest.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client

T = TypeVar("T")


@dataclass
class ClusterHandle:
    """What the ``cluster`` fixture returns."""

    kubeconfig: Path
    api_client: client.ApiClient
    local: bool  # False with LORAFLEET_CLUSTER=external (e.g. kind): no kwok GPU nodes guaranteed

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api_client)

    @property
    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self.api_client)

    @property
    def batch(self) -> client.BatchV1Api:
        return client.BatchV1Api(self.api_client)


def wait_until(
    probe: Callable[[], T | None],
    timeout: float = 60.0,
    interval: float = 0.25,
    what: str = "condition",
) -> T:
    """Poll ``probe`` until it returns something truthy and return that; AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last value: {last!r})")


def first_listed(list_call: Callable[[], Any], timeout: float = 60.0, what: str = "an object") -> Any:
    """The first item of a Kubernetes list call (``lambda: core.list_namespaced_secret(ns, ...)``) once it lists
    one; AssertionError on timeout."""
    return wait_until(lambda: list_call().items, timeout, interval=0.5, what=what)[0]
