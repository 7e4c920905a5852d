"""Build pinned upstream Kubernetes components from source through the Go module proxy.

Binaries are cached by version under ``${LORAFLEET_CACHE:-~/.cache/lorafleet}/bin/<component>-<version>/``
(outside the repository), so only the first build pays the compile cost.

* kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kubelet, kube-proxy come from
  ``k8s.io/kubernetes`` at one pinned release. ``go install`` cannot build them (the release's go.mod
  replaces every ``k8s.io/*`` staging module with a local path), so a wrapper module under
  ``${LORAFLEET_CACHE}/src/kubernetes-<version>/`` requires the release and replaces each staging module,
  read from the release's own go.mod, with its published ``v0.Y.Z`` tag.
* etcd is built the same way at the version the Kubernetes release pins (``go.etcd.io/etcd/server/v3``).
* kwok and helm have no replace directives and are built with ``go install <pkg>@<version>``.

Versions can be overridden with ``LORAFLEET_KUBERNETES_VERSION``, ``LORAFLEET_KWOK_VERSION`` and
``LORAFLEET_HELM_VERSION``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

# 1.34: the last minor whose kubelet runs on cgroup v1 without opting out (1.35 needs failCgroupV1: false)
# and still supports containerd 1.x (dropped in 1.36); see docs/cluster.md.
KUBERNETES_VERSION = os.environ.get("LORAFLEET_KUBERNETES_VERSION", "v1.34.4")
KWOK_VERSION = os.environ.get("LORAFLEET_KWOK_VERSION", "v0.8.0")
HELM_VERSION = os.environ.get("LORAFLEET_HELM_VERSION", "v3.22.0")

KUBERNETES_MODULE = "k8s.io/kubernetes"
ETCD_MODULE = "go.etcd.io/etcd/server/v3"


@dataclass(frozen=True)
class Component:
    name: str
    source: str  # which pinned upstream it is built from: kubernetes | etcd | kwok | helm
    package: str  # Go package path of the main package


COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("kube-apiserver", "kubernetes", "k8s.io/kubernetes/cmd/kube-apiserver"),
        Component("kube-controller-manager", "kubernetes", "k8s.io/kubernetes/cmd/kube-controller-manager"),
        Component("kube-scheduler", "kubernetes", "k8s.io/kubernetes/cmd/kube-scheduler"),
        Component("kubectl", "kubernetes", "k8s.io/kubernetes/cmd/kubectl"),
        Component("kubelet", "kubernetes", "k8s.io/kubernetes/cmd/kubelet"),
        Component("kube-proxy", "kubernetes", "k8s.io/kubernetes/cmd/kube-proxy"),
        Component("etcd", "etcd", "."),
        Component("kwok", "kwok", "sigs.k8s.io/kwok/cmd/kwok"),
        Component("helm", "helm", "helm.sh/helm/v3/cmd/helm"),
    )
}
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok")
DEFAULT_BUILD = (*CONTROL_PLANE, "helm")
NODE_COMPONENTS = ("kubelet", "kube-proxy")

# kwok's own default stages, copied next to the kwok binary at build time (up then needs no Go).
KWOK_STAGE_FILES = (
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
)

_STAGING_RE = re.compile(r"^\s*(?:replace\s+)?(k8s\.io/[\w.\-/]+)\s+=>\s+\./staging/", re.MULTILINE)
_ETCD_RE = re.compile(r"^\s*go\.etcd\.io/etcd/server/v3\s+(v\S+)", re.MULTILINE)


class BuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("LORAFLEET_CACHE") or "~/.cache/lorafleet").expanduser()


def staging_modules(gomod: str) -> list[str]:
    """The k8s.io/* modules a Kubernetes release's go.mod replaces with ./staging paths."""
    return sorted(set(_STAGING_RE.findall(gomod)))


def etcd_version_from_gomod(gomod: str) -> str:
    m = _ETCD_RE.search(gomod)
    if not m:
        raise BuildError("no go.etcd.io/etcd/server/v3 requirement in the Kubernetes go.mod")
    return m.group(1)


def staging_version(kubernetes_version: str) -> str:
    """v1.34.4 -> v0.34.4 (the tag of the published staging modules)."""
    m = re.fullmatch(r"v1\.(\d+\.\d+.*)", kubernetes_version)
    if not m:
        raise BuildError(f"unexpected Kubernetes version {kubernetes_version!r}")
    return f"v0.{m.group(1)}"


def kubernetes_ldflags(version: str) -> list[str]:
    """-X flags so that `kubectl version` and /version report the pinned release."""
    m = re.match(r"v(\d+)\.(\d+)", version)
    assert m, version
    values = {
        "gitVersion": version,
        "gitMajor": m.group(1),
        "gitMinor": m.group(2),
        "gitTreeState": "clean",
        "buildDate": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return [
        f"-X {pkg}.{key}={val}"
        for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
        for key, val in values.items()
    ]


class Builder:
    """Builds components on demand and returns the paths of the cached binaries."""

    def __init__(self, cache: Path | None = None, log: Callable[[str], None] = print) -> None:
        self.cache = cache or cache_dir()
        self.log = log
        self._etcd_version: str | None = None

    # -- versions and paths -------------------------------------------------------------------------

    def version(self, component: str) -> str:
        source = COMPONENTS[component].source
        if source == "kubernetes":
            return KUBERNETES_VERSION
        if source == "kwok":
            return KWOK_VERSION
        if source == "helm":
            return HELM_VERSION
        return self.etcd_version()

    def etcd_version(self) -> str:
        """The etcd version pinned by the Kubernetes release (remembered so a warm start needs no Go)."""
        if self._etcd_version:
            return self._etcd_version
        pin = self.cache / "src" / f"kubernetes-{KUBERNETES_VERSION}" / "etcd-version"
        if not pin.exists():
            version = etcd_version_from_gomod(self._kubernetes_gomod())
            pin.parent.mkdir(parents=True, exist_ok=True)
            pin.write_text(version + "\n")
        self._etcd_version = pin.read_text().strip()
        return self._etcd_version

    def path(self, component: str) -> Path:
        return self.cache / "bin" / f"{component}-{self.version(component)}" / component

    def missing(self, components: Iterable[str]) -> list[str]:
        return [c for c in components if not self.path(c).exists()]

    # -- building -----------------------------------------------------------------------------------

    def ensure(self, components: Iterable[str] = DEFAULT_BUILD) -> dict[str, Path]:
        """Build whatever is not cached yet; one `go build` per upstream so compile work is shared."""
        wanted = list(dict.fromkeys(components))
        unknown = [c for c in wanted if c not in COMPONENTS]
        if unknown:
            raise BuildError(f"unknown components {unknown}; known: {sorted(COMPONENTS)}")
        todo = self.missing(wanted)
        by_source: dict[str, list[str]] = {}
        for c in todo:
            by_source.setdefault(COMPONENTS[c].source, []).append(c)
        for source, names in by_source.items():
            if not shutil.which("go"):
                raise BuildError(f"cannot build {names}: `go` is not on PATH (needed once to fill the cache)")
            start = time.monotonic()
            if source == "kubernetes":
                self._build_kubernetes(names)
            elif source == "etcd":
                self._build_etcd()
            elif source == "kwok":
                self._go_install("kwok", KWOK_VERSION, [])
                self._copy_kwok_stages()
            else:
                self._go_install("helm", HELM_VERSION, [f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}"])
            took = time.monotonic() - start
            self.log(f"built {', '.join(names)} in {took:.0f}s")
            self._record_time(names, took)
        return {c: self.path(c) for c in wanted}

    def _record_time(self, names: list[str], seconds: float) -> None:
        record = self.cache / "bin" / "build-times.json"
        data = json.loads(record.read_text()) if record.exists() else {}
        data[",".join(f"{n}-{self.version(n)}" for n in names)] = round(seconds, 1)
        record.write_text(json.dumps(data, indent=2) + "\n")

    def _go(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
        full_env = {**os.environ, "CGO_ENABLED": "0", **(env or {})}
        self.log(f"+ (cd {cwd} && go {' '.join(args)})")
        proc = subprocess.run(["go", *args], cwd=cwd, env=full_env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"go {' '.join(args[:2])} failed in {cwd}:\n{proc.stderr[-4000:]}")
        return proc.stdout

    def _kubernetes_gomod(self) -> str:
        tmp = self.cache / "src"
        tmp.mkdir(parents=True, exist_ok=True)
        out = self._go(["mod", "download", "-json", f"{KUBERNETES_MODULE}@{KUBERNETES_VERSION}"], tmp)
        return Path(json.loads(out)["GoMod"]).read_text()

    def _wrapper_module(self, name: str, gomod: str, files: dict[str, str]) -> Path:
        """Create (once) a module that builds upstream code; `go mod tidy` reruns only when inputs change."""
        src = self.cache / "src" / name
        src.mkdir(parents=True, exist_ok=True)
        stamp = src / "go.mod.in"
        inputs = gomod + "".join(f"\n--- {k}\n{v}" for k, v in sorted(files.items()))
        if stamp.exists() and stamp.read_text() == inputs and (src / "go.sum").exists():
            return src
        (src / "go.mod").write_text(gomod)
        for fname, text in files.items():
            (src / fname).write_text(text)
        self._go(["mod", "tidy"], src)
        stamp.write_text(inputs)
        return src

    def _install(self, built: Path, component: str) -> None:
        dest = self.path(component)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copy2(built, tmp)
        tmp.chmod(0o755)
        tmp.replace(dest)  # atomic: a half-written binary is never mistaken for a cached one

    def _build_kubernetes(self, names: list[str]) -> None:
        gomod = self._kubernetes_gomod()
        staging = staging_modules(gomod)
        if not staging:
            raise BuildError("found no staging replace directives in the Kubernetes go.mod")
        sv = staging_version(KUBERNETES_VERSION)
        replaces = "\n".join(f"\t{m} => {m} {sv}" for m in staging)
        wrapper_mod = (
            f"module lorafleet.local/build/kubernetes\n\ngo 1.24.0\n\n"
            f"require {KUBERNETES_MODULE} {KUBERNETES_VERSION}\n\nreplace (\n{replaces}\n)\n"
        )
        # A tools file keeps every buildable command in the module graph, so `go mod tidy` runs once.
        imports = "\n".join(f'\t_ "{c.package}"' for c in COMPONENTS.values() if c.source == "kubernetes")
        tools = f"//go:build tools\n\npackage tools\n\nimport (\n{imports}\n)\n"
        src = self._wrapper_module(f"kubernetes-{KUBERNETES_VERSION}", wrapper_mod, {"tools.go": tools})
        ldflags = " ".join(["-s", "-w", *kubernetes_ldflags(KUBERNETES_VERSION)])
        with tempfile.TemporaryDirectory(dir=self.cache) as out:
            self._go(
                [
                    "build",
                    "-trimpath",
                    f"-ldflags={ldflags}",
                    "-o",
                    out + "/",
                    *(COMPONENTS[n].package for n in names),
                ],
                src,
            )
            for n in names:
                self._install(Path(out) / n, n)

    def _build_etcd(self) -> None:
        version = self.etcd_version()
        gomod = f"module lorafleet.local/build/etcd\n\ngo 1.24.0\n\nrequire {ETCD_MODULE} {version}\n"
        # etcd's own server/main.go is exactly this; its module cannot be `go install`ed (replace directives).
        main = (
            'package main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\n'
            "func main() {\n\tetcdmain.Main(os.Args)\n}\n"
        )
        src = self._wrapper_module(f"etcd-{version}", gomod, {"main.go": main})
        with tempfile.TemporaryDirectory(dir=self.cache) as out:
            self._go(["build", "-trimpath", "-ldflags=-s -w", "-o", f"{out}/etcd", "."], src)
            self._install(Path(out) / "etcd", "etcd")

    def _go_install(self, component: str, version: str, xflags: list[str]) -> None:
        pkg = COMPONENTS[component].package
        ldflags = " ".join(["-s", "-w", *xflags])
        with tempfile.TemporaryDirectory(dir=self.cache) as out:
            self._go(
                ["install", "-trimpath", f"-ldflags={ldflags}", f"{pkg}@{version}"],
                self.cache,
                {"GOBIN": out},
            )
            self._install(Path(out) / component, component)

    def _copy_kwok_stages(self) -> None:
        out = self._go(["mod", "download", "-json", f"sigs.k8s.io/kwok@{KWOK_VERSION}"], self.cache)
        src = Path(json.loads(out)["Dir"])
        dest = self.kwok_stages_dir()
        dest.mkdir(parents=True, exist_ok=True)
        for rel in KWOK_STAGE_FILES:
            shutil.copyfile(src / rel, dest / Path(rel).name)

    def kwok_stages_dir(self) -> Path:
        return self.path("kwok").parent / "stages"
