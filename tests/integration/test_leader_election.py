"""Two operator processes with leader election on, against the real API server: only the holder of the Lease
reconciles, the standby writes nothing, the standby takes over within the lease duration (plus its retry period)
after the leader is killed with SIGKILL and reconciles what is created afterwards, a leader stopped with SIGTERM
hands the Lease back, and a leader that finds another holder in the Lease exits with code 1.

The timings are shortened (lease 4 s, renew deadline 3 s, retry 1 s) to keep the test short; the defaults are
15/10/2 s. The namespace stays outside the glob the session's integration operator watches (<prefix>-*), so the
only operators that see its objects are the two started here.
"""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client

from lorafleet_dev.operator import OperatorProcess
from lorafleet_dev.testing import ClusterHandle, wait_until
from tests.integration.operator_fixtures import (
    LEASE,
    LEASE_DURATION,
    RENEW_DEADLINE,
    RETRY_PERIOD,
    Custom,
    condition,
    election_env,
    lease_holder,
)
from tests.unit import objects

# A standby takes the Lease at its first attempt after the lease duration has passed since it last saw a renewal,
# and the leader renewed at most a retry period before it was killed.
TAKEOVER_BOUND = LEASE_DURATION + 2 * RETRY_PERIOD + 2  # + 2 s for a loaded machine's API server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Candidate:
    """One operator process with election on, named like a pod, with its own health port."""

    def __init__(self, cluster: ClusterHandle, namespace: str, name: str, log_dir: Path) -> None:
        self.name = name
        self.health_port = _free_port()
        self.metrics_port = _free_port()
        env = {
            **election_env(name, namespace),
            "LORAFLEET_NAMESPACES": json.dumps([namespace]),
            "LORAFLEET_RESYNC_SECONDS": "3",
            "LORAFLEET_HEALTH_PORT": str(self.health_port),
            "LORAFLEET_METRICS_PORT": str(self.metrics_port),
        }
        self.process = OperatorProcess(cluster.kubeconfig, log_dir / f"{name}.log", env)

    def health(self) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as response:
                return str(response.read().decode())
        except OSError:
            return None

    def leading_gauge(self) -> str | None:
        """The value of lorafleet_leader on this process's /metrics."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return None
        return next((line.split()[1] for line in text.splitlines() if line.startswith("lorafleet_leader ")), None)

    def log(self) -> str:
        return self.process.log_path.read_text(errors="replace") if self.process.log_path.exists() else ""


def fine_tune_job(namespace: str, name: str) -> dict[str, Any]:
    """A FineTuneJob whose BaseModel does not exist: the operator's first pass writes status, and nothing else."""
    ftj = objects.fine_tune_job(name=name)
    ftj["metadata"] = {"name": name, "namespace": namespace}
    return ftj


def waiting_for_base_model(status: dict[str, Any], obj: dict[str, Any]) -> bool:
    ready = condition(status, "Ready") or {}
    return ready.get("reason") == "BaseModelNotFound" and status.get("observedGeneration") == 1


def event_instances(cluster: ClusterHandle, namespace: str, name: str) -> set[str]:
    events = cluster.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
    return {e.reporting_instance for e in events.items if e.reporting_instance}


def test_only_the_leader_reconciles_and_the_standby_takes_over_when_it_is_killed(
    cluster: ClusterHandle, crds: None, private_namespace: str, tmp_path: Path
) -> None:
    ns = private_namespace
    custom = Custom(cluster, ns)
    a = Candidate(cluster, ns, "operator-a", tmp_path)
    b = Candidate(cluster, ns, "operator-b", tmp_path)
    try:
        a.process.start()
        wait_until(lambda: lease_holder(cluster, ns) == "operator-a", timeout=30, what="operator-a holding the Lease")
        b.process.start()
        wait_until(lambda: b.health() and "standby until" in b.log(), timeout=30, what="operator-b standing by")
        assert a.process.alive(), a.process.log_tail()

        # Only the leader reconciles.
        custom.create(fine_tune_job(ns, "first"))
        custom.wait_status("FineTuneJob", "first", waiting_for_base_model, timeout=30, what="first reconciled")
        time.sleep(2 * RETRY_PERIOD + 1)  # the standby keeps campaigning meanwhile
        assert lease_holder(cluster, ns) == "operator-a"
        assert b.process.alive(), b.process.log_tail()
        # The status was written by the leader: its Events name it (the standby posts none).
        assert event_instances(cluster, ns, "first") == {"operator-a"}, "only the leader handles objects"
        assert f"{ns}/first" not in b.log(), "the standby must not handle objects"
        assert "starting lorafleet operator" not in b.log(), "the standby never starts kopf"
        assert b.health() == '{"leader": false}'
        assert (a.leading_gauge(), b.leading_gauge()) == ("1.0", "0.0"), "every pod answers a scrape; one leads"

        # The leader dies without a word: the standby takes over once the lease has expired.
        a.process.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        killed = time.monotonic()
        wait_until(
            lambda: lease_holder(cluster, ns) == "operator-b", timeout=30, interval=0.1, what="operator-b leading"
        )
        takeover = time.monotonic() - killed
        print(f"takeover after SIGKILL: {takeover:.1f} s (lease {LEASE_DURATION} s, retry {RETRY_PERIOD} s)")
        assert takeover <= TAKEOVER_BOUND, f"took {takeover:.1f} s\n{b.process.log_tail()}"
        a.process.stop()

        custom.create(fine_tune_job(ns, "second"))
        custom.wait_status("FineTuneJob", "second", waiting_for_base_model, timeout=30, what="second reconciled")
        assert b.leading_gauge() == "1.0"
        assert event_instances(cluster, ns, "second") == {"operator-b"}
        created = time.monotonic()
        print(f"the new leader reconciled a new object {created - killed:.1f} s after the old one was killed")

        # A graceful stop hands the Lease back: no standby has to wait out the lease duration.
        b.process.stop()
        assert lease_holder(cluster, ns) is None, b.process.log_tail()
    finally:
        a.process.stop(kill=True)
        b.process.stop(kill=True)


def test_a_leader_that_loses_the_lease_exits_with_code_1(
    cluster: ClusterHandle, crds: None, private_namespace: str, tmp_path: Path
) -> None:
    """Another holder in the Lease (a partition healed, a clock far off): the leader cannot renew, and exits within
    its renew deadline with code 1 so the Deployment restarts it as a standby; it never keeps writing."""
    ns = private_namespace
    a = Candidate(cluster, ns, "operator-a", tmp_path)
    try:
        a.process.start()
        wait_until(lambda: lease_holder(cluster, ns) == "operator-a", timeout=30, what="operator-a holding the Lease")
        wait_until(lambda: "starting lorafleet operator" in a.log(), timeout=30, what="operator-a running kopf")
        leases = client.CoordinationV1Api(cluster.api_client)
        lease = leases.read_namespaced_lease(LEASE, ns)
        lease.spec.holder_identity = "intruder"
        lease.spec.renew_time = lease.spec.acquire_time = datetime.now(UTC)
        leases.replace_namespaced_lease(LEASE, ns, lease)
        taken = time.monotonic()
        proc = a.process.proc
        assert proc is not None
        code = wait_until(lambda: proc.poll(), timeout=RENEW_DEADLINE + 2 * RETRY_PERIOD + 5, interval=0.1,
                          what="operator-a exiting")  # fmt: skip
        lost = time.monotonic() - taken
        print(f"the leader exited {lost:.1f} s after losing the Lease (renew deadline {RENEW_DEADLINE} s)")
        assert code == 1, a.process.log_tail()
        assert "leader election lost" in a.log()
        assert lease_holder(cluster, ns) == "intruder"
    finally:
        a.process.stop(kill=True)
