"""Every child-object builder renders exactly the golden YAML under tests/unit/golden.

The golden files are the reviewable contract of what the operator creates. The test only compares; after an
intended change run `hack/generate` (it writes them with golden_files() below, the very function this test
compares against) and review the diff.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from lorafleet.config import OperatorSettings
from lorafleet.contracts.serving import DesiredAdapter
from lorafleet.resources import adapterdeployment as ad_res
from lorafleet.resources import finetunejob as ftj_res
from tests.unit import objects

GOLDEN = Path(__file__).parent / "golden"
SETTINGS = OperatorSettings(
    store_endpoint="https://minio.storage.svc:9000",
    store_uri="s3://lorafleet",
    store_credentials_secret="lorafleet-store",
    egress_cidrs=["10.96.0.1/32", "10.0.40.0/24"],
)


def _single_node() -> list[dict[str, Any]]:
    bm = objects.as_base_model(objects.ready(objects.base_model()))
    return ftj_res.desired_children(objects.as_fine_tune_job(objects.fine_tune_job()), bm, SETTINGS)


def _multi_node() -> list[dict[str, Any]]:
    ftj = objects.fine_tune_job(resources={"nodes": 2, "gpusPerNode": 8}, method="qlora")
    bm = objects.as_base_model(objects.ready(objects.base_model()))
    return ftj_res.desired_children(objects.as_fine_tune_job(ftj), bm, SETTINGS)


def _cpu_from_pvc() -> list[dict[str, Any]]:
    ftj = objects.fine_tune_job(
        resources={
            "gpusPerNode": 0,
            "cpu": 2,
            "memory": "4Gi",
            "podLabels": {"cost-centre": "ml-42", "app.kubernetes.io/instance": "cannot-override"},
            "podAnnotations": {"sidecar.istio.io/inject": "false"},
        },
        activeDeadlineSeconds=3600,
    )
    bm = objects.base_model(source={"uri": "pvc://models/tiny-llama"})
    settings = SETTINGS.model_copy(update={"network_policy": False})
    return ftj_res.desired_children(objects.as_fine_tune_job(ftj), objects.as_base_model(objects.ready(bm)), settings)


def _serving_gpu() -> list[dict[str, Any]]:
    adapters = [DesiredAdapter(name="sql", uri="s3://lorafleet/adapters/sql/v3", digest="sha256:" + "ab" * 32)]
    bm = objects.ready(objects.base_model(), digest="sha256:" + "cd" * 32)
    ad = objects.adapter_deployment_obj(objects.adapter_deployment())
    return ad_res.desired_children(ad, objects.as_base_model(bm), adapters, {"sql": 64}, SETTINGS)


def _serving_cpu() -> list[dict[str, Any]]:
    ad = objects.adapter_deployment(
        replicas=1,
        resources={"gpusPerReplica": 0, "cpu": 2, "memory": "4Gi"},
        engine={"maxLoras": 2, "maxLoraRank": 16, "dtype": "float32", "extraArgs": ["--enforce-eager"]},
    )
    bm = objects.as_base_model(objects.ready(objects.base_model()))
    return ad_res.desired_children(objects.adapter_deployment_obj(ad), bm, [], {}, SETTINGS)


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


def render(case: str) -> str:
    """The golden text of one case: its children as YAML documents, keys sorted, shared objects written out."""
    return yaml.dump_all(CASES[case](), Dumper=_NoAliasDumper, sort_keys=True)


def golden_files() -> dict[str, str]:
    """File name under tests/unit/golden -> text, for every case (what hack/generate writes)."""
    return {f"{case}.yaml": render(case) for case in sorted(CASES)}


def test_golden_folder_holds_exactly_the_cases() -> None:
    assert sorted(p.name for p in GOLDEN.glob("*.yaml")) == sorted(golden_files()), "run hack/generate"


@pytest.mark.parametrize("case", sorted(CASES))
def test_builder_matches_golden(case: str) -> None:
    path = GOLDEN / f"{case}.yaml"
    assert path.exists(), f"missing golden file {path}; run hack/generate"
    assert render(case) == path.read_text(), f"{case} differs from {path}; review, and run hack/generate if intended"
