"""Every manifest in examples/ parses with the API models (the integration tests also dry-run them on a server)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lorafleet.api.kinds import KINDS

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
SPEC_BY_KIND = {kind.info.kind: kind.spec for kind in KINDS}


def test_there_are_examples_of_every_kind() -> None:
    kinds = {doc["kind"] for path in EXAMPLES for doc in yaml.safe_load_all(path.read_text())}
    assert kinds == set(SPEC_BY_KIND)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        assert doc["apiVersion"] == "lorafleet.io/v1alpha1"
        SPEC_BY_KIND[doc["kind"]].model_validate(doc["spec"])
