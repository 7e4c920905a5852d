"""hack/generate (lorafleet_dev.generate) writes every generated file and --check names each stale one: a file that
differs, one missing, and one in a generated folder that nothing generates any more; --check writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet_dev import generate
from lorafleet_dev.generate import Target

TARGETS = [
    Target("gen", lambda: {"a.yaml": "a: 1\n", "b.yaml": "b: 2\n"}, exclusive=True),
    Target("mixed", lambda: {"operator.yaml": "kind: X\n"}, exclusive=False),
]


def run(repo: Path, *args: str) -> int:
    return generate.main(list(args), repo=repo, targets=TARGETS)


def test_write_then_check_passes(tmp_path: Path) -> None:
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "kustomization.yaml").write_text("hand: written\n")
    assert run(tmp_path, "--check") == 1
    assert run(tmp_path) == 0
    assert (tmp_path / "gen" / "a.yaml").read_text() == "a: 1\n"
    assert (tmp_path / "mixed" / "operator.yaml").read_text() == "kind: X\n"
    assert (tmp_path / "mixed" / "kustomization.yaml").read_text() == "hand: written\n", "not a generated folder"
    assert run(tmp_path, "--check") == 0


def test_check_names_each_stale_file_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(tmp_path)
    (tmp_path / "gen" / "a.yaml").write_text("a: edited by hand\n")
    (tmp_path / "gen" / "b.yaml").unlink()
    (tmp_path / "gen" / "old.yaml").write_text("removed: kind\n")
    capsys.readouterr()
    assert run(tmp_path, "--check") == 1
    err = capsys.readouterr().err
    assert "stale: gen/a.yaml (differs" in err and "stale: gen/b.yaml (missing)" in err
    assert "stale: gen/old.yaml (no longer generated)" in err and "run `hack/generate`" in err
    assert (tmp_path / "gen" / "a.yaml").read_text() == "a: edited by hand\n"
    assert run(tmp_path) == 0
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["a.yaml", "b.yaml"]
    assert run(tmp_path, "--check") == 0


def test_every_generated_file_has_one_target() -> None:
    folders = [t.folder for t in generate.TARGETS]
    assert len(folders) == len(set(folders))
    assert {"crds", "charts/lorafleet/crds", "deploy/crds", "deploy", "tests/unit/golden"} == set(folders)
