"""The kustomize base in deploy/ is the chart's default render (plus the namespace and the CRDs) as plain YAML, so
GitOps users without Helm get the same operator: `kubectl kustomize deploy/` (the real kubectl) gives the chart's
objects, field for field, and the generated CRDs byte for byte.

deploy/operator.yaml is rendered by lorafleet_dev.generate.chart_as_plain_yaml (the function compared against
here); regenerate it after a chart change with `hack/generate`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorafleet_dev.build import Builder, BuildError
from lorafleet_dev.generate import chart_as_plain_yaml
from tests.integration.test_chart_render import NAMESPACE, helm_binary

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
Obj = dict[str, Any]
# The first run on a fresh machine builds helm (about 2 minutes) or kubectl (10 minutes or more) from source.
pytestmark = pytest.mark.timeout(1800)


def kubectl() -> Path:
    try:
        return Builder(log=lambda _: None).ensure(["kubectl"])["kubectl"]
    except BuildError as exc:
        pytest.fail(f"could not build kubectl for `kubectl kustomize`: {exc}", pytrace=False)


def _key(obj: Obj) -> tuple[str, str, str]:
    return (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])


@pytest.fixture(scope="module")
def kustomized() -> dict[tuple[str, str, str], Obj]:
    proc = subprocess.run(
        [str(kubectl()), "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return {_key(d): d for d in yaml.safe_load_all(proc.stdout) if d}


def test_operator_yaml_is_the_charts_default_render() -> None:
    assert (DEPLOY / "operator.yaml").read_text() == chart_as_plain_yaml(helm_binary()), (
        "deploy/operator.yaml is stale: run hack/generate"
    )


def test_kustomize_renders_the_charts_objects(kustomized: dict[tuple[str, str, str], Obj]) -> None:
    chart = {_key(d): d for d in yaml.safe_load_all(chart_as_plain_yaml(helm_binary())) if d}
    extra = {k for k in kustomized if k[0] in ("Namespace", "CustomResourceDefinition")}
    assert set(kustomized) - extra == set(chart), "deploy/ and the chart render different objects"
    assert sorted(k[0] for k in kustomized if k not in extra) == sorted(k[0] for k in chart)
    for key, obj in chart.items():
        assert kustomized[key] == obj, f"{key} differs between deploy/ and the chart"
    assert ("Namespace", "", NAMESPACE) in extra


def test_kustomize_carries_the_generated_crds(kustomized: dict[tuple[str, str, str], Obj]) -> None:
    crds = {k[2] for k in kustomized if k[0] == "CustomResourceDefinition"}
    assert crds == {"basemodels.lorafleet.io", "finetunejobs.lorafleet.io", "adapterdeployments.lorafleet.io"}
    top = {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml")}
    here = {p.name: p.read_bytes() for p in (DEPLOY / "crds").glob("*.yaml")}
    assert here == top, "deploy/crds/ differs from crds/: run hack/generate"
