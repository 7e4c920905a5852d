"""A FineTuneJob with quality bars ends as the operator judges the evaluation in the adapter's manifest (real API
server, controller-manager, kwok nodes, MinIO): every bar reached is Succeeded, a missed bar Failed
BelowQualityBar and no evaluation Failed NotEvaluated, the adapter recorded and left in the store either way; the
status carries the metrics, the Score column and (-o wide) the GPU-seconds and cost priced from the operator's
settings. kwok pods run no trainer: the test publishes what the trainer would, before the Job can exist."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lorafleet.resources.usage import as_datetime, format_cost
from lorafleet.storage import ArtifactStore, VersionFolder
from lorafleet_dev.build import Builder
from lorafleet_dev.kwok import GPU_PRODUCT
from lorafleet_dev.s3server import S3Server
from lorafleet_dev.testing import ClusterHandle
from tests.integration.operator_fixtures import ADAPTER_ROOT, MODEL_URI, PRICING, Custom, OperatorProcess, condition
from tests.unit import objects

Obj = dict[str, Any]
EVALUATION = {"metrics": ["rougeL", "exactMatch"], "require": [{"metric": "rougeL", "minScore": 0.5}]}


def _result(rouge_adapter: float) -> Obj:
    return {
        "version": 1,
        "examples": 20,
        "metrics": {
            "rougeL": {"base": 0.2, "adapter": rouge_adapter, "examples": 20},
            "exactMatch": {"base": 0.0, "adapter": 0.25, "examples": 20},
        },
        "predictionsFile": "evaluation/predictions.jsonl",
    }


def _objects(namespace: str) -> tuple[Obj, Obj]:
    bm = copy.deepcopy(objects.base_model())
    bm["metadata"] = {"name": "tiny-llama", "namespace": namespace}
    bm["spec"]["source"] = {"uri": MODEL_URI}
    ftj = copy.deepcopy(objects.fine_tune_job())
    ftj["metadata"] = {"name": "support", "namespace": namespace}
    ftj["spec"]["output"]["adapterName"] = namespace
    ftj["spec"]["evaluation"] = EVALUATION
    ftj["spec"]["resources"] = {
        "gpusPerNode": 1,
        "cpu": 1,
        "memory": "1Gi",
        "nodeSelector": {"nvidia.com/gpu.product": GPU_PRODUCT},
        "podAnnotations": {"lorafleet.io/kwok-duration": "3s"},
    }
    return bm, ftj


def _train(
    cluster: ClusterHandle, namespace: str, s3_server: S3Server, tmp_path: Path, evaluation: Obj | None
) -> tuple[Obj, str, str]:
    """Create the FineTuneJob (it waits for its BaseModel), publish its adapter as the trainer would (lineage
    naming its UID, the evaluation in the manifest), then create the BaseModel: the Job runs and completes.
    Returns the finished FineTuneJob, the version folder and its digest."""
    custom = Custom(cluster, namespace)
    bm, ftj = _objects(namespace)
    uid = custom.create(ftj)["metadata"]["uid"]
    folder = VersionFolder.parse(f"{ADAPTER_ROOT}/{namespace}/adapters/{namespace}/v1")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\1" * 64)
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "predictions.jsonl").write_text('{"prompt": "1+1", "reference": "2"}\n')
    pushed = ArtifactStore(s3_server.store_settings()).push(
        tmp_path,
        folder,
        kind="adapter",
        name=namespace,
        version="v1",
        hyperparameters={"job": {"namespace": namespace, "name": "support", "uid": uid}},
        evaluation=evaluation,
    )
    custom.create(bm)
    done = custom.wait_status(
        "FineTuneJob",
        "support",
        lambda s, o: s.get("phase") in ("Succeeded", "Failed") and s.get("observedGeneration") == 1,
        timeout=90,
        what="FineTuneJob finished",
    )
    return done, folder.uri, str(pushed.digest)


def test_reached_bars_succeed_with_the_metrics_the_score_column_and_the_cost(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, s3_server: S3Server, tmp_path: Path
) -> None:
    done, uri, digest = _train(cluster, namespace, s3_server, tmp_path, _result(0.8))
    status = done["status"]
    assert status["phase"] == "Succeeded", status
    assert status["artifact"]["uri"] == uri and status["artifact"]["digest"] == digest
    evaluation = status["evaluation"]
    assert evaluation["passed"] is True and evaluation["score"] == "rougeL 0.8 (+0.6)"
    assert [(m["name"], m["base"], m["adapter"], m["delta"], m["examples"]) for m in evaluation["metrics"]] == [
        ("rougeL", 0.2, 0.8, 0.6, 20),
        ("exactMatch", 0.0, 0.25, 0.25, 20),
    ]
    assert evaluation["predictionsUri"] == f"{uri}/evaluation/predictions.jsonl"

    # One GPU for as long as the Job ran (its startTime to completionTime), at the H100 price per GPU-hour.
    usage = status["usage"]
    started, completed = as_datetime(status["startTime"]), as_datetime(status["completionTime"])
    assert started is not None and completed is not None
    assert usage["wallSeconds"] == (completed - started).total_seconds() == usage["gpuSeconds"]
    cost = usage["gpuSeconds"] / 3600 * PRICING["gpuHour"][GPU_PRODUCT]  # type: ignore[index]
    assert usage["estimatedCost"] == format_cost(cost, "USD")

    kubectl = [str(Builder().path("kubectl")), "--kubeconfig", str(cluster.kubeconfig), "-n", namespace]
    table = subprocess.run([*kubectl, "get", "ftj", "support", "-o", "wide"], capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert header.split()[:9] == ["NAME", "PHASE", "BASE", "METHOD", "STEP", "LOSS", "SCORE", "GPU-S", "CPU-S"]
    assert "rougeL 0.8 (+0.6)" in row and usage["estimatedCost"] in row
    narrow = subprocess.run([*kubectl, "get", "ftj", "support"], capture_output=True, text=True)
    assert "SCORE" in narrow.stdout and "COST" not in narrow.stdout  # cost and seconds only with -o wide


@pytest.mark.parametrize(
    ("evaluation", "reason", "said"),
    [
        (_result(0.3), "BelowQualityBar", "rougeL 0.3 is not at least 0.5"),
        (None, "NotEvaluated", "holds no evaluation"),
    ],
    ids=["below-the-bar", "not-evaluated"],
)
def test_a_missed_bar_fails_the_job_and_keeps_the_adapter(
    cluster: ClusterHandle,
    operator: OperatorProcess,
    namespace: str,
    s3_server: S3Server,
    tmp_path: Path,
    evaluation: Obj | None,
    reason: str,
    said: str,
) -> None:
    done, uri, digest = _train(cluster, namespace, s3_server, tmp_path, evaluation)
    status = done["status"]
    assert status["phase"] == "Failed", status
    ready, degraded = condition(status, "Ready"), condition(status, "Degraded")
    assert ready is not None and (ready["status"], ready["reason"]) == ("False", reason)
    assert said in ready["message"] and uri in ready["message"]
    assert degraded is not None and (degraded["status"], degraded["reason"]) == ("True", reason)
    assert status["artifact"] == {"uri": uri, "digest": digest, "sizeBytes": 64 + 36}
    assert (status.get("evaluation") or {}).get("passed") is (False if evaluation else None)
    assert status["usage"]["gpuSeconds"] == status["usage"]["wallSeconds"]
    # Kept: the version is still in the store for a person to look at.
    manifest, stored, _ = ArtifactStore(s3_server.store_settings()).read_manifest(VersionFolder.parse(uri))
    assert stored == digest and manifest.evaluation == evaluation
