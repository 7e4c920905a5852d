"""The kustomize base in deploy/ is the chart's default render (plus the namespace and the CRDs) as plain YAML, so
GitOps users without Helm get the same operator: `kubectl kustomize deploy/` (the real kubectl) gives the chart's
objects, field for field, and the generated CRDs byte for byte.

Regenerate deploy/operator.yaml after a chart change:  python -m tests.unit.test_chart_kustomize --write
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorafleet.dev.build import Builder, BuildError
from tests.unit.test_chart import CHART, KUBE_VERSION, NAMESPACE, helm

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
HEADER = """\
# Generated from charts/lorafleet with its default values (release "lorafleet", namespace lorafleet-system) by
# `python -m tests.unit.test_chart_kustomize --write`; tests/unit/test_chart_kustomize.py keeps it in sync.
"""

Obj = dict[str, Any]
# The first run on a fresh machine builds helm (about 2 minutes) or kubectl (10 minutes or more) from source.
pytestmark = pytest.mark.timeout(1800)


def chart_as_plain_yaml() -> str:
    """The chart's default render without Helm's own bookkeeping (the chart label, managed-by Helm)."""
    text = helm("template", "lorafleet", str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION).stdout
    lines = []
    for line in text.splitlines():
        if line.startswith("# Source:") or "helm.sh/chart:" in line:
            continue
        lines.append(line.replace("app.kubernetes.io/managed-by: Helm", "app.kubernetes.io/managed-by: kustomize"))
    body = "\n".join(lines).strip()
    body = body.removeprefix("---").lstrip("\n")
    return HEADER + body + "\n"


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
    assert (DEPLOY / "operator.yaml").read_text() == chart_as_plain_yaml(), (
        "deploy/operator.yaml is stale: python -m tests.unit.test_chart_kustomize --write"
    )


def test_kustomize_renders_the_charts_objects(kustomized: dict[tuple[str, str, str], Obj]) -> None:
    chart = {_key(d): d for d in yaml.safe_load_all(chart_as_plain_yaml()) if d}
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
    assert here == top, "deploy/crds/ differs from crds/: cp crds/*.yaml deploy/crds/"


def main(argv: list[str]) -> int:
    if argv != ["--write"]:
        print(__doc__)
        return 2
    (DEPLOY / "operator.yaml").write_text(chart_as_plain_yaml())
    for crd in (REPO / "crds").glob("*.yaml"):
        (DEPLOY / "crds" / crd.name).write_bytes(crd.read_bytes())
    print(f"wrote {DEPLOY / 'operator.yaml'} and {DEPLOY / 'crds'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
