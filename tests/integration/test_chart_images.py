"""The operator image the chart runs, built from images/operator/Dockerfile by buildah (lorafleet_dev.images: no
Docker engine, no registry), imported into containerd and run with runc: `lorafleet --help` works, as uid 1000 with a
read-only root filesystem (as the chart's Deployment runs it), with every module the operator, the sidecar and the
model fetcher import, and none of the developer harness (lorafleet_dev) in it.

Needs root, buildah, mmdebstrap, containerd and runc (Debian packages; hack/test.sh installs them); skipped with the
one-line fix otherwise. The first build takes two to four minutes (the Debian base, the wheelhouse and buildah's
layer cache are then kept); a rebuild with nothing changed takes seconds.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from lorafleet_dev import images

MISSING = images.missing_prerequisites()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))
QUIET = lambda _: None  # noqa: E731


@pytest.fixture(scope="module")
def operator_image() -> Iterator[images.BuiltImage]:
    image = images.build("operator", log=QUIET)
    with images.containerd(log=QUIET):  # the running one, or one started (and stopped) for these tests
        images.import_image(image, log=QUIET)
        yield image


def test_operator_image_runs_lorafleet_as_uid_1000(operator_image: images.BuiltImage) -> None:
    assert "operator" in images.run_in_image(operator_image.ref, ["lorafleet", "--help"], log=QUIET)
    assert images.run_in_image(operator_image.ref, ["id", "-u"], log=QUIET).strip() == "1000"


def test_operator_image_works_on_a_read_only_root(operator_image: images.BuiltImage) -> None:
    code = (
        "import lorafleet.controllers.runtime, lorafleet.serving.sync, lorafleet.storage.cli, kopf, boto3, aiohttp;"
        "import lorafleet; print(lorafleet.__version__)"
    )
    out = images.run_in_image(operator_image.ref, ["python", "-c", code], log=QUIET, read_only=True)
    assert out.strip() == images.__version__


def test_operator_image_holds_no_harness_code(operator_image: images.BuiltImage) -> None:
    with pytest.raises(images.ImageBuildError, match="No module named 'lorafleet_dev'"):
        images.run_in_image(operator_image.ref, ["python", "-c", "import lorafleet_dev"], log=QUIET, read_only=True)
    code = "import lorafleet, pathlib; print(sorted(p.name for p in pathlib.Path(lorafleet.__file__).parent.iterdir()))"
    listing = images.run_in_image(operator_image.ref, ["python", "-c", code], log=QUIET, read_only=True)
    assert "'controllers'" in listing and "'dev'" not in listing
    found = images.run_in_image(
        operator_image.ref,
        ["find", "/opt/venv", "-name", "lorafleet_dev*", "-o", "-path", "*/lorafleet/dev"],
        log=QUIET,
    )
    assert found.strip() == ""


def test_an_unchanged_rebuild_is_cached_and_not_imported_again(operator_image: images.BuiltImage) -> None:
    started = time.monotonic()
    again = images.build("operator", log=QUIET)
    took = time.monotonic() - started
    assert again.image_id == operator_image.image_id, "the same sources give the same image"
    assert took < 90, f"a rebuild with every step cached took {took:.0f}s"
    assert images.import_image(again, log=QUIET) == 0.0, "containerd holds this build already"


def test_the_image_was_built_from_the_dockerfile(operator_image: images.BuiltImage) -> None:
    out = subprocess.run(
        ["buildah", "inspect", "--type", "image", "--format", "{{.OCIv1.Config.User}} {{.OCIv1.Config.Labels}}",
         operator_image.ref],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out.startswith("1000:1000 ")
    assert "org.opencontainers.image.base.name:debian:12.11-slim" in out
    assert f"org.opencontainers.image.version:{images.__version__}" in out
    assert os.path.exists(images.IMAGES["operator"].dockerfile)
