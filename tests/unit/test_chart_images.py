"""The images the chart and the operator name are the ones images/ builds: a Dockerfile and a hash-pinned lock per
image, non-root (uid 1000, as the operator's pods run), multi-stage, OCI-labelled, buildable offline by buildah
(lorafleet_dev.images: the pip ARGs, the ignore files) and unchanged with Docker. Pure file reads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lorafleet.config import OperatorSettings
from lorafleet_dev import images, locks

REPO = Path(__file__).resolve().parents[2]
VALUES = yaml.safe_load((REPO / "charts" / "lorafleet" / "values.yaml").read_text())

# chart value -> (image, Dockerfile, OperatorSettings field)
IMAGE_MAP = {
    "operator": ("operator", "images/operator/Dockerfile", "sync_image"),
    "trainer": ("trainer", "images/trainer/Dockerfile", "trainer_image"),
    "trainerCpu": ("trainer-cpu", "images/trainer/Dockerfile", "trainer_cpu_image"),
    "vllmCpu": ("vllm-cpu", "images/vllm-cpu/Dockerfile", "vllm_cpu_image"),
}
LABELS = ("title", "description", "version", "revision", "licenses", "base.name")
LOCK_LINE = re.compile(r"^[A-Za-z0-9_.\-]+==[^\s]+ \\\n    --hash=sha256:[0-9a-f]{64}$")
BASE_PACKAGES = ["python3.11", "python3.11-venv", "ca-certificates", "libnuma1"]
CMDS = {
    "operator": '["lorafleet", "operator"]',
    "trainer": '["python", "-m", "lorafleet.trainer"]',
    "vllm-cpu": '["python", "-m", "vllm.entrypoints.openai.api_server"]',
}


def _lock(name: str) -> dict[str, str]:
    return {n.lower(): v for n, v, _ in locks.lock_entries(locks.LOCKS[name].path)}


def _stages(text: str) -> list[str]:
    return re.split(r"^(?=FROM )", text, flags=re.MULTILINE)[1:]


@pytest.mark.parametrize("value", sorted(IMAGE_MAP))
def test_chart_images_are_built_by_images(value: str) -> None:
    name, dockerfile, setting = IMAGE_MAP[value]
    spec = images.IMAGES[name]
    assert VALUES["images"][value]["repository"] == spec.repository
    assert spec.dockerfile == REPO / dockerfile and spec.dockerfile.exists()
    default = OperatorSettings.model_fields[setting].get_default(call_default_factory=True)
    assert default.rsplit(":", 1)[0] == spec.repository, f"{setting} default {default} is not {spec.repository}"
    assert spec.lock_path.exists(), f"run hack/images/build lock {name}"


def _dockerfiles() -> list[Path]:
    return sorted((REPO / "images").glob("*/Dockerfile"))


@pytest.mark.parametrize("dockerfile", _dockerfiles(), ids=lambda p: p.parent.name)
def test_dockerfiles_are_multi_stage_non_root_pinned_and_labelled(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    stages = _stages(text)
    assert len(stages) >= 2, "multi-stage"
    assert re.search(r"^ARG DEBIAN_IMAGE=debian:12\.\d+-slim$", text, re.MULTILINE), "a pinned Debian point release"
    assert "latest" not in text
    assert re.findall(r"^USER (.+)$", text, re.MULTILINE) == ["1000:1000"]
    assert "useradd --uid 1000 --gid 1000" in text
    for label in LABELS:
        assert f"org.opencontainers.image.{label}=" in text, label
    assert "ARG DEBIAN_IMAGE\n" in stages[-1], "the base.name label needs the ARG in the last stage"
    apt = re.search(r"apt-get install -y --no-install-recommends ([^\\\n]+)", text)
    assert apt is not None and apt.group(1).split() == BASE_PACKAGES
    # Python packages only from a hash-pinned lock, without resolving anything at build time.
    assert "--no-deps" in text and "--require-hashes -r /tmp/requirements.lock" in text
    for lock in re.findall(r"^COPY (images/\S+\.lock)", text, re.MULTILINE):
        assert (REPO / lock).exists(), lock
    # Byte-code compiled at build time: the root filesystem is read-only at run time.
    assert "compileall" in text and "PYTHONDONTWRITEBYTECODE=1" in text
    assert re.search(r"^CMD (.+)$", text, re.MULTILINE).group(1) == CMDS[dockerfile.parent.name]  # type: ignore[union-attr]
    assert re.search(r"^ENV PATH=/opt/venv/bin:", text, re.MULTILINE)


@pytest.mark.parametrize("dockerfile", _dockerfiles(), ids=lambda p: p.parent.name)
def test_dockerfiles_build_offline_with_buildah_and_online_with_docker(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    # A `# syntax=` line makes BuildKit pull a frontend image; RUN --mount needs none with a current Docker.
    assert not re.search(r"^# *syntax=", text, re.MULTILINE | re.IGNORECASE)
    for stage in _stages(text):
        if "pip install" in stage and "-r /tmp/" in stage:
            # Empty defaults: PyPI with Docker; the buildah build passes PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels.
            assert "ARG PIP_NO_INDEX=\n" in stage and "ARG PIP_FIND_LINKS=\n" in stage, stage.splitlines()[0]
    assert "setuptools==" not in text, "build requirements come from images/build-requirements.lock (hashes)"
    # The ignore file (Docker's <Dockerfile>.dockerignore, buildah's --ignorefile) lets in what the Dockerfile copies.
    ignore = dockerfile.with_name("Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore, "everything is left out but what is named"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for source in sources.split():
            assert source in allowed, f"{source} is copied but ignored"


@pytest.mark.parametrize("name", [*sorted(locks.LOCKS), "build"])
def test_locks_pin_every_package_by_hash(name: str) -> None:
    path = locks.BUILD_LOCK if name == "build" else locks.LOCKS[name].path
    text = path.read_text()
    entries = [e for e in text.split("\n") if e and not e.startswith("#") and not e.startswith("    ")]
    blocks = re.split(r"\n(?=[A-Za-z0-9])", "\n".join(line for line in text.splitlines() if not line.startswith("#")))
    assert len(blocks) == len(entries) > (0 if name == "build" else 10)
    for block in blocks:
        assert LOCK_LINE.match(block.strip("\n")), block
    if name != "build":
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


def test_the_local_base_is_imported_under_the_name_the_dockerfiles_use() -> None:
    for dockerfile in _dockerfiles():
        default = re.search(r"^ARG DEBIAN_IMAGE=(\S+)$", dockerfile.read_text(), re.MULTILINE)
        assert default is not None and f"docker.io/library/{default.group(1)}" == images.BASE_IMAGE
    cmd = images.mmdebstrap_cmd(Path("/target"))
    assert "--variant=minbase" in cmd and "bookworm" in cmd
    suites = [source.split()[2] for source in cmd if source.startswith("deb ")]
    assert suites == ["bookworm", "bookworm-updates", "bookworm-security"]


def test_node_images_are_dockerfiles_from_scratch() -> None:
    dockerfiles = sorted(images.NODE_IMAGES_DIR.glob("*/Dockerfile"))
    assert [d.parent.name for d in dockerfiles] == ["busybox", "pause"]
    for dockerfile in dockerfiles:
        text = dockerfile.read_text()
        assert re.findall(r"^FROM (.+)$", text, re.MULTILINE) == ["scratch"]
        # No shell in the image until busybox is in it: exec-form RUN only.
        assert all(run.startswith("[") for run in re.findall(r"^RUN (.+)$", text, re.MULTILINE))
