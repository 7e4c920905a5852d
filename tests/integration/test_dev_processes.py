"""The local harness's shared process helpers (lorafleet_dev.cluster), used by the cluster, the node and kube-router:
a failed command names itself and its output in the caller's error type; stopping sends SIGTERM to the whole
process group, waits, escalates to SIGKILL for a group that ignores it, and reaps our own children."""

from __future__ import annotations

import subprocess
import time

import pytest

from lorafleet_dev.cluster import Proc, _start_ticks, run_command, stop_processes


class HarnessError(RuntimeError):
    pass


def test_run_command_raises_the_callers_error_with_the_output() -> None:
    assert run_command(["sh", "-c", "echo fine"]).stdout == "fine\n"
    with pytest.raises(HarnessError, match=r"sh -c echo boom >&2; exit 3 failed \(3\): boom"):
        run_command(["sh", "-c", "echo boom >&2; exit 3"], HarnessError)
    assert run_command(["sh", "-c", "exit 4"], HarnessError, check=False).returncode == 4


def spawn(script: str) -> tuple[Proc, subprocess.Popen[bytes]]:
    child = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    ticks = _start_ticks(child.pid)
    assert ticks is not None
    return Proc(name=script, pid=child.pid, start_ticks=ticks, log="", args=[]), child


def test_stop_processes_terms_then_kills_and_reaps() -> None:
    polite, polite_child = spawn("sleep 60")
    stubborn, stubborn_child = spawn("trap '' TERM; sleep 60 & wait")
    children = {polite.pid: polite_child, stubborn.pid: stubborn_child}
    logged: list[str] = []
    time.sleep(0.2)  # let the stubborn shell install its trap

    started = time.monotonic()
    stop_processes(
        [polite, stubborn],
        1.0,
        lambda p: children[p.pid].poll() is None if p.pid in children else False,
        children,
        logged.append,
    )
    assert time.monotonic() - started < 5
    assert polite_child.returncode is not None and stubborn_child.returncode is not None
    assert children == {}  # both reaped
    assert logged == [f"{stubborn.name} did not stop in 1s: SIGKILL"]
