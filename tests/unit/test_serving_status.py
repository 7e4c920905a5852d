"""Aggregation of the pods' /lorafleet/state answers into per-adapter status, and its use by the operator."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from lorafleet.serving.status import aggregate
from tests.unit.objects import adapterdeployment_status

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def pod(name: str, *adapters: dict[str, Any], healthy: bool = True) -> dict[str, Any]:
    return {"pod": name, "engine": {"healthy": healthy}, "adapters": list(adapters)}


def entry(
    name: str, state: str, reason: str | None = None, message: str | None = None, digest: str | None = D1
) -> dict[str, Any]:
    e = {"name": name, "state": state, "reason": reason or state, "message": message or f"{name} {state}"}
    if digest:
        e["digest"] = digest
    return e


def test_loaded_everywhere_is_loaded() -> None:
    result = aggregate([pod("p0", entry("a", "Loaded")), pod("p1", entry("a", "Loaded"))])
    assert result == {
        "a": {"loadedReplicas": 2, "state": "Loaded", "reason": "Loaded", "message": "loaded on 2/2 replicas"}
    }


def test_loaded_on_some_replicas_is_loading() -> None:
    result = aggregate([pod("p0", entry("a", "Loaded")), pod("p1", entry("a", "Loading", "Downloading"))])
    assert result["a"]["state"] == "Loading"
    assert result["a"]["loadedReplicas"] == 1
    assert result["a"]["reason"] == "Downloading"
    assert "1/2 replicas" in result["a"]["message"]


def test_a_failure_on_any_replica_is_failed_with_its_reason() -> None:
    result = aggregate(
        [
            pod("p0", entry("a", "Loaded"), entry("b", "Failed", "RankExceedsMax", "rank 32 > 16")),
            pod(
                "p1",
                entry("a", "Failed", "LoadFailed", "out of memory"),
                entry("b", "Failed", "RankExceedsMax", "rank 32 > 16"),
            ),
        ]
    )
    assert result["a"]["state"] == "Failed" and result["a"]["reason"] == "LoadFailed"
    assert result["a"]["loadedReplicas"] == 1
    assert "1/2 replicas" in result["a"]["message"] and "p1: out of memory" in result["a"]["message"]
    assert result["b"] == {
        "loadedReplicas": 0,
        "state": "Failed",
        "reason": "RankExceedsMax",
        "message": "failed on every replica (0/2 replicas loaded); p0: rank 32 > 16",
    }


def test_the_most_common_failure_reason_wins() -> None:
    result = aggregate(
        [
            pod("p0", entry("a", "Failed", "LoadFailed")),
            pod("p1", entry("a", "Failed", "ChecksumMismatch")),
            pod("p2", entry("a", "Failed", "ChecksumMismatch")),
        ]
    )
    assert result["a"]["reason"] == "ChecksumMismatch"
    assert "p1:" in result["a"]["message"]


def test_pending_everywhere_is_pending() -> None:
    result = aggregate([pod("p0", entry("a", "Pending", "WaitingForEngine", "vLLM is starting"))])
    assert result["a"] == {
        "loadedReplicas": 0,
        "state": "Pending",
        "reason": "WaitingForEngine",
        "message": "loaded on 0/1 replicas; vLLM is starting",
    }


def test_a_replica_that_has_not_seen_the_adapter_holds_it_below_loaded() -> None:
    result = aggregate([pod("p0", entry("a", "Loaded")), pod("p1")])
    assert result["a"]["state"] == "Loading" and result["a"]["loadedReplicas"] == 1
    assert "p1 has not seen the adapter yet" in result["a"]["message"]


def test_an_unreachable_replica_counts_as_not_loaded() -> None:
    result = aggregate([pod("p0", entry("a", "Loaded")), {"pod": "p1", "error": "connection refused"}])
    assert result["a"]["state"] == "Loading"
    assert result["a"]["reason"] == "ReplicaUnreachable"
    assert "p1 could not be asked: connection refused" in result["a"]["message"]


def test_loaded_on_a_replica_whose_engine_is_down_does_not_count() -> None:
    result = aggregate([pod("p0", entry("a", "Loaded"), healthy=False)])
    assert result["a"]["state"] == "Pending" and result["a"]["loadedReplicas"] == 0


def test_an_old_version_is_not_the_expected_one() -> None:
    result = aggregate(
        [pod("p0", entry("a", "Loaded", digest=D2)), pod("p1", entry("a", "Loaded", digest=D1))], {"a": D2}
    )
    assert result["a"]["state"] == "Loading" and result["a"]["loadedReplicas"] == 1
    assert result["a"]["reason"] == "OldVersion"
    assert aggregate([pod("p0", entry("a", "Loaded", digest=D2))], {"a": None})["a"]["state"] == "Loaded"


def test_expected_adapters_no_pod_reports_are_pending() -> None:
    assert aggregate([pod("p0")], {"a": D1})["a"]["state"] == "Pending"
    assert aggregate([], {"a": D1})["a"] == {
        "loadedReplicas": 0,
        "state": "Pending",
        "reason": "NoReplicas",
        "message": "no replica has reported yet",
    }


def test_garbage_is_tolerated() -> None:
    states: list[Any] = [
        {"pod": "p0", "adapters": [{"name": "a", "state": "Exploded"}, {"state": "Loaded"}, "junk", {"name": ""}]},
        "not a dict",
        {"pod": "p2", "adapters": "nope"},
    ]
    result = aggregate(states)
    assert set(result) == {"a"}
    assert result["a"]["state"] == "Pending" and result["a"]["loadedReplicas"] == 0


def test_messages_are_clipped() -> None:
    result = aggregate([pod("p0", entry("a", "Failed", "LoadFailed", "x" * 5000))])
    assert len(result["a"]["message"]) <= 1024


def test_the_operator_status_consumes_the_aggregate() -> None:
    ad = {
        "metadata": {"name": "fleet", "namespace": "ns", "generation": 1},
        "spec": {
            "baseModelRef": {"name": "tiny"},
            "replicas": 2,
            "adapters": [
                {"name": "a", "artifact": {"uri": "s3://bkt/a/v1", "digest": D1}},
                {"name": "b", "artifact": {"uri": "s3://bkt/b/v1"}},
            ],
        },
    }
    base = {"metadata": {"name": "tiny"}, "spec": {"source": {"uri": "s3://models/tiny"}}, "status": {"phase": "Ready"}}
    deployment = {
        "status": {
            "replicas": 2,
            "readyReplicas": 2,
            "conditions": [
                {"type": "Available", "status": "True"},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"},
            ],
        }
    }
    now = datetime(2026, 1, 1, tzinfo=UTC)

    reports = aggregate(
        [pod("p0", entry("a", "Loaded"), entry("b", "Loaded")), pod("p1", entry("a", "Loaded"), entry("b", "Loaded"))],
        {"a": D1, "b": None},
    )
    status = adapterdeployment_status(
        ad,
        base_model=base,
        fine_tune_jobs={},
        deployment=deployment,
        service_host="fleet.ns.svc",
        adapter_reports=reports,
        now=now,
    )
    assert status["phase"] == "Ready" and status["adaptersReady"] == "2/2"
    assert [a["loadedReplicas"] for a in status["adapters"]] == [2, 2]

    reports = aggregate(
        [
            pod("p0", entry("a", "Loaded"), entry("b", "Failed", "RankExceedsMax", "rank 32 > 16")),
            pod("p1", entry("a", "Loaded"), entry("b", "Failed", "RankExceedsMax", "rank 32 > 16")),
        ],
        {"a": D1, "b": None},
    )
    status = adapterdeployment_status(
        ad,
        base_model=base,
        fine_tune_jobs={},
        deployment=deployment,
        service_host="fleet.ns.svc",
        adapter_reports=reports,
        now=now,
    )
    assert status["phase"] == "Degraded"
    b = status["adapters"][1]
    assert b["state"] == "Failed" and b["reason"] == "RankExceedsMax" and "rank 32 > 16" in b["message"]
