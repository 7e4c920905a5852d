"""Running lorafleet against a cluster from a development machine: install the CRDs, run the operator as a
subprocess exactly as in its container. Used by the integration tests and `lorafleet-dev demo`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import yaml
from kubernetes import client

from lorafleet_dev.paths import CRDS
from lorafleet_dev.testing import ClusterHandle, wait_until


def install_crds(cluster: ClusterHandle, crds: Path = CRDS) -> None:
    """Server-side apply crds/*.yaml (or another folder's: a benchmark of an older commit) and wait until the API
    server serves them."""
    ext = client.ApiextensionsV1Api(cluster.api_client)
    for path in sorted(crds.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        ext.patch_custom_resource_definition(
            crd["metadata"]["name"],
            crd,
            field_manager="lorafleet-tests",
            force=True,
            _content_type="application/apply-patch+yaml",
        )

    def established() -> bool:
        for path in crds.glob("*.yaml"):
            name = yaml.safe_load(path.read_text())["metadata"]["name"]
            status = ext.read_custom_resource_definition(name).status
            conditions = (status.conditions if status else None) or []
            if not any(c.type == "Established" and c.status == "True" for c in conditions):
                return False
        return True

    wait_until(established, timeout=30, what="CRDs Established")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OperatorProcess:
    """The operator as a subprocess, with its log kept for failure reports."""

    # Every log an operator of this process started writes to: the tests scan them for credentials at the end.
    started_logs: ClassVar[list[Path]] = []

    def __init__(self, kubeconfig: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        """`env` adds LORAFLEET_* settings (see lorafleet.config) to the defaults below."""
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "LORAFLEET_LOG_FORMAT": "text",
            "LORAFLEET_METRICS_PORT": str(_free_port()),
            "LORAFLEET_HEALTH_PORT": str(_free_port()),
            **self.extra_env,
        }
        log = self.log_path.open("ab")
        if self.log_path not in OperatorProcess.started_logs:
            OperatorProcess.started_logs.append(self.log_path)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lorafleet.cli", "operator"], env=env, stdout=log, stderr=subprocess.STDOUT
        )

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])
