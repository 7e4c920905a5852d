"""crds/ is exactly what `lorafleet crds` generates from lorafleet.api, and each CRD has what users rely on."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lorafleet.api.kinds import KINDS, crd_files
from lorafleet.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_crds_folders_are_not_stale() -> None:
    """crds/ and its copies in the Helm chart and the kustomize base are exactly what the API models generate."""
    folders = [
        *("--out", str(REPO / "crds")),
        *("--out", str(REPO / "charts" / "lorafleet" / "crds")),
        *("--out", str(REPO / "deploy" / "crds")),
    ]
    assert main(["crds", "--check", *folders]) == 0, "run `lorafleet crds` and commit crds/ and charts/"


def test_check_detects_a_stale_file(tmp_path: Path) -> None:
    main(["crds", "--out", str(tmp_path)])
    assert main(["crds", "--check", "--out", str(tmp_path)]) == 0
    victim = next(tmp_path.iterdir())
    victim.write_text(victim.read_text().replace("lorafleet.io", "example.com", 1))
    assert main(["crds", "--check", "--out", str(tmp_path)]) == 1


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
    assert any(c["jsonPath"] == ".status.phase" for c in version["additionalPrinterColumns"])


def test_short_names() -> None:
    assert {k.info.kind: k.info.short_names for k in KINDS} == {
        "BaseModel": ("bm",),
        "FineTuneJob": ("ftj",),
        "AdapterDeployment": ("ad",),
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
