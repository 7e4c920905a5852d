"""Build lorafleet's container images from their Dockerfiles with buildah (no Docker engine, no registry), then
hand them to containerd.

    python -m lorafleet_dev.images build operator --import [--run -- lorafleet --help]
    python -m lorafleet_dev.images lock operator        # images/operator/requirements.lock (lorafleet_dev.locks)
    python -m lorafleet_dev.images prune                # superseded images and stale caches: the bytes freed

Every image, lorafleet's (images/<name>/Dockerfile) and the node's (tools/lorafleet_dev/node_images/<name>/
Dockerfile), is built one way: ``buildah bud`` of its Dockerfile, as root.

* **base**: the Dockerfiles start ``FROM debian:12.11-slim``. No registry is reachable, so an ``mmdebstrap``
  (minbase, bookworm + updates + security) root filesystem is imported into buildah's storage under exactly that
  name, ``docker.io/library/debian:12.11-slim``. The tar is cached under ``${LORAFLEET_CACHE}/images/debian-base/<hash
  of the recipe>``: built once.
* **build**: ``buildah bud --isolation chroot --network host --layers``: the ``RUN apt-get`` steps use the host's
  network; pip finds every wheel in the wheelhouse (lorafleet_dev.locks), mounted read-only at ``/wheels``, with
  ``--build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels`` (the Dockerfiles' ARGs, empty by default: with
  Docker and internet they use PyPI). ``--layers`` caches every step, so a code change rebuilds the wheel stage
  and the last layer only.
* **import**: ``buildah push IMAGE docker-archive:`` (uncompressed) into ``ctr -n k8s.io images import`` (the
  namespace the kubelet's CRI uses) as ``docker.io/lorafleet/<name>:<version>``, labelled with buildah's image ID
  so an unchanged image is not imported again.
* **disk**: a rebuild leaves the previous image of the ref untagged in buildah's storage (a GB or more each for
  trainer-cpu and vllm-cpu). The last image of each build stage but the final one (``deps``: the pip install,
  1.5 GB for trainer-cpu, 3 GB for vllm-cpu; ``wheel``) is untagged and childless too, "dangling" to buildah, yet it
  is the ``--layers`` cache of the next build: ``buildah rmi --prune`` (or removing every dangling image) would drop
  it. So every build records the images it used or made (``${LORAFLEET_CACHE}/images/layers/<label>.json``) and then
  removes, one ``buildah rmi`` each, the images its previous build used that no build uses any more (the replaced
  image, an old stage); ``prune`` removes the dangling images no build uses (an interrupted build's, an image in use
  at the time) and the caches of the image writers before buildah.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet import __version__
from lorafleet_dev import locks
from lorafleet_dev.build import cache_dir
from lorafleet_dev.paths import IMAGES_DIR, REPO, TOOLS_SOURCES

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY = "http://deb.debian.org/debian-security"
# What the Dockerfiles start FROM (ARG DEBIAN_IMAGE): the local mmdebstrap base is imported under this name.
BASE_IMAGE = "docker.io/library/debian:12.11-slim"
BASE_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*")
BASE_REVISION = "1"  # bump to rebuild the base after a change to base_image() itself
SOURCE_DATE_EPOCH = 1_767_225_600  # 2026-01-01T00:00:00Z
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
CTR_NAMESPACE = "k8s.io"  # the namespace the kubelet's CRI uses
IMAGE_ID_LABEL = "dev.lorafleet.buildah-image-id"  # on containerd's image: what was imported
NODE_IMAGES_DIR = TOOLS_SOURCES / "lorafleet_dev" / "node_images"
# Folders of images_cache() that nothing reads any more: the caches of the hand-written OCI writers that the buildah
# builds replaced (d80c378); removing them freed 6.9 GiB on the development machine. `prune` does.
STALE_CACHE_DIRS = ("deps", "base", "app", "oci")

# Debian packages (command -> package) the build needs; hack/lib/prereqs.sh installs them.
BUILD_TOOLS = {"buildah": "buildah", "mmdebstrap": "mmdebstrap"}
IMPORT_TOOLS = {"containerd": "containerd", "ctr": "containerd", "runc": "runc"}


class ImageBuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class ImageSpec:
    """One of lorafleet's images: its Dockerfile, the lock it installs and the build arguments."""

    name: str
    repository: str
    dockerfile: Path
    build_args: dict[str, str] = field(default_factory=dict)
    lock: str = ""  # lorafleet_dev.locks.LOCKS key (default: name)

    @property
    def lock_spec(self) -> locks.LockSpec:
        return locks.LOCKS[self.lock or self.name]

    @property
    def lock_path(self) -> Path:
        return self.lock_spec.path

    @property
    def ignorefile(self) -> Path:
        return self.dockerfile.with_name(self.dockerfile.name + ".dockerignore")


IMAGES: dict[str, ImageSpec] = {
    spec.name: spec
    for spec in (
        ImageSpec("operator", "lorafleet/operator", IMAGES_DIR / "operator" / "Dockerfile"),
        ImageSpec("trainer", "lorafleet/trainer", IMAGES_DIR / "trainer" / "Dockerfile", {"VARIANT": "cuda"}),
        ImageSpec("trainer-cpu", "lorafleet/trainer-cpu", IMAGES_DIR / "trainer" / "Dockerfile", {"VARIANT": "cpu"}),
        ImageSpec("vllm-cpu", "lorafleet/vllm-cpu", IMAGES_DIR / "vllm-cpu" / "Dockerfile"),
    )
}


@dataclass
class BuiltImage:
    ref: str  # e.g. docker.io/lorafleet/operator:0.1.0
    image_id: str  # buildah's image ID (sha256 of the config): what `import_image` compares
    seconds: dict[str, float] = field(default_factory=dict)
    size: int = 0  # bytes, uncompressed


# --- small helpers ------------------------------------------------------------------------------------------


def images_cache() -> Path:
    return cache_dir() / "images"


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _run(cmd: Sequence[str], *, env: dict[str, str] | None = None, timeout: float | None = None) -> str:
    try:
        proc = subprocess.run(
            list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False,
            timeout=timeout,
        )  # fmt: skip
    except FileNotFoundError as e:
        raise ImageBuildError(f"`{cmd[0]}` is not installed: {e}") from None
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-40:])
        raise ImageBuildError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return proc.stdout


def missing_prerequisites(tools: dict[str, str] | None = None) -> str | None:
    """One line saying what is missing and how to fix it, or None."""
    tools = {**BUILD_TOOLS, **IMPORT_TOOLS} if tools is None else tools
    if os.geteuid() != 0:
        return "building images needs root (buildah's chroot isolation, mounts): run as root (sudo)"
    missing = sorted({pkg for tool, pkg in tools.items() if shutil.which(tool) is None})
    if missing:
        fix = f"apt-get install {' '.join(missing)}"
        return f"missing {', '.join(missing)}: run `{fix}` (bash hack/demo.sh and hack/test.sh install them as root)"
    return None


def require(tools: dict[str, str] | None = None) -> None:
    problem = missing_prerequisites(tools)
    if problem:
        raise ImageBuildError(problem)


def image_inputs(spec: ImageSpec) -> list[str]:
    """The repository paths an image is built from: its Dockerfile, its ignore file and what that lets in."""
    paths = [spec.dockerfile, spec.ignorefile]
    if spec.ignorefile.exists():
        for line in spec.ignorefile.read_text().splitlines():
            if line.startswith("!") and "*" not in line:
                paths.append(REPO / line[1:].rstrip("/"))
    return [str(p.relative_to(REPO)) for p in paths]


def git_revision(paths: Sequence[str] = ()) -> str:
    """The last commit that changed these paths (``-dirty`` when they have uncommitted changes): the image's
    revision label changes with its contents, not with every commit, so an unchanged image is not imported again."""
    try:
        revision = _run(["git", "-C", str(REPO), "log", "-1", "--format=%H", "--", *paths]).strip() or "unknown"
        dirty = _run(["git", "-C", str(REPO), "status", "--porcelain", "--", *paths]).strip()
    except ImageBuildError:
        return "unknown"
    return f"{revision}-dirty" if dirty else revision


def buildah_image_id(ref: str) -> str | None:
    proc = subprocess.run(
        ["buildah", "images", "--no-trunc", "--format", "{{.ID}}", ref], capture_output=True, text=True, check=False
    )
    ids = proc.stdout.split()
    return (ids[0] if ids[0].startswith("sha256:") else f"sha256:{ids[0]}") if proc.returncode == 0 and ids else None


# --- the Debian base --------------------------------------------------------------------------------------------


def mmdebstrap_cmd(target: Path) -> list[str]:
    """A minbase bookworm root filesystem as a tar, like the official slim image (docs, man pages, locales out)."""
    sources = [
        f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE} main",
        f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE}-updates main",
        f"deb {DEBIAN_SECURITY} {DEBIAN_SUITE}-security main",
    ]
    cmd = ["mmdebstrap", "--variant=minbase", "--format=tar", "--aptopt=Acquire::Languages none"]
    cmd += [f"--dpkgopt=path-exclude={pattern}" for pattern in BASE_EXCLUDES]
    cmd.append("--dpkgopt=path-include=/usr/share/doc/*/copyright")  # licences stay
    cmd.append('--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/log/*')
    return [*cmd, DEBIAN_SUITE, str(target), *sources]


def base_image(log: Callable[[str], None] = print) -> str:
    """``debian:12.11-slim`` in buildah's storage, from a cached mmdebstrap tar; returns its image ID."""
    key = _key(json.dumps(mmdebstrap_cmd(Path("/target"))), BASE_REVISION)
    folder = images_cache() / "debian-base" / key
    tar, id_file = folder / "rootfs.tar", folder / "image-id"
    current = buildah_image_id(BASE_IMAGE)
    if current and id_file.exists() and id_file.read_text().strip() == current:
        return current
    if folder.parent.is_dir():  # older recipes: they would only fill the disk
        for old in folder.parent.iterdir():
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    if not tar.exists():
        started = time.monotonic()
        log(f"base: mmdebstrap minbase {DEBIAN_SUITE} (+updates, +security) -> {tar} (once; about a minute)")
        partial = folder / "rootfs.partial"
        _run(mmdebstrap_cmd(partial), env={**os.environ, "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)})
        partial.replace(tar)
        log(f"base: {tar.stat().st_size / 2**20:.0f} MiB in {time.monotonic() - started:.0f}s")
    started = time.monotonic()
    container = _run(["buildah", "from", "--pull-never", "scratch"]).strip()
    try:
        _run(["buildah", "add", container, str(tar), "/"])
        _run(["buildah", "config", "--cmd", "bash", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
              ":/sbin:/bin", "--created-by", f"mmdebstrap --variant=minbase {DEBIAN_SUITE}", container])  # fmt: skip
        _run(["buildah", "commit", "--quiet", "--rm", container, BASE_IMAGE])
    except BaseException:
        subprocess.run(["buildah", "rm", container], capture_output=True, check=False)
        raise
    image_id = buildah_image_id(BASE_IMAGE)
    if image_id is None:
        raise ImageBuildError(f"{BASE_IMAGE} is not in buildah's storage after the import")
    id_file.write_text(image_id + "\n")
    log(f"base: imported as {BASE_IMAGE} ({image_id[:19]}) in {time.monotonic() - started:.0f}s")
    return image_id  # the one it replaced goes with the last image built on it (prune)


# --- builds -------------------------------------------------------------------------------------------------------


def buildah_bud(
    dockerfile: Path,
    context: Path,
    ref: str,
    *,
    build_args: dict[str, str] | None = None,
    volumes: Sequence[str] = (),
    ignorefile: Path | None = None,
    label: str,
    log: Callable[[str], None] = print,
    superseded: Sequence[str | None] = (),
) -> BuiltImage:
    """``buildah bud`` of one Dockerfile, its steps shown as short progress lines, the whole output in a log file.
    Then the images it replaced are removed (`remove_superseded`): the one `ref` named before, the `superseded` IDs
    (an earlier build's record) and what the label's previous build used that no build uses now."""
    previous = buildah_image_id(ref)
    existing = all_image_ids()
    cache_hits: set[str] = set()
    logfile = images_cache() / "logs" / f"{label}.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    # --force-rm: a failed build's working container would keep its images (GBs) until removed by hand.
    cmd = ["buildah", "bud", "--isolation", "chroot", "--network", "host", "--layers", "--force-rm", "--pull-never",
           "--format", "oci", "-f", str(dockerfile), "-t", ref]  # fmt: skip
    if ignorefile is not None and ignorefile.exists():
        cmd += ["--ignorefile", str(ignorefile)]
    for volume in volumes:
        cmd += ["--volume", volume]
    for key, value in (build_args or {}).items():
        cmd += ["--build-arg", f"{key}={value}"]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lorafleet-bud-") as tmp, logfile.open("w") as out:
        iidfile = Path(tmp) / "iid"
        cmd += ["--iidfile", str(iidfile), str(context)]
        out.write(" ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            out.write(line)
            tail = [*tail[-39:], line.rstrip()]
            hit = _CACHE_HIT.match(line)
            if hit:
                cache_hits.add(_sha(hit[1]))
            step = " ".join(line.split())
            instruction = step.split(": ", 1)[1].split(" ", 1)[0] if ("STEP " in step and ": " in step) else ""
            if instruction in ("FROM", "RUN", "COPY", "ADD"):  # the steps that take time; ARG, ENV, LABEL... do not
                log(f"{label}: {step[:110]}{'...' if len(step) > 110 else ''}")
        code = proc.wait()
        if code != 0:
            raise ImageBuildError(f"buildah bud of {dockerfile} failed ({code}); log {logfile}:\n" + "\n".join(tail))
        image_id = iidfile.read_text().strip()
    image_id = _sha(image_id)
    size = _image_size(ref)
    took = time.monotonic() - started
    log(f"{label}: {ref} {image_id[:19]}, {size / 1e6:.0f} MB, built in {took:.0f}s (log {logfile})")
    # What this build used or made: its cache hits and every image new since it started (a concurrent build's
    # too, which only keeps more).
    used = cache_hits | (all_image_ids() - existing) | {image_id}
    remove_superseded(label, ref, image_id, used, [previous, *superseded], log)
    return BuiltImage(ref, image_id, {"build": round(took, 1)}, size)


def _image_size(ref: str) -> int:
    """Uncompressed bytes, as buildah reports them ("394 MB")."""
    out = subprocess.run(["buildah", "images", "--json", ref], capture_output=True, text=True, check=False)
    with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
        number, unit = json.loads(out.stdout)[0]["size"].split()
        return int(float(number) * {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit])
    return 0


# --- disk: superseded images ------------------------------------------------------------------------------------

_CACHE_HIT = re.compile(r"^--> Using cache ([0-9a-f]{64})\s*$")  # buildah bud's line for a step it did not rerun
PRUNE_MIN_AGE = 3600.0  # seconds: prune leaves younger dangling images alone (a build in progress may need them)


def _sha(image_id: str) -> str:
    return image_id if image_id.startswith("sha256:") else f"sha256:{image_id}"


def all_image_ids() -> set[str]:
    """Every image in buildah's storage, intermediate ones (the steps of the ``--layers`` cache) included."""
    return {_sha(i) for i in _run(["buildah", "images", "--all", "--no-trunc", "--format", "{{.ID}}"]).split()}


def dangling_images() -> dict[str, float]:
    """Images with no name and no child image -> when they were created (epoch seconds). Superseded builds, and
    also the last image of every build stage but the final one: see `in_use`."""
    out = _run(["buildah", "images", "--filter", "dangling=true", "--no-trunc", "--json"])
    found: dict[str, float] = {}
    with contextlib.suppress(ValueError, TypeError):
        for image in json.loads(out or "[]") or []:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                found[_sha(str(image["id"]))] = float(image.get("created") or 0)
    return found


def _used_record(label: str) -> Path:
    return images_cache() / "layers" / f"{label}.json"


def _recorded(path: Path) -> set[str]:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return {_sha(str(i)) for i in json.loads(path.read_text())["images"]}
    return set()


def in_use(exclude: str | None = None) -> set[str]:
    """The images that the last build of each label (but `exclude`) used or made, by its record, and the cache
    hits its build log names (for a build made before the records existed). A dangling one among them is the
    cache of a build stage (``deps``: the pip install; ``wheel``), which the next build of that label reuses."""
    ids: set[str] = set()
    for path in sorted((images_cache() / "layers").glob("*.json")):
        if path.stem != exclude:
            ids |= _recorded(path)
    for path in sorted((images_cache() / "logs").glob("*.log")):
        if path.stem != exclude:
            with contextlib.suppress(OSError):
                ids |= {_sha(m[1]) for m in map(_CACHE_HIT.match, path.read_text(errors="replace").splitlines()) if m}
    return ids


def _graphroot() -> Path:
    """buildah's image storage (``/var/lib/containers/storage`` as root)."""
    proc = subprocess.run(
        ["buildah", "info", "--format", "{{.store.GraphRoot}}"], capture_output=True, text=True, check=False
    )
    root = proc.stdout.strip()
    return Path(root) if proc.returncode == 0 and root else Path("/var/lib/containers/storage")


def _disk_bytes(path: Path) -> int | None:
    """``du``: the disk space used under path, in bytes (a second or less for buildah's storage); None when
    unknown."""
    if not path.exists():
        return None
    proc = subprocess.run(["du", "-sx", "--block-size=1", str(path)], capture_output=True, text=True, check=False)
    try:  # du exits 1 when a file vanished while it counted (a concurrent build), and still prints the total
        return int(proc.stdout.split()[0])
    except (ValueError, IndexError):
        return None


def _gib(n: int | None) -> str:
    return "? GiB" if n is None else f"{n / 2**30:.2f} GiB"


def remove_images(ids: Sequence[str]) -> tuple[list[str], list[str], int | None]:
    """``buildah rmi`` of each image ID, one at a time and not forced (an image a container uses, or one that other
    images build on, stays; buildah also removes the parents it leaves unnamed and childless). Returns (removed,
    failed as "id: reason", bytes freed in buildah's storage or None). One gone already is neither."""
    root = _graphroot()
    before = _disk_bytes(root)
    removed: list[str] = []
    failed: list[str] = []
    for image_id in ids:
        proc = subprocess.run(["buildah", "rmi", image_id], capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            removed.append(image_id)
        elif "image not known" not in proc.stderr:  # removed with a child removed before it
            reason = " ".join(proc.stderr.split()).removeprefix("Error: 1 error occurred: * ")
            failed.append(f"{image_id[7:19]}: {reason[:160]}")
    if not removed:
        return removed, failed, 0
    after = _disk_bytes(root)
    return removed, failed, (max(0, before - after) if before is not None and after is not None else None)


def remove_superseded(
    label: str,
    ref: str,
    new_id: str,
    used: set[str],
    old_ids: Sequence[str | None] = (),
    log: Callable[[str], None] = print,
) -> None:
    """After the build of `label` made `new_id` (`ref`) using the images `used` (recorded here for the next build
    and for prune), remove what it replaced and nothing else builds on: the images `old_ids` (what `ref` named
    before) and those the label's previous build used that no build uses now (an old ``deps`` stage after a lock
    change), as far as they are dangling. Untagged and unused they only fill the disk (a GB and more per rebuild of
    trainer-cpu or vllm-cpu); the ``--layers`` cache of every current build stays (``buildah rmi --prune`` would
    drop its stages). A failure (an image a container still uses) only logs."""
    record = _used_record(label)
    previous = _recorded(record)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"ref": ref, "image_id": new_id, "images": sorted(used)}, indent=1) + "\n")
    candidates = ({_sha(i) for i in old_ids if i} | previous) - used - in_use(exclude=label)
    stale = sorted(candidates & set(dangling_images()))
    if not stale:
        return
    removed, failed, freed = remove_images(stale)
    done = f"removed {len(removed)} superseded image(s) ({_gib(freed)} freed)" if removed else ""
    kept = f"kept {'; '.join(failed)}" if failed else ""
    log(f"{label}: {ref}: {'; '.join(x for x in (done, kept) if x)}")


def stale_containers(min_age: float = PRUNE_MIN_AGE) -> list[str]:
    """buildah's working containers older than `min_age` seconds (by their folder in the storage): left by an
    interrupted build or base import, each keeps its image and that image's parents."""
    root = _graphroot() / "overlay-containers"
    now = time.time()
    found = []
    with contextlib.suppress(ValueError, TypeError):
        for container in json.loads(_run(["buildah", "containers", "--json"]) or "[]") or []:
            with contextlib.suppress(KeyError, TypeError, OSError):
                if container["builder"] and now - (root / container["id"]).stat().st_mtime >= min_age:
                    found.append(str(container["id"]))
    return found


def prune(log: Callable[[str], None] = print, min_age: float = PRUNE_MIN_AGE) -> int:
    """Remove what lorafleet's builds left and no build uses, all of it rebuilt when needed: buildah's working
    containers older than `min_age` seconds (interrupted builds), then, one ``buildah rmi`` each, the dangling
    images that no build uses (`in_use`: not the stages of the ``--layers`` cache) and that are older than
    `min_age` (a build running now may still need a younger one), again while removals leave more of them
    dangling, and the stale caches under images_cache() (STALE_CACHE_DIRS). Returns the bytes freed (buildah's
    storage measured with du before and after, the cache folders before removal)."""
    require({"buildah": "buildah"})
    before = _disk_bytes(_graphroot())
    containers = stale_containers(min_age)
    for container in containers:
        subprocess.run(["buildah", "rm", container], capture_output=True, check=False)
    keep = in_use()
    removed: list[str] = []
    tried: set[str] = set()
    for _ in range(5):  # removing an image can leave its parent dangling
        now = time.time()
        ids = sorted(
            i for i, created in dangling_images().items() if i not in keep | tried and now - created >= min_age
        )
        if not ids:
            break
        tried |= set(ids)
        done, failed, _ = remove_images(ids)
        removed += done
        for failure in failed:
            log(f"prune: kept {failure}")
    after = _disk_bytes(_graphroot())
    freed_images = max(0, before - after) if before is not None and after is not None else None
    freed_cache = 0
    stale = [images_cache() / name for name in STALE_CACHE_DIRS if (images_cache() / name).is_dir()]
    for folder in stale:
        freed_cache += _disk_bytes(folder) or 0
        shutil.rmtree(folder, ignore_errors=True)
    total = (freed_images or 0) + freed_cache
    log(
        f"prune: removed {len(containers)} stale working containers and {len(removed)} dangling images "
        f"({_gib(freed_images)}; the build stages in use and anything younger than {min_age / 60:.0f} min stay), "
        f"stale caches {', '.join(str(f) for f in stale) or 'none'} ({_gib(freed_cache)}): {_gib(total)} freed"
    )
    return total


def build(name: str, tag: str = __version__, log: Callable[[str], None] = print) -> BuiltImage:
    """Build images/<name>/Dockerfile with buildah (the base and the wheelhouse prepared first)."""
    if name not in IMAGES:
        raise ImageBuildError(f"unknown image {name!r}; known: {', '.join(IMAGES)}")
    spec = IMAGES[name]
    if not spec.lock_path.exists():
        raise ImageBuildError(f"{spec.lock_path} is missing: run `hack/images/build lock {spec.lock_spec.name}`")
    require(BUILD_TOOLS)
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    base_id = base_image(log)
    seconds["base"] = round(time.monotonic() - t0, 1)
    t1 = time.monotonic()
    try:
        house = locks.wheelhouse(spec.lock_spec, log)
    except locks.LockError as e:
        raise ImageBuildError(str(e)) from None
    seconds["wheels"] = round(time.monotonic() - t1, 1)
    args = {
        **spec.build_args,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": "/wheels",
        "VERSION": tag,
        "REVISION": git_revision(image_inputs(spec)),
    }
    ref = f"docker.io/{spec.repository}:{tag}"
    # Even with every step cached, buildah hashes each COPY's source to find its cache entry (3 GB of venv for
    # vllm-cpu: a minute or two here). When nothing the build reads has changed, the image it built is the answer.
    inputs = inputs_digest(spec, args, base_id)
    record = images_cache() / "built" / f"{name}.json"
    recorded: str | None = None  # the image the previous build produced: superseded if this one differs
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        previous = json.loads(record.read_text())
        recorded = str(previous["image_id"])
        if previous["inputs"] == inputs and buildah_image_id(ref) == previous["image_id"]:
            log(f"{name}: {ref} {previous['image_id'][:19]} is up to date (no input changed)")
            return BuiltImage(ref, previous["image_id"], {**seconds, "build": 0.0}, int(previous.get("size", 0)))
    image = buildah_bud(
        spec.dockerfile, REPO, ref, build_args=args, volumes=[f"{house}:/wheels:ro"], ignorefile=spec.ignorefile,
        label=name, log=log, superseded=[recorded],
    )  # fmt: skip
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"inputs": inputs, "image_id": image.image_id, "size": image.size}) + "\n")
    image.seconds = {**seconds, **image.seconds}
    return image


def inputs_digest(spec: ImageSpec, args: dict[str, str], base_id: str) -> str:
    """A digest of everything the build of `spec` reads: its inputs (files, sorted, byte-compiled and egg-info
    left out as the ignore files do), the build arguments and the base image."""
    digest = hashlib.sha256(json.dumps([args, base_id, BASE_REVISION]).encode())
    for rel in sorted(image_inputs(spec)):
        path = REPO / rel
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            parts = file.relative_to(REPO).parts
            if "__pycache__" in parts or file.suffix == ".pyc" or any(x.endswith(".egg-info") for x in parts):
                continue
            digest.update(f"\0{file.relative_to(REPO)}\0".encode())
            digest.update(file.read_bytes() if file.exists() else b"(missing)")
    return digest.hexdigest()


def build_context(files: dict[str, Path], dest: Path) -> Path:
    """A build context of the given files (name in the context -> file here), copied (hard links would carry the
    binary cache's inode into buildah's COPY, which is fine, but a copy keeps the cache out of the build)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        if not source.is_file():
            raise ImageBuildError(f"{source} is missing (the {name} of a node image): run `hack/node build` as root")
        shutil.copy2(source, dest / name)
    return dest


def build_node_image(name: str, ref: str, files: dict[str, Path], log: Callable[[str], None] = print) -> BuiltImage:
    """A node image (tools/lorafleet_dev/node_images/<name>/Dockerfile: FROM scratch + static binaries)."""
    require({"buildah": "buildah"})
    dockerfile = NODE_IMAGES_DIR / name / "Dockerfile"
    with tempfile.TemporaryDirectory(prefix=f"lorafleet-{name}-") as tmp:
        context = build_context(files, Path(tmp))
        for extra in (NODE_IMAGES_DIR / name).iterdir():
            if extra.name != "Dockerfile":
                shutil.copy2(extra, context / extra.name)
        return buildah_bud(dockerfile, context, ref, label=f"node-{name}", log=log)


# --- containerd ----------------------------------------------------------------------------------------------------


def containerd_running(sock: str = CONTAINERD_SOCKET) -> bool:
    if not Path(sock).exists():
        return False
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(sock)
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
    require(IMPORT_TOOLS)
    logfile = cache_dir() / "containerd.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with logfile.open("ab") as out:
        proc = subprocess.Popen(["containerd"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
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


def ctr(*args: str, address: str = CONTAINERD_SOCKET, timeout: float = 600) -> str:
    return _run(["ctr", f"--address={address}", "-n", CTR_NAMESPACE, *args], timeout=timeout)


def imported_ids(address: str = CONTAINERD_SOCKET) -> dict[str, str]:
    """ref -> the buildah image ID it was imported from (by `import_image`), for every image containerd holds."""
    out: dict[str, str] = {}
    for line in ctr("images", "ls", address=address, timeout=60).splitlines()[1:]:
        parts = line.split()
        if not parts:
            continue
        for label in parts[-1].split(","):
            key, _, value = label.partition("=")
            if key == IMAGE_ID_LABEL:
                out[parts[0]] = value
    return out


def import_image(
    image: BuiltImage, log: Callable[[str], None] = print, address: str = CONTAINERD_SOCKET, force: bool = False
) -> float:
    """Import the image into containerd's k8s.io namespace unless it holds this build already (needs a running
    containerd: see `containerd()`). Returns the seconds it took (0 when skipped)."""
    if not force and imported_ids(address).get(image.ref) == image.image_id:
        log(f"import: {image.ref} ({image.image_id[:19]}) already in containerd")
        return 0.0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lorafleet-import-", dir=images_cache()) as tmp:
        # A FIFO: buildah writes the uncompressed docker-archive while ctr reads it, no copy on disk.
        archive = Path(tmp) / "image.tar"
        os.mkfifo(archive)
        importer = subprocess.Popen(
            ["ctr", f"--address={address}", "-n", CTR_NAMESPACE, "images", "import", "--platform=linux/amd64",
             str(archive)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            _run(["buildah", "push", "--quiet", image.ref, f"docker-archive:{archive}:{image.ref}"])
        except BaseException:
            importer.kill()
            importer.wait()
            raise
        out, _ = importer.communicate(timeout=1800)
        if importer.returncode != 0:
            raise ImageBuildError(f"ctr images import of {image.ref} failed ({importer.returncode}):\n{out}")
    ctr("images", "label", image.ref, f"{IMAGE_ID_LABEL}={image.image_id}", address=address)
    took = time.monotonic() - started
    log(f"import: {image.ref} into containerd namespace {CTR_NAMESPACE} in {took:.1f}s")
    return took


def save_archive(image: BuiltImage, path: Path) -> None:
    """An OCI archive of the image (for skopeo, or another node's `ctr images import`)."""
    _run(["buildah", "push", "--quiet", "--format", "oci", image.ref, f"oci-archive:{path}:{image.ref}"])


def run_in_image(
    ref: str, args: Sequence[str], log: Callable[[str], None] = print, *, read_only: bool = False,
    address: str = CONTAINERD_SOCKET,
) -> str:  # fmt: skip
    """`ctr run --rm` of args in the image (as its user), returning the output."""
    container = f"lorafleet-smoke-{os.getpid()}-{time.monotonic_ns()}"
    started = time.monotonic()
    out = ctr("run", "--rm", *(["--read-only"] if read_only else []), ref, container, *args, address=address)
    log(f"run: {' '.join(args)} in {ref} in {time.monotonic() - started:.1f}s")
    return out


# --- CLI -------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hack/images/build", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build an image from its Dockerfile with buildah")
    b.add_argument("name", choices=sorted(IMAGES))
    b.add_argument("--tag", default=__version__)
    b.add_argument("--import", dest="do_import", action="store_true", help="ctr -n k8s.io images import it")
    b.add_argument("--archive", type=Path, help="also write an OCI archive (tar) of the image to this file")
    b.add_argument("--run", action="store_true", help="import, then `ctr run` the arguments after -- in the image")
    lk = sub.add_parser("lock", help="regenerate images/<name>/requirements.lock")
    lk.add_argument("name", choices=sorted(locks.LOCKS))
    sub.add_parser("prune", help="remove dangling (superseded) images and stale caches; prints the bytes freed")
    argv = list(sys.argv[1:] if argv is None else argv)
    run_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    log: Callable[[str], None] = lambda msg: print(f"[images] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        if args.command == "lock":
            locks.lock(args.name, log)
            return 0
        if args.command == "prune":
            print(json.dumps({"freed_bytes": prune(log)}))
            return 0
        started = time.monotonic()
        image = build(args.name, args.tag, log)
        if args.archive:
            save_archive(image, args.archive)
        if args.do_import or args.run:
            with containerd(log):
                image.seconds["import"] = round(import_image(image, log), 1)
                if args.run:
                    print(run_in_image(image.ref, run_args or ["true"], log), end="")
        image.seconds["total"] = round(time.monotonic() - started, 1)
        print(json.dumps({"ref": image.ref, "id": image.image_id, "mb": round(image.size / 1e6),
                          "seconds": image.seconds}))  # fmt: skip
    except (ImageBuildError, locks.LockError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
