"""Every child-object builder renders exactly the golden YAML under tests/unit/golden.

Regenerate after an intended change with `LORAFLEET_UPDATE_GOLDEN=1 pytest tests/unit/test_builders_golden.py`
and review the diff: the golden files are the reviewable contract of what the operator creates.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorafleet.config import OperatorSettings
from lorafleet.resources import adapterdeployment as ad_res
from lorafleet.resources import finetunejob as ftj_res
from lorafleet.serving.desired import DesiredAdapter
from tests.unit import objects

GOLDEN = Path(__file__).parent / "golden"
SETTINGS = OperatorSettings(
    store_endpoint="https://minio.storage.svc:9000",
    store_uri="s3://lorafleet",
    store_credentials_secret="lorafleet-store",
    egress_cidrs=["10.96.0.1/32", "10.0.40.0/24"],
)


def _single_node() -> list[dict[str, Any]]:
    return ftj_res.desired_children(objects.fine_tune_job(), objects.ready(objects.base_model()), SETTINGS)


def _multi_node() -> list[dict[str, Any]]:
    ftj = objects.fine_tune_job(resources={"nodes": 2, "gpusPerNode": 8}, method="qlora")
    return ftj_res.desired_children(ftj, objects.ready(objects.base_model()), SETTINGS)


def _cpu_from_pvc() -> list[dict[str, Any]]:
    ftj = objects.fine_tune_job(resources={
            "gpusPerNode": 0,
            "cpu": 2,
            "memory": "4Gi",
            "podLabels": {"cost-centre": "ml-42", "app.kubernetes.io/instance": "cannot-override"},
            "podAnnotations": {"sidecar.istio.io/inject": "false"},
        },
        activeDeadlineSeconds=3600,)
    bm = objects.base_model(source={"uri": "pvc://models/tiny-llama"})
    return ftj_res.desired_children(ftj, objects.ready(bm), SETTINGS.model_copy(update={"network_policy": False}))


def _serving_gpu() -> list[dict[str, Any]]:
    adapters = [DesiredAdapter(name="sql", uri="s3://lorafleet/adapters/sql/v3", digest="sha256:" + "ab" * 32)]
    bm = objects.ready(objects.base_model(), digest="sha256:" + "cd" * 32)
    return ad_res.desired_children(objects.adapter_deployment(), bm, adapters, {"sql": 64}, SETTINGS)


def _serving_cpu() -> list[dict[str, Any]]:
    ad = objects.adapter_deployment(
        replicas=1,
        resources={"gpusPerReplica": 0, "cpu": 2, "memory": "4Gi"},
        engine={"maxLoras": 2, "maxLoraRank": 16, "dtype": "float32", "extraArgs": ["--enforce-eager"]},
    )
    return ad_res.desired_children(ad, objects.ready(objects.base_model()), [], {}, SETTINGS)


class _NoAliasDumper(yaml.SafeDumper):
    """Writes shared sub-objects out in full, as the API server will see them."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


CASES = {
    "finetunejob-single-gpu": _single_node,
    "finetunejob-multi-node": _multi_node,
    "finetunejob-cpu-pvc": _cpu_from_pvc,
    "adapterdeployment-gpu": _serving_gpu,
    "adapterdeployment-cpu": _serving_cpu,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_builder_matches_golden(case: str) -> None:
    rendered = yaml.dump_all(CASES[case](), Dumper=_NoAliasDumper, sort_keys=True)
    path = GOLDEN / f"{case}.yaml"
    if os.environ.get("LORAFLEET_UPDATE_GOLDEN"):
        path.write_text(rendered)
    assert path.exists(), f"missing golden file {path}; run with LORAFLEET_UPDATE_GOLDEN=1"
    assert rendered == path.read_text(), f"{case} differs from {path}; review and regenerate if intended"
