"""An operator that starts with objects already in the cluster (a restart, an upgrade, a new leader) reconciles
them at once from its freshly listed caches, not at the next periodic resync (five minutes by default): kopf's
"resume" handlers used to do this, and kopf no longer has a handler on our objects."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lorafleet_dev.operator import OperatorProcess
from lorafleet_dev.testing import ClusterHandle
from tests.integration.operator_fixtures import Custom, condition
from tests.unit import objects


def test_objects_that_exist_before_the_operator_starts_are_reconciled_at_once(
    cluster: ClusterHandle, crds: None, private_namespace: str, tmp_path: Path
) -> None:
    ns = private_namespace
    custom = Custom(cluster, ns)
    ftj = objects.fine_tune_job(name="waiting")
    ftj["metadata"] = {"name": "waiting", "namespace": ns}
    custom.create(ftj)  # its BaseModel does not exist: the first status says so

    env = {"LORAFLEET_NAMESPACES": json.dumps([ns])}  # the default resync period: five minutes
    operator = OperatorProcess(cluster.kubeconfig, tmp_path / "operator.log", env)
    operator.start()
    try:
        started = time.monotonic()
        status = custom.wait_status(
            "FineTuneJob",
            "waiting",
            lambda s, o: (condition(s, "Ready") or {}).get("reason") == "BaseModelNotFound",
            timeout=60,
            what="the existing FineTuneJob reconciled" + f"\n{operator.log_tail(30)}",
        )
        took = time.monotonic() - started
        print(f"first status {took:.1f} s after the operator started")
        assert status["status"]["observedGeneration"] == 1
        assert took < 60
    finally:
        operator.stop()
