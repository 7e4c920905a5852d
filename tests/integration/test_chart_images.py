"""The operator image the chart runs, built here without a Docker engine (lorafleet.dev.images), imported into
containerd and run with runc: `lorafleet --help` works, as uid 1000 with a read-only root filesystem (as the chart's
Deployment runs it), with every module the operator, the sidecar and the model fetcher import.

Needs root, mmdebstrap, containerd and runc (Debian packages); skipped with the reason otherwise. The first build
takes one to three minutes (the Debian base and the dependency layer are then cached); a rebuild after a code change
takes seconds.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator

import pytest

from lorafleet.dev import images

MISSING = [tool for tool in ("mmdebstrap", "containerd", "ctr", "runc") if shutil.which(tool) is None]
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="building images needs root (chroot, overlay mounts)"),
    pytest.mark.skipif(bool(MISSING), reason=f"apt-get install {' '.join(sorted(set(MISSING) - {'ctr'}))}"),
]


@pytest.fixture(scope="module")
def operator_image() -> Iterator[images.BuiltImage]:
    image = images.build("operator", log=lambda _: None)
    with images.containerd(log=lambda _: None):  # the running one, or one started (and stopped) for these tests
        images.import_image(image, log=lambda _: None)
        yield image


def test_operator_image_runs_lorafleet_as_uid_1000(operator_image: images.BuiltImage) -> None:
    assert "operator" in images.run_in_image(operator_image.ref, ["lorafleet", "--help"], log=lambda _: None)
    assert images.run_in_image(operator_image.ref, ["id", "-u"], log=lambda _: None).strip() == "1000"


def test_operator_image_works_on_a_read_only_root(operator_image: images.BuiltImage) -> None:
    code = (
        "import lorafleet.controllers.runtime, lorafleet.serving.sync, lorafleet.storage.cli, kopf, boto3, aiohttp;"
        "import lorafleet; print(lorafleet.__version__)"
    )
    out = images.ctr("run", "--rm", "--read-only", operator_image.ref, f"lorafleet-ro-{os.getpid()}",
                     "python", "-c", code)  # fmt: skip
    assert out.strip() == images.__version__


def test_a_code_change_rebuilds_only_the_app_layer_in_seconds(operator_image: images.BuiltImage) -> None:
    started = time.monotonic()
    again = images.build("operator", log=lambda _: None)
    took = time.monotonic() - started
    assert [layer.diff_id for layer in again.layers[:2]] == [layer.diff_id for layer in operator_image.layers[:2]]
    assert again.layers[2].diff_id == operator_image.layers[2].diff_id, "the same sources give the same layer"
    assert took < 60, f"a rebuild with cached base and deps took {took:.0f}s"
