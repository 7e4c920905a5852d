"""The unit tier is pure and fast: no socket, no subprocess, no Go build, no cluster, no torch.

Every test here runs with network sockets refused (pytest-socket; AF_UNIX stays allowed, asyncio's event loop
needs a socketpair), with every way of starting a process refused (subprocess, os.fork/posix_spawn/exec*/system,
multiprocessing) and with torch, transformers and peft unimportable. A test that trips a guard fails with a
message naming the tier it belongs in: tests/integration (real servers and processes) or tests/trainer (the
trainer extra). tests/conftest.py also refuses the heavy fixtures (cluster, MinIO, vLLM, tiny model) here.
The whole tier must pass in under 30 s on a cold machine without Go (HOME empty).
"""

from __future__ import annotations

import _posixsubprocess
import importlib.abc
import os
import subprocess
import sys
from collections.abc import Generator, Iterator
from typing import Any

import pytest
from pytest_socket import SocketBlockedError, SocketConnectBlockedError, disable_socket, enable_socket

HEAVY_MODULES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "vllm")
WHERE = (
    "tests/unit is the pure tier (tests/unit/conftest.py): a test that needs a server, a socket or a process "
    "belongs in tests/integration, one that needs torch/transformers/peft in tests/trainer."
)


class UnitTierViolation(RuntimeError):
    """Raised where a unit test reaches for a process or a heavy module. Not an OSError or ImportError, so no
    ``except OSError`` or ``pytest.importorskip`` can swallow it."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} refused. {WHERE}")


def _refuse(what: str) -> Any:
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise UnitTierViolation(what)

    return refused


class _HeavyImportGuard(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname.partition(".")[0] in HEAVY_MODULES:
            raise UnitTierViolation(f"import {fullname}")
        return None


# Every way a process can start: subprocess (and asyncio's subprocesses, which use it), multiprocessing's spawn
# (_posixsubprocess.fork_exec), fork, posix_spawn, exec and the shell.
_PROCESS_ENTRY_POINTS: list[tuple[Any, str]] = [
    (subprocess.Popen, "_execute_child"),
    (_posixsubprocess, "fork_exec"),
    *((os, name) for name in dir(os) if name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system", "popen")),
    *((os, name) for name in dir(os) if name.startswith(("exec", "spawn"))),
]


@pytest.fixture(autouse=True)
def _pure_unit_tier(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for owner, name in _PROCESS_ENTRY_POINTS:
        label = f"{getattr(owner, '__name__', owner)}.{name}"
        monkeypatch.setattr(owner, name, _refuse(f"starting a process ({label})"))
    guard = _HeavyImportGuard()
    sys.meta_path.insert(0, guard)
    disable_socket(allow_unix_socket=True)
    try:
        yield
    finally:
        enable_socket()
        sys.meta_path.remove(guard)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """A socket refused by pytest-socket says only that; add which tier the test belongs in."""
    report = yield
    if call.excinfo is not None and call.excinfo.errisinstance((SocketBlockedError, SocketConnectBlockedError)):
        report.sections.append(("unit tier", f"a network socket was refused. {WHERE}"))
    return report
