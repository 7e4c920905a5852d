"""The AdapterDeployment's promotion gate and canaries through the real operator, API server and MinIO.

Invariants: an adapter that requires an evaluation is put in the desired-adapter ConfigMap (the set the replicas
load) only when the evaluation in its stored manifest reaches every bar, pinned to that manifest's digest; below
a bar it is Pending with reason BelowQualityBar, without an evaluation Pending with NotEvaluated, and the
AdapterDeployment's conditions say so. A canary's versions are in the set with their served name and weight, and
promotion is a spec edit: the set follows the new weights.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from lorafleet.contracts.serving import DESIRED_FILE
from lorafleet.storage import ArtifactStore, VersionFolder
from lorafleet_dev.s3server import S3Server
from lorafleet_dev.testing import ClusterHandle, wait_until
from tests.integration.operator_fixtures import ADAPTER_ROOT, MODEL_URI, Custom, OperatorProcess, condition
from tests.unit import objects

pytestmark = pytest.mark.integration

BARS = [{"metric": "rougeL", "minScore": 0.5}, {"metric": "exactMatch", "minImprovement": 0.05}]
PASSING = {"metrics": {"rougeL": {"base": 0.2, "adapter": 0.71}, "exactMatch": {"base": 0.1, "adapter": 0.3}}}
BELOW = {"metrics": {"rougeL": {"base": 0.2, "adapter": 0.31}, "exactMatch": {"base": 0.1, "adapter": 0.3}}}


def _push(store: ArtifactStore, src: Path, namespace: str, name: str, evaluation: dict[str, Any] | None) -> Any:
    folder = VersionFolder.parse(f"{ADAPTER_ROOT}/{namespace}/adapters/{name}/v1")
    (src / "adapter_model.safetensors").write_bytes(name.encode() * 16)
    pushed = store.push(
        src, folder, kind="adapter", name=name, version="v1", hyperparameters={"lora": {"r": 8}}, evaluation=evaluation
    )
    return folder.uri, pushed.digest


def _desired(cluster: ClusterHandle, namespace: str) -> dict[str, Any] | None:
    try:
        config_map = cluster.core.read_namespaced_config_map("chat-adapters", namespace)
    except client.ApiException:
        return None
    data: dict[str, Any] = json.loads(config_map.data[DESIRED_FILE])
    return data


def test_only_adapters_that_reach_their_bars_are_served_and_promotion_is_a_spec_edit(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, s3_server: S3Server, tmp_path: Path
) -> None:
    store = ArtifactStore(s3_server.store_settings())
    uris: dict[str, tuple[str, str]] = {}
    for name, evaluation in (("good", PASSING), ("low", BELOW), ("plain", None)):
        (tmp_path / name).mkdir()
        uris[name] = _push(store, tmp_path / name, namespace, name, evaluation)

    def artifact(name: str) -> dict[str, str]:
        return {"uri": uris[name][0]}  # unpinned: the gate pins the digest it judged

    custom = Custom(cluster, namespace)
    base = copy.deepcopy(objects.base_model())
    base["metadata"] = {"name": "tiny-llama", "namespace": namespace}
    base["spec"]["source"] = {"uri": MODEL_URI}
    custom.create(base)
    ad = copy.deepcopy(objects.adapter_deployment())
    ad["metadata"] = {"name": "chat", "namespace": namespace}
    ad["spec"].update(
        replicas=1,
        adapters=[
            {"name": "good", "artifact": artifact("good"), "requireEvaluation": BARS},
            {"name": "low", "artifact": artifact("low"), "requireEvaluation": BARS},
            {"name": "plain", "artifact": artifact("plain"), "requireEvaluation": BARS},
            {"name": "ungated", "artifact": artifact("plain")},
            {
                "name": "bot",
                "requireEvaluation": BARS,
                "versions": [
                    {"name": "v1", "artifact": artifact("good"), "weight": 90},
                    {"name": "v2", "artifact": artifact("low"), "weight": 10},
                ],
            },
        ],
    )
    custom.create(ad)

    def gated(status: dict[str, Any], obj: dict[str, Any]) -> bool:
        reasons = {a["name"]: a.get("reason") for a in status.get("adapters") or []}
        ready = condition(status, "Ready") or {}
        gate = reasons.get("low") == "BelowQualityBar" and reasons.get("plain") == "NotEvaluated"
        return gate and ready.get("reason") == "BelowQualityBar"  # once the BaseModel is Ready

    status = custom.wait_status("AdapterDeployment", "chat", gated, timeout=90, what="the gate's reasons")["status"]
    adapters = {a["name"]: a for a in status["adapters"]}
    assert adapters["low"]["state"] == "Pending" and "rougeL 0.31 is not at least 0.5" in adapters["low"]["message"]
    assert adapters["plain"]["state"] == "Pending" and "holds no evaluation" in adapters["plain"]["message"]
    bot = adapters["bot"]
    assert [(v["name"], v["weight"], v["state"]) for v in bot["versions"]][1] == ("v2", 10, "Pending")
    assert bot["versions"][1]["reason"] == "BelowQualityBar"
    ready = condition(status, "Ready")
    assert ready is not None and ready["status"] == "False" and ready["reason"] == "BelowQualityBar"
    degraded = condition(status, "Degraded")
    assert degraded is not None and degraded["status"] == "True"
    assert "low:" in degraded["message"] and "plain:" in degraded["message"]

    desired = wait_until(lambda: _desired(cluster, namespace), timeout=30, what="the desired-adapter ConfigMap")
    entries = {a["name"]: a for a in desired["adapters"]}
    assert set(entries) == {"good", "ungated", "bot:v1"}, entries
    assert entries["good"]["digest"] == uris["good"][1]  # pinned to the manifest that passed
    assert entries["ungated"]["digest"] is None  # no gate, no pin: as before
    assert (entries["bot:v1"]["servedName"], entries["bot:v1"]["weight"]) == ("bot", 90)

    # Promotion is a spec edit: v2 gets the traffic; without its bar it is served too.
    patch = {"spec": {"adapters": [
        {"name": "bot", "versions": [
            {"name": "v1", "artifact": artifact("good"), "weight": 0},
            {"name": "v2", "artifact": artifact("low"), "weight": 100},
        ]},
    ]}}  # fmt: skip
    custom.api.patch_namespaced_custom_object(
        "lorafleet.io", "v1alpha1", namespace, "adapterdeployments", "chat", patch
    )

    def promoted() -> dict[str, Any] | None:
        current = _desired(cluster, namespace)
        weights = {a["name"]: a.get("weight") for a in (current or {}).get("adapters", [])}
        return current if weights == {"bot:v1": 0, "bot:v2": 100} else None

    wait_until(promoted, timeout=60, what="the desired set after the promotion")
    after = custom.wait_status(
        "AdapterDeployment", "chat", lambda s, o: s.get("observedGeneration") == o["metadata"]["generation"]
    )["status"]
    assert [a["name"] for a in after["adapters"]] == ["bot"]
    assert all(v["reason"] != "BelowQualityBar" for v in after["adapters"][0]["versions"])
