"""crds/ (and its copies) is exactly what lorafleet.api generates (kept so by hack/generate), `lorafleet crds`
prints or writes the same, and each CRD has what users rely on: names, status subresource, columns, documented
fields, an immutable FineTuneJob spec."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lorafleet.api.kinds import KINDS, crd_files
from lorafleet.cli import main
from lorafleet_dev import generate

REPO = Path(__file__).resolve().parents[2]


def test_committed_crds_are_the_generated_ones() -> None:
    """crds/ and its copies in the Helm chart and the kustomize base are exactly what the API models generate."""
    targets = [t for t in generate.TARGETS if t.files is generate.crd_files]
    assert {t.folder for t in targets} == {"crds", "charts/lorafleet/crds", "deploy/crds"}
    found = generate.stale(*generate.expected(REPO, targets))
    assert not found, f"stale CRDs {[str(p.relative_to(REPO)) for p, _ in found]}: run hack/generate"


def test_cli_prints_every_crd_or_writes_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crds"]) == 0
    printed = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert printed == [yaml.safe_load(text) for text in crd_files().values()]
    assert main(["crds", "--out", str(tmp_path)]) == 0
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == crd_files()


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.info.kind)
def test_crd_names_status_and_columns(kind: object) -> None:
    crd = kind.crd()  # type: ignore[attr-defined]
    names = crd["spec"]["names"]
    assert crd["spec"]["group"] == "lorafleet.io"
    assert names["categories"] == ["lorafleet"]
    assert names["shortNames"] == list(kind.info.short_names)  # type: ignore[attr-defined]
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1"
    assert version["subresources"] == {"status": {}}
    if kind.info.kind not in ("ClusterArtifactStore", "ArtifactStore"):  # stores have no phase
        assert any(c["jsonPath"] == ".status.phase" for c in version["additionalPrinterColumns"])


def test_short_names() -> None:
    assert {k.info.kind: k.info.short_names for k in KINDS} == {
        "BaseModel": ("bm",),
        "FineTuneJob": ("ftj",),
        "AdapterDeployment": ("ad",),
        "ClusterArtifactStore": ("cas",),
        "ArtifactStore": ("ast",),
    }


def _walk(schema: dict, path: str = ""):  # type: ignore[no-untyped-def]
    yield path, schema
    for name, child in (schema.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{name}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("name", sorted(crd_files()))
def test_every_spec_and_status_field_is_documented(name: str) -> None:
    crd = yaml.safe_load(crd_files()[name])
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for top in ("spec", "status"):
        for path, node in _walk(root["properties"][top], top):
            if path.endswith(("[]", "{}")) and node.get("type") != "object":
                continue  # scalar items are documented by their list or map field
            assert node.get("description"), f"{name}: {path} has no description"


def test_finetunejob_spec_is_immutable_and_qlora_needs_gpu() -> None:
    crd = yaml.safe_load(crd_files()["lorafleet.io_finetunejobs.yaml"])
    rules = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-validations"]
    assert {"rule": "self == oldSelf", "message": "spec is immutable; create a new FineTuneJob to train again"} in [
        {k: r[k] for k in ("rule", "message")} for r in rules
    ]
    assert any("qlora" in r["rule"] for r in rules)
