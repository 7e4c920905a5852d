"""Builders of test objects (in the style of kueue's wrappers): a valid object by default, tweaked per test."""

from __future__ import annotations

import copy
from typing import Any

from lorafleet import API_VERSION

Obj = dict[str, Any]


def _meta(name: str, namespace: str, generation: int = 1) -> Obj:
    return {
        "name": name,
        "namespace": namespace,
        "uid": f"uid-{name}-0000-0000",
        "generation": generation,
        "creationTimestamp": "2026-11-22T10:00:00Z",
    }


def base_model(name: str = "tiny-llama", namespace: str = "ml", **spec: Any) -> Obj:
    obj = {
        "apiVersion": API_VERSION,
        "kind": "BaseModel",
        "metadata": _meta(name, namespace),
        "spec": {"source": {"uri": "s3://models/tiny-llama/r1"}, "family": "llama"},
    }
    obj["spec"].update(copy.deepcopy(spec))
    return obj


def ready(obj: Obj, **status: Any) -> Obj:
    out = copy.deepcopy(obj)
    out["status"] = {"phase": "Ready", **status}
    return out


def fine_tune_job(name: str = "support", namespace: str = "ml", **spec: Any) -> Obj:
    obj = {
        "apiVersion": API_VERSION,
        "kind": "FineTuneJob",
        "metadata": _meta(name, namespace),
        "spec": {
            "baseModelRef": {"name": "tiny-llama"},
            "dataset": {"uri": "s3://datasets/support/train.jsonl", "format": "chat"},
            "output": {"adapterName": "support-bot", "version": "v1"},
            "training": {"maxSteps": 100, "checkpointInterval": 20},
            "resources": {"gpusPerNode": 1, "cpu": 8, "memory": "64Gi"},
        },
    }
    obj["spec"].update(copy.deepcopy(spec))
    return obj


def adapter_deployment(name: str = "chat", namespace: str = "ml", **spec: Any) -> Obj:
    obj = {
        "apiVersion": API_VERSION,
        "kind": "AdapterDeployment",
        "metadata": _meta(name, namespace),
        "spec": {
            "baseModelRef": {"name": "tiny-llama"},
            "adapters": [
                {"name": "support-bot", "fineTuneJobRef": {"name": "support"}},
                {
                    "name": "sql",
                    "artifact": {
                        "uri": "s3://lorafleet/adapters/sql/v3",
                        "digest": "sha256:" + "ab" * 32,
                    },
                },
            ],
            "replicas": 2,
            "resources": {"gpusPerReplica": 1, "cpu": 8, "memory": "32Gi"},
        },
    }
    obj["spec"].update(copy.deepcopy(spec))
    return obj
