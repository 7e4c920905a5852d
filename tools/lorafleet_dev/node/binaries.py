"""The node's binaries and images: kubelet and kube-proxy (lorafleet_dev.build), CoreDNS and pause built here
through the Go module proxy, and the pause and busybox images (lorafleet_dev.images, from node_images/)."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lorafleet_dev import images
from lorafleet_dev.build import NODE_COMPONENTS, Builder, BuildError, cache_dir
from lorafleet_dev.images import BuiltImage
from lorafleet_dev.node.config import (
    BUSYBOX_BINARY,
    BUSYBOX_IMAGE,
    COREDNS_VERSION,
    PAUSE_IMAGE,
    PAUSE_VERSION,
    _log,
)

_PAUSE_GO = """\
// pause: the sandbox container's process. Sleeps until SIGINT/SIGTERM and reaps children (PID 1).
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			if pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil); pid <= 0 || err != nil {
				break
			}
		}
	}
}
"""

# CoreDNS with only the plugins the Corefile below uses (its own main just adds every plugin).
_COREDNS_PLUGINS = ("bind", "cache", "errors", "health", "kubernetes", "loadbalance", "log", "ready")
_COREDNS_GO = (
    'package main\n\nimport (\n\t"github.com/coredns/coredns/coremain"\n'
    + "".join(f'\t_ "github.com/coredns/coredns/plugin/{p}"\n' for p in _COREDNS_PLUGINS)
    + ")\n\nfunc main() {\n\tcoremain.Run()\n}\n"
)


def _bin_path(name: str, version: str) -> Path:
    return cache_dir() / "bin" / f"{name}-{version}" / name


def _go_build(builder: Builder, name: str, version: str, gomod: str, files: dict[str, str]) -> Path:
    """Build a wrapper module's main package once into the binary cache (same layout as lorafleet_dev.build)."""
    dest = _bin_path(name, version)
    if dest.exists():
        return dest
    if not shutil.which("go"):
        raise BuildError(f"cannot build {name}: `go` is not on PATH (needed once to fill the cache)")
    start = time.monotonic()
    src = builder._wrapper_module(f"{name}-{version}", gomod, files)
    with tempfile.TemporaryDirectory(dir=builder.cache) as out:
        builder._go(["build", "-trimpath", "-ldflags=-s -w", "-o", f"{out}/{name}", "."], src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copy2(Path(out) / name, tmp)
        tmp.chmod(0o755)
        tmp.replace(dest)
    took = time.monotonic() - start
    builder.log(f"built {name} {version} in {took:.0f}s")
    record = builder.cache / "bin" / "build-times.json"
    data = json.loads(record.read_text()) if record.exists() else {}
    data[f"{name}-{version}"] = round(took, 1)
    record.write_text(json.dumps(data, indent=2) + "\n")
    return dest


def build_binaries(builder: Builder) -> dict[str, Path]:
    """kubelet and kube-proxy (lorafleet_dev.build), CoreDNS and pause (here)."""
    bins = builder.ensure(NODE_COMPONENTS)
    bins["coredns"] = _go_build(
        builder,
        "coredns",
        COREDNS_VERSION,
        f"module lorafleet.local/build/coredns\n\ngo 1.25.0\n\nrequire github.com/coredns/coredns {COREDNS_VERSION}\n",
        {"main.go": _COREDNS_GO},
    )
    bins["pause"] = _go_build(
        builder, "pause", PAUSE_VERSION, "module lorafleet.local/build/pause\n\ngo 1.24.0\n", {"main.go": _PAUSE_GO}
    )
    return bins


# -- node images -------------------------------------------------------------------------------------------


def build_images(pause: Path, log: Callable[[str], None] = _log) -> dict[str, BuiltImage]:
    """The node's images, built by lorafleet_dev.images (buildah) from tools/lorafleet_dev/node_images: ref -> image."""
    return {
        PAUSE_IMAGE: images.build_node_image("pause", PAUSE_IMAGE, {"pause": pause}, log),
        BUSYBOX_IMAGE: images.build_node_image("busybox", BUSYBOX_IMAGE, {"busybox": BUSYBOX_BINARY}, log),
    }
