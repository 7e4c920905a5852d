"""The product wheel ships the product only: built with pip from the checkout's sources, it holds no harness module
(nothing under lorafleet/dev, no lorafleet_dev, no serving/local.py, no tests), and in a fresh virtualenv with only
that wheel installed (no system site packages) `import lorafleet` works while `import lorafleet.dev` and
`import lorafleet_dev` fail. The harness is its own distribution, lorafleet-dev (tools/pyproject.toml).

The sources are copied first (pyproject.toml, README.md, operator/ less caches and egg-info): setuptools' build/
folder keeps files of earlier builds, and a test of what the sources ship must not see them, nor write into the
checkout.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HARNESS_PREFIXES = ("lorafleet/dev/", "lorafleet_dev/", "tests/")
HARNESS_FILES = ("lorafleet/serving/local.py",)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "operator", src / "operator", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path_factory.mktemp("dist")
    # --no-build-isolation: setuptools from this venv (an isolated build would fetch it from an index).
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = dist.glob("lorafleet-*.whl")
    return built


def test_wheel_holds_no_harness_module(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "lorafleet/__init__.py" in names and "lorafleet/cli.py" in names, names
    harness = [n for n in names if n.startswith(HARNESS_PREFIXES) or n in HARNESS_FILES]
    assert not harness, f"the product wheel ships harness files: {harness}"
    tops = {n.split("/")[0] for n in names} - {"lorafleet"}
    assert all(top.endswith(".dist-info") for top in tops), f"the wheel ships more than lorafleet: {tops}"


def test_fresh_venv_with_the_wheel_imports_no_harness(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=False, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    def imports(module: str) -> subprocess.CompletedProcess[str]:
        # -I: isolated mode, neither the working directory nor PYTHONPATH (which may name the checkout) on sys.path.
        return subprocess.run(
            [str(python), "-I", "-c", f"import {module}; print({module}.__file__)"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=tmp_path,
        )

    product = imports("lorafleet")
    assert product.returncode == 0, product.stderr
    assert str(env_dir) in product.stdout, f"lorafleet came from {product.stdout.strip()}, not the fresh venv"
    for module in ("lorafleet.dev", "lorafleet_dev", "lorafleet.serving.local"):
        proc = imports(module)
        missing = f"No module named '{module}'"
        assert proc.returncode != 0 and missing in proc.stderr, f"{module}: {proc.stdout}{proc.stderr}"
