"""The images the chart and the operator name are the ones images/ builds: a Dockerfile and a hash-pinned lock per
image, non-root (uid 1000, as the operator's pods run), multi-stage, OCI-labelled, on the same Debian packages as
the Docker-less builder (lorafleet.dev.images), whose layer tars are reproducible."""

from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path

import pytest
import yaml

from lorafleet.config import OperatorSettings
from lorafleet.dev import images

REPO = Path(__file__).resolve().parents[2]
VALUES = yaml.safe_load((REPO / "charts" / "lorafleet" / "values.yaml").read_text())

# chart value -> (builder image, Dockerfile, OperatorSettings field)
IMAGE_MAP = {
    "operator": ("operator", "images/operator/Dockerfile", "sync_image"),
    "trainer": ("trainer", "images/trainer/Dockerfile", "trainer_image"),
    "trainerCpu": ("trainer-cpu", "images/trainer/Dockerfile", "trainer_cpu_image"),
    "vllmCpu": ("vllm-cpu", "images/vllm-cpu/Dockerfile", "vllm_cpu_image"),
}
LABELS = ("title", "description", "version", "revision", "licenses", "base.name")
LOCK_LINE = re.compile(r"^[A-Za-z0-9_.\-]+==[^\s]+ \\\n    --hash=sha256:[0-9a-f]{64}$")


def _lock(name: str) -> dict[str, str]:
    return {n.lower(): v for n, v, _ in images._lock_entries(images.IMAGES[name].lock_path)}


@pytest.mark.parametrize("value", sorted(IMAGE_MAP))
def test_chart_images_are_built_by_images(value: str) -> None:
    builder, dockerfile, setting = IMAGE_MAP[value]
    spec = images.IMAGES[builder]
    assert VALUES["images"][value]["repository"] == spec.repository
    assert (REPO / dockerfile).exists()
    default = OperatorSettings.model_fields[setting].get_default(call_default_factory=True)
    assert default.rsplit(":", 1)[0] == spec.repository, f"{setting} default {default} is not {spec.repository}"
    assert spec.lock_path.exists(), f"run hack/images/build lock {builder}"


def _dockerfiles() -> list[Path]:
    return sorted((REPO / "images").glob("*/Dockerfile"))


@pytest.mark.parametrize("dockerfile", _dockerfiles(), ids=lambda p: p.parent.name)
def test_dockerfiles_are_multi_stage_non_root_pinned_and_labelled(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) >= 2, "multi-stage"
    assert re.search(r"^ARG DEBIAN_IMAGE=debian:12\.\d+-slim$", text, re.MULTILINE), "a pinned Debian point release"
    assert "latest" not in text
    assert re.findall(r"^USER (.+)$", text, re.MULTILINE) == ["1000:1000"]
    assert "useradd --uid 1000 --gid 1000" in text
    for label in LABELS:
        assert f"org.opencontainers.image.{label}=" in text, label
    # The same Debian packages as the Docker-less builder's base.
    apt = re.search(r"apt-get install -y --no-install-recommends ([^\\\n]+)", text)
    assert apt is not None and apt.group(1).split() == list(images.BASE_PACKAGES)
    # Python packages only from a hash-pinned lock, without resolving anything at build time.
    assert "--no-deps" in text and "--require-hashes -r /tmp/requirements.lock" in text
    for lock in re.findall(r"^COPY (images/\S+/requirements\.lock)", text, re.MULTILINE):
        assert (REPO / lock).exists(), lock


@pytest.mark.parametrize("name", sorted(images.IMAGES))
def test_locks_pin_every_package_by_hash(name: str) -> None:
    text = images.IMAGES[name].lock_path.read_text()
    entries = [e for e in text.split("\n") if e and not e.startswith("#") and not e.startswith("    ")]
    blocks = re.split(r"\n(?=[A-Za-z0-9])", "\n".join(line for line in text.splitlines() if not line.startswith("#")))
    assert len(blocks) == len(entries) > 10
    for block in blocks:
        assert LOCK_LINE.match(block.strip("\n")), block
    assert "lorafleet" not in _lock(name), "lorafleet itself is the app layer, installed --no-deps"


def test_image_contents() -> None:
    operator, trainer, trainer_cpu, vllm = (_lock(n) for n in ("operator", "trainer", "trainer-cpu", "vllm-cpu"))
    assert "torch" not in operator and "kopf" in operator and "aiohttp" in operator  # the sidecar's gateway
    assert trainer_cpu["torch"] == "2.13.0+cpu" and "bitsandbytes" not in trainer_cpu
    assert trainer["bitsandbytes"] == "0.50.2"
    assert trainer["torch"] == "2.13.0" and "nvidia-cuda-runtime" in trainer, "the CUDA build from PyPI"
    for lock in (trainer, trainer_cpu):
        assert lock["peft"] == "0.21.2" and "transformers" in lock and "accelerate" in lock
    assert vllm["vllm-cpu"] == "0.32.0" and vllm["torch"] == "2.13.0+cpu"
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(vllm), "PyPI's builds break the CPU torch"
    # One stack for adapters: what trains them is what serves them.
    assert vllm["transformers"] == trainer_cpu["transformers"]


def test_image_config_runs_as_1000_with_the_venv_on_path() -> None:
    spec = images.IMAGES["operator"]
    config = images.image_config(spec, [], "0.1.0", "abc")
    assert config["config"]["User"] == "1000:1000"
    assert config["config"]["Cmd"] == ["lorafleet", "operator"]
    env = dict(e.split("=", 1) for e in config["config"]["Env"])
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert config["config"]["Labels"]["org.opencontainers.image.revision"] == "abc"


def test_layers_are_reproducible(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "opt" / "venv" / "bin").mkdir(parents=True)
    (tree / "opt" / "venv" / "bin" / "tool").write_text("#!/bin/sh\n")
    (tree / "opt" / "venv" / "bin" / "tool").chmod(0o755)
    (tree / "opt" / "venv" / "link").symlink_to("bin/tool")
    (tree / "etc").mkdir()
    (tree / "etc" / "skipped").write_text("x")
    first = images.write_layer(tree, tmp_path / "a.tar", include=lambda rel: rel.startswith("opt"))
    os.utime(tree / "opt" / "venv" / "bin" / "tool", (1, 1))  # mtimes never reach the layer
    second = images.write_layer(tree, tmp_path / "b.tar", include=lambda rel: rel.startswith("opt"))
    assert first == second
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert list(members) == ["opt", "opt/venv", "opt/venv/bin", "opt/venv/bin/tool", "opt/venv/link"]
    assert {m.mtime for m in members.values()} == {images.SOURCE_DATE_EPOCH}
    assert members["opt/venv/bin/tool"].mode & 0o777 == 0o755
    assert members["opt/venv/link"].issym() and members["opt/venv/link"].linkname == "bin/tool"


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of an overlay whiteout needs root")
def test_overlay_whiteouts_become_oci_whiteouts(tmp_path: Path) -> None:
    tree = tmp_path / "upper"
    (tree / "etc").mkdir(parents=True)
    os.mknod(tree / "etc" / "removed", 0o600 | 0o020000, os.makedev(0, 0))  # what overlayfs writes for a delete
    images.write_layer(tree, tmp_path / "layer.tar")
    with tarfile.open(tmp_path / "layer.tar") as tar:
        names = tar.getnames()
    assert names == ["etc", "etc/.wh.removed"]
