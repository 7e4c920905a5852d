"""`lorafleet models import` against a real MinIO: a local Hugging Face folder (the tiny Llama) becomes a model
version whose pull is byte for byte the folder, and the printed BaseModel YAML names it with its digest and the
family, parameter count (from the safetensors headers: equal to torch's count), context length and dtype read from
the folder; pickle weights and folders without safetensors are refused, naming the files and the fix, before
anything is uploaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from lorafleet import API_VERSION
from lorafleet.api.objects import BaseModelObject
from lorafleet.cli import main as cli
from lorafleet.storage import ArtifactStore, Location, VersionFolder
from lorafleet_dev.s3server import S3Server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    from lorafleet_dev.tiny_model import build

    return build(tmp_path_factory.mktemp("tiny-model"))


def test_import_pushes_the_folder_and_prints_the_base_model(
    tiny_model: Path, s3_server: S3Server, s3_bucket: str, artifact_store: ArtifactStore,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:  # fmt: skip
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    uri = f"s3://{s3_bucket}/shared/models/Org/Tiny-Llama/r1"
    assert cli(["models", "import", str(tiny_model), uri, "--namespace", "team-a"]) == 0
    out = capsys.readouterr().out
    obj = yaml.safe_load(out)
    assert obj["apiVersion"] == API_VERSION and obj["kind"] == "BaseModel"
    assert obj["metadata"] == {"name": "org-tiny-llama", "namespace": "team-a"}
    base = BaseModelObject.model_validate(obj)  # the API accepts it as printed

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    spec = base.spec
    assert spec.family == "llama"
    assert spec.parameter_count == sum(p.numel() for p in model.parameters())
    assert spec.max_context_length == model.config.max_position_embeddings == 2048
    assert spec.dtype == "float32"
    assert spec.source.uri == uri

    # The version is the folder, pinned by the digest the YAML carries.
    folder = VersionFolder.parse(uri)
    manifest, digest, _ = artifact_store.read_manifest(folder)
    assert spec.source.digest == digest and manifest.kind == "model" and manifest.name == "Org/Tiny-Llama"
    artifact_store.pull(folder, tmp_path / "pulled", digest=digest)
    for f in tiny_model.iterdir():
        assert (tmp_path / "pulled" / f.name).read_bytes() == f.read_bytes()

    # Importing it again is a no-op with the same YAML.
    assert cli(["models", "import", str(tiny_model), uri, "--namespace", "team-a"]) == 0
    assert capsys.readouterr().out == out


@pytest.mark.parametrize("pickle_file", ["pytorch_model.bin", "training_args.bin", "sub/model.pt", "x.ckpt", "y.pkl"])
def test_pickle_weights_are_refused_before_any_upload(
    tiny_model: Path, s3_server: S3Server, s3_bucket: str, artifact_store: ArtifactStore,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, pickle_file: str,
) -> None:  # fmt: skip
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    src = shutil.copytree(tiny_model, tmp_path / "model")
    (src / pickle_file).parent.mkdir(parents=True, exist_ok=True)
    (src / pickle_file).write_bytes(b"\x80\x04K\x01.")
    assert cli(["models", "import", str(src), f"s3://{s3_bucket}/models/tiny/r1"]) == 2
    err = capsys.readouterr().err
    assert pickle_file in err and "safetensors" in err and "safe_serialization=True" in err
    assert artifact_store.list_versions(Location(s3_bucket), include_incomplete=True) == []


def test_folder_without_safetensors_or_config_is_refused(
    tiny_model: Path, s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:  # fmt: skip
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    no_weights = shutil.copytree(tiny_model, tmp_path / "a")
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    assert cli(["models", "import", str(no_weights), f"s3://{s3_bucket}/models/tiny/r1"]) == 2
    assert "no *.safetensors weights" in capsys.readouterr().err

    no_config = shutil.copytree(tiny_model, tmp_path / "b")
    (no_config / "config.json").unlink()
    assert cli(["models", "import", str(no_config), f"s3://{s3_bucket}/models/tiny/r1"]) == 2
    assert "no config.json" in capsys.readouterr().err

    assert cli(["models", "import", str(tiny_model), f"s3://{s3_bucket}/adapters/tiny/r1"]) == 2
    assert "models/<name>/<revision>" in capsys.readouterr().err
