"""A real node for the local cluster, where pods really run: ``python -m lorafleet.dev.node`` (``hack/node``).

Commands::

    up                 start the cluster if needed, then containerd (unless one already serves the socket), the
                       node's network, kubelet, kube-proxy and CoreDNS; import the local images; wait until the
                       Node is Ready (idempotent)
    down               drain the node, stop everything ``up`` started, undo its network changes, delete its state
    status             print what runs (JSON)
    build              build (and cache) kubelet, kube-proxy, CoreDNS and pause, and the OCI image archives
    images             (re)import the local images into containerd
    containerd-config  print the containerd config pods need on these machines

What runs (root only; everything stays on this machine; docs/node.md has the details):

* **containerd** (Debian's 1.6, CRI plugin, runc, overlayfs) on ``/run/containerd/containerd.sock``. If a
  containerd already serves it (another tool started it), it is shared when its config suits pods (checked)
  and left running by ``down``. ``LORAFLEET_NODE_CONTAINERD=private`` runs the node's own containerd beside
  it instead (``/run/lorafleet-node/containerd``, root ``/var/lib/lorafleet-node/containerd``).
* **CNI** (Debian's containernetworking-plugins in ``/usr/lib/cni``): a ``bridge`` network ``lorafleet0`` with
  ``host-local`` addresses from ``10.85.0.0/24`` (gateway ``10.85.0.1``, the node's IP), ``portmap``, and the
  runtime's ``loopback``. Pods may reach each other, Services and the host; a FORWARD rule drops anything
  they send elsewhere.
* **images** built here, never pulled: ``lorafleet.local/pause:3.10`` (the sandbox image, a static Go program
  that sleeps until SIGTERM and reaps children) and ``lorafleet.local/busybox:1.35.0`` (Debian's
  busybox-static with every applet linked), written as OCI archives by Python and imported with
  ``ctr -n k8s.io images import``.
* **kubelet** (``lorafleet-node``, the cluster's Kubernetes version) with the cgroupfs driver, a client cert
  ``system:node:lorafleet-node`` / ``system:nodes`` (Node authorizer) and a serving cert from the cluster's CA,
  serving on ``10.85.0.1:10250``. Label ``lorafleet.io/node-pool=real``; taint
  ``lorafleet.io/real-node=true:NoSchedule`` (so kwok-driven tests never land here) unless ``--no-taint``.
* **kube-proxy** (iptables mode) for ClusterIP Services.
* **CoreDNS** (built through the Go module proxy, only the plugins it needs) on ``10.85.0.1:53`` behind the
  ``kube-system/kube-dns`` Service ``10.0.0.10`` (the kubelet's ``clusterDNS``). Only ``cluster.local``
  names: nothing is forwarded outside.
* **the API server for pods**: the API server listens on 127.0.0.1 only, so a small TCP forwarder listens on
  ``10.85.0.1:6443`` and the ``kubernetes`` Service gets an EndpointSlice pointing there (the cluster runs
  with ``--endpoint-reconciler-type=none``); in-cluster clients reach ``https://kubernetes.default.svc``.

State (logs, kubelet root, configs): ``${LORAFLEET_CACHE:-~/.cache/lorafleet}/node/lorafleet-node/``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorafleet.dev import netpol
from lorafleet.dev.build import KUBERNETES_VERSION, NODE_COMPONENTS, Builder, BuildError, cache_dir
from lorafleet.dev.cluster import (
    DEFAULT_NAME,
    LOOPBACK,
    ClusterError,
    LocalCluster,
    Proc,
    _alive,
    _free_ports,
    _start_ticks,
    run_command,
    spawn_logged,
    stop_processes,
)

NODE_NAME = "lorafleet-node"
BRIDGE = "lorafleet0"
POD_SUBNET = "10.85.0.0/24"
NODE_IP = "10.85.0.1"  # the bridge's address: the node's InternalIP, the pods' gateway
CLUSTER_DOMAIN = "cluster.local"
DNS_SERVICE_IP = "10.0.0.10"
APISERVER_PROXY_PORT = 6443
KUBELET_PORT = 10250
CNI_NETWORK = "lorafleet"
CNI_BIN_DIR = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
CNI_CONF = Path("/etc/cni/net.d/10-lorafleet.conflist")
CNI_IPAM_DIR = Path("/var/lib/cni/networks") / CNI_NETWORK
# Shared by default: the containerd every tool of this machine uses (images imported by others are visible).
# LORAFLEET_NODE_CONTAINERD=private runs the node's own containerd beside it (own socket, root, state, runc root),
# for machines where a shared containerd runs with settings pods cannot use (see docs/node.md).
CONTAINERD_PRIVATE = os.environ.get("LORAFLEET_NODE_CONTAINERD", "shared") == "private"
CONTAINERD_STATE = "/run/lorafleet-node/containerd" if CONTAINERD_PRIVATE else "/run/containerd"
CONTAINERD_ROOT = "/var/lib/lorafleet-node/containerd" if CONTAINERD_PRIVATE else "/var/lib/containerd"
CONTAINERD_SOCK = f"{CONTAINERD_STATE}/containerd.sock"
K8S_NAMESPACE = "k8s.io"  # containerd namespace of the CRI plugin
IMAGES_DIR = cache_dir() / "node" / "images"  # the OCI archives of the images below

NODE_POOL_LABEL = "lorafleet.io/node-pool"
NODE_POOL = "real"
TAINT_KEY = "lorafleet.io/real-node"
HARNESS_LABEL = "lorafleet.io/node-harness"

COREDNS_VERSION = os.environ.get("LORAFLEET_COREDNS_VERSION", "v1.14.7")
PAUSE_VERSION = "3.10"
PAUSE_IMAGE = f"lorafleet.local/pause:{PAUSE_VERSION}"
DEFAULT_SANDBOX_IMAGE = "registry.k8s.io/pause:3.6"  # containerd 1.6's default sandbox_image
DEFAULT_CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")
CRI_PLUGIN = "io.containerd.grpc.v1.cri"
CAP_SYS_RESOURCE = 24
BUSYBOX_IMAGE = "lorafleet.local/busybox:1.35.0"
BUSYBOX_BINARY = Path("/bin/busybox")  # Debian's busybox-static
DEBIAN_PACKAGES = ("containerd", "runc", "containernetworking-plugins", "iptables", "busybox-static")
REQUIRED_FILES = {
    "containerd": Path("/usr/bin/containerd"),
    "containerd-shim-runc-v2": Path("/usr/bin/containerd-shim-runc-v2"),
    "ctr": Path("/usr/bin/ctr"),
    "runc": Path("/usr/sbin/runc"),
    "iptables": Path("/usr/sbin/iptables"),
    **{f"cni {p}": CNI_BIN_DIR / p for p in ("bridge", "host-local", "loopback", "portmap")},
    "busybox": BUSYBOX_BINARY,
}
# Start order; `down` stops them in reverse.
PROCESSES = ("containerd", "apiserver-proxy", "coredns", "kubelet", "kube-proxy")
SYSCTLS = {"net/ipv4/ip_forward": "1", "net/bridge/bridge-nf-call-iptables": "1"}
FORWARD_RULE = ["-s", POD_SUBNET, "!", "-d", POD_SUBNET, "-m", "comment", "--comment", "lorafleet-node", "-j", "DROP"]

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


class NodeError(RuntimeError):
    pass


def _log(msg: str) -> None:
    print(f"[node] {msg}", file=sys.stderr, flush=True)


def _run(args: Sequence[str], check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return run_command(args, NodeError, check, timeout)


# -- binaries ----------------------------------------------------------------------------------------------


def _bin_path(name: str, version: str) -> Path:
    return cache_dir() / "bin" / f"{name}-{version}" / name


def _go_build(builder: Builder, name: str, version: str, gomod: str, files: dict[str, str]) -> Path:
    """Build a wrapper module's main package once into the binary cache (same layout as lorafleet.dev.build)."""
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
    """kubelet and kube-proxy (lorafleet.dev.build), CoreDNS and pause (here)."""
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


# -- OCI images --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSpec:
    ref: str
    files: dict[str, Path]  # path in the image -> file on this machine
    symlinks: dict[str, str] = field(default_factory=dict)  # path in the image -> link target
    dirs: tuple[str, ...] = ()
    texts: dict[str, str] = field(default_factory=dict)  # path in the image -> content
    config: dict[str, Any] = field(default_factory=dict)  # OCI image config "config" (Entrypoint, Env, ...)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layer(spec: ImageSpec) -> bytes:
    """A reproducible tar layer (fixed mtimes and owners, sorted entries)."""
    buf = io.BytesIO()
    entries: dict[str, tuple[str, Any]] = {}
    for d in spec.dirs:
        entries[d] = ("dir", None)
    for p, src in spec.files.items():
        entries[p] = ("file", src)
    for p, text in spec.texts.items():
        entries[p] = ("text", text)
    for p, target in spec.symlinks.items():
        entries.setdefault(p, ("link", target))
    # Parent directories first.
    for p in list(entries):
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            entries.setdefault("/".join(parts[:i]), ("dir", None))
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(entries):
            kind, value = entries[path]
            info = tarfile.TarInfo(path)
            info.mtime = 0
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = 0o1777 if path == "tmp" else 0o755
                tar.addfile(info)
            elif kind == "link":
                info.type = tarfile.SYMTYPE
                info.linkname = value
                info.mode = 0o777
                tar.addfile(info)
            else:
                data = value.read_bytes() if kind == "file" else value.encode()
                info.size = len(data)
                info.mode = 0o755 if kind == "file" else 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_oci_archive(spec: ImageSpec, out: Path) -> str:
    """Write an OCI image layout archive for one linux/amd64 image; returns the manifest digest.

    The index names the image with the ``io.containerd.image.name`` annotation, which ``ctr images import``
    uses as the image's name.
    """
    layer = _layer(spec)
    gz = gzip.compress(layer, mtime=0)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": spec.config,
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
        "history": [{"created_by": "lorafleet.dev.node", "created": "1970-01-01T00:00:00Z"}],
        "created": "1970-01-01T00:00:00Z",
    }
    config_b = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": _digest(config_b),
            "size": len(config_b),
        },
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": _digest(gz), "size": len(gz)}
        ],
    }
    manifest_b = json.dumps(manifest, sort_keys=True).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": _digest(manifest_b),
                "size": len(manifest_b),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": spec.ref,
                    "org.opencontainers.image.ref.name": spec.ref.rsplit(":", 1)[1],
                },
            }
        ],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", json.dumps(index, sort_keys=True).encode())
        for blob in (config_b, manifest_b, gz):
            add(f"blobs/sha256/{_digest(blob).split(':')[1]}", blob)
    tmp.replace(out)
    return _digest(manifest_b)


def image_specs(pause: Path) -> list[ImageSpec]:
    applets = _run([str(BUSYBOX_BINARY), "--list-full"]).stdout.split()
    busybox = ImageSpec(
        BUSYBOX_IMAGE,
        files={"bin/busybox": BUSYBOX_BINARY},
        symlinks={a: "/bin/busybox" for a in applets if a != "bin/busybox"},
        dirs=("bin", "sbin", "usr/bin", "usr/sbin", "etc", "tmp", "root", "var", "proc", "sys", "dev"),
        texts={
            "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
            "etc/group": "root:x:0:\nnogroup:x:65534:\n",
        },
        config={"Cmd": ["sh"], "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "WorkingDir": "/"},
    )
    pause_img = ImageSpec(
        PAUSE_IMAGE,
        files={"pause": pause},
        config={"Entrypoint": ["/pause"], "User": "65535:65535", "WorkingDir": "/"},
    )
    return [pause_img, busybox]


def build_images(pause: Path) -> dict[str, tuple[Path, str]]:
    """OCI archives under ``$LORAFLEET_CACHE/images``: ref -> (archive, manifest digest)."""
    out = {}
    for spec in image_specs(pause):
        name = spec.ref.split("/")[-1].replace(":", "-")
        archive = IMAGES_DIR / f"{name}.tar"
        out[spec.ref] = (archive, write_oci_archive(spec, archive))
    return out


# -- the API server forwarder (run as `python -m lorafleet.dev.node forward`) -------------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        pass


async def _serve_forward(listen: tuple[str, int], target: tuple[str, int]) -> None:
    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*target)
        except OSError:
            cw.close()
            return
        await asyncio.gather(_pipe(cr, uw), _pipe(ur, cw), return_exceptions=True)
        for w in (uw, cw):
            w.close()

    server = await asyncio.start_server(handle, *listen, reuse_address=True)
    async with server:
        await server.serve_forever()


def forward(listen: str, target: str) -> None:
    """A TCP forwarder (TLS passes through): pods reach the loopback-only API server through it."""
    lh, lp = listen.rsplit(":", 1)
    th, tp = target.rsplit(":", 1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forward((lh, int(lp)), (th, int(tp))))


# -- the node ----------------------------------------------------------------------------------------------


@dataclass
class NodeState:
    cluster: str
    server: str = ""
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, Proc] = field(default_factory=dict)
    sysctls: dict[str, str] = field(default_factory=dict)  # changed by `up`: path -> previous value
    created: list[str] = field(default_factory=list)  # what `up` set up: bridge, cni-conf, forward-rule
    foreign_containerd: bool = False
    sandbox_image: str = PAUSE_IMAGE
    taint: bool = True

    def dump(self) -> dict[str, Any]:
        data = dict(vars(self))
        data["processes"] = {k: vars(p) for k, p in self.processes.items()}
        return data

    @classmethod
    def load(cls, data: dict[str, Any]) -> NodeState:
        data = dict(data)
        data["processes"] = {k: Proc(**v) for k, v in data.get("processes", {}).items()}
        return cls(**data)


def _sysctl_path(key: str) -> Path:
    return Path("/proc/sys") / key


def _mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root`` (deepest first)."""
    out = []
    prefix = str(root.resolve())
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                out.append(point)
    return sorted(set(out), key=len, reverse=True)


def containerd_config() -> str:
    """The containerd config the node starts containerd with (Debian's settings plus what this VM needs)."""
    return (
        "version = 2\n"
        f'root = "{CONTAINERD_ROOT}"\n'
        f'state = "{CONTAINERD_STATE}"\n'
        f'[grpc]\n  address = "{CONTAINERD_SOCK}"\n'
        f'[plugins."{CRI_PLUGIN}"]\n'
        f'  sandbox_image = "{PAUSE_IMAGE}"\n'
        # Without CAP_SYS_RESOURCE (these VMs) runc cannot give the pause container its oom_score_adj of
        # -998 and every sandbox fails ("can't get final child's PID from pipe"): clamp to containerd's own.
        "  restrict_oom_score_adj = true\n"
        f'  [plugins."{CRI_PLUGIN}".cni]\n'
        f'    bin_dir = "{CNI_BIN_DIR}"\n'
        f'    conf_dir = "{CNI_CONF.parent}"\n'
        + (
            f'  [plugins."{CRI_PLUGIN}".containerd.runtimes.runc]\n'
            '    runtime_type = "io.containerd.runc.v2"\n'
            f'  [plugins."{CRI_PLUGIN}".containerd.runtimes.runc.options]\n'
            f'    Root = "{CONTAINERD_STATE}/runc"\n'
            if CONTAINERD_PRIVATE
            else ""
        )
        + '[plugins."io.containerd.internal.v1.opt"]\n'
        f'  path = "{CONTAINERD_ROOT}/opt"\n'
    )


def _has_cap(bit: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def running_containerd(sock: str = CONTAINERD_SOCK) -> tuple[int, Path] | None:
    """(pid, config file) of the running containerd that serves ``sock``, if any."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = [a.decode() for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if not argv or Path(argv[0]).name != "containerd":
            continue
        config, address = DEFAULT_CONTAINERD_CONFIG, None
        for i, arg in enumerate(argv[1:], 1):
            if arg in ("--config", "-c") and i + 1 < len(argv):
                config = Path(argv[i + 1])
            elif arg.startswith("--config="):
                config = Path(arg.split("=", 1)[1])
            elif arg in ("--address", "-a") and i + 1 < len(argv):
                address = argv[i + 1]
        if address is None:
            with contextlib.suppress(OSError, tomllib.TOMLDecodeError):
                address = tomllib.loads(config.read_text()).get("grpc", {}).get("address")
        if (address or "/run/containerd/containerd.sock") == sock:
            return int(entry.name), config
    return None


def foreign_cri_config() -> tuple[dict[str, Any], list[str]]:
    """The CRI settings of a containerd this harness did not start, and why pods would fail with them."""
    found = running_containerd()
    if found is None:
        return {}, [f"something serves {CONTAINERD_SOCK} but no containerd process is visible"]
    pid, path = found
    try:
        data = tomllib.loads(path.read_text()) if path.exists() else {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        return {}, [f"cannot read the config {path} of containerd pid {pid}: {e}"]
    plugins = data.get("plugins", {})
    cri = plugins.get(CRI_PLUGIN) or plugins.get("cri") or {}
    cni = cri.get("cni", {})
    problems = []
    if not cri.get("restrict_oom_score_adj") and not _has_cap(CAP_SYS_RESOURCE):
        problems.append(
            "it lacks `restrict_oom_score_adj = true` and this machine lacks CAP_SYS_RESOURCE, so every pod "
            "sandbox would fail (runc: can't get final child's PID from pipe)"
        )
    if cni.get("bin_dir", "/opt/cni/bin") != str(CNI_BIN_DIR):
        problems.append(f"its CNI bin_dir is {cni.get('bin_dir', '/opt/cni/bin')}, not {CNI_BIN_DIR}")
    if cni.get("conf_dir", "/etc/cni/net.d") != str(CNI_CONF.parent):
        problems.append(f"its CNI conf_dir is {cni.get('conf_dir')}, not {CNI_CONF.parent}")
    if problems:
        problems = [f"containerd pid {pid} (config {path}, not started by hack/node): {p}" for p in problems]
    return cri, problems


def _remove_kube_chains() -> None:
    """Remove the KUBE-* iptables chains that kubelet and kube-proxy leave behind (kube-proxy --cleanup leaves
    the kubelet's KUBE-FIREWALL, KUBE-KUBELET-CANARY and KUBE-IPTABLES-HINT)."""
    for binary in ("iptables", "ip6tables"):
        if not shutil.which(binary):
            continue
        for table in ("filter", "nat", "mangle"):
            rules = _run([binary, "-w", "-t", table, "-S"], check=False).stdout.splitlines()
            chains = [r.split()[1] for r in rules if r.startswith("-N KUBE-")]
            for rule in rules:
                parts = shlex.split(rule)
                jumps_to_kube = "-j" in parts and parts[parts.index("-j") + 1] in chains
                if parts[:1] == ["-A"] and parts[1] not in chains and jumps_to_kube:
                    _run([binary, "-w", "-t", table, "-D", *parts[1:]], check=False)
            for flag in ("-F", "-X"):
                for chain in chains:
                    _run([binary, "-w", "-t", table, flag, chain], check=False)


class LocalNode:
    """The real node of one local cluster (one per machine: it owns the bridge, the CNI config and ports)."""

    def __init__(
        self,
        cluster: LocalCluster | None = None,
        state_dir: Path | None = None,
        builder: Builder | None = None,
        log: Callable[[str], None] = _log,
    ) -> None:
        self.cluster = cluster or LocalCluster(log=log)
        self.dir = state_dir or Path(os.environ.get("LORAFLEET_NODE_STATE") or cache_dir() / "node" / NODE_NAME)
        self.log = log
        self.builder = builder or self.cluster.builder
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # -- paths and state ------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    def state(self) -> NodeState | None:
        try:
            return NodeState.load(json.loads(self.state_file.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _save(self, st: NodeState) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(st.dump(), indent=2) + "\n")
        tmp.replace(self.state_file)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.dir.parent / f".{self.dir.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        kubectl = self.builder.path("kubectl")
        proc = subprocess.run(
            [str(kubectl), f"--kubeconfig={self.cluster.kubeconfig}", *args],
            capture_output=True,
            text=True,
            input=stdin,
            timeout=180,
        )
        if check and proc.returncode != 0:
            raise NodeError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def _ctr(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return _run(["ctr", f"--address={CONTAINERD_SOCK}", *args], check=check, timeout=timeout)

    # -- checks ---------------------------------------------------------------------------------------

    def preflight(self, install: bool = True) -> None:
        """Root, Debian's packages (installed with apt-get when missing), cgroups."""
        if os.geteuid() != 0:
            raise NodeError("a real node needs root (containerd, runc, network namespaces, iptables)")
        missing = [name for name, path in REQUIRED_FILES.items() if not path.exists()]
        if missing and install and shutil.which("apt-get") and os.environ.get("LORAFLEET_NODE_NO_APT") != "1":
            self.log(f"missing {', '.join(missing)}: apt-get install {' '.join(DEBIAN_PACKAGES)}")
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            cmd = ["apt-get", "install", "-y", "--no-install-recommends", *DEBIAN_PACKAGES]
            if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
                subprocess.run(["apt-get", "update"], env=env, capture_output=True)
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise NodeError(f"apt-get install failed: {proc.stderr.strip()[-2000:]}")
            missing = [name for name, path in REQUIRED_FILES.items() if not path.exists()]
        if missing:
            raise NodeError(f"missing {', '.join(missing)} (Debian: apt-get install {' '.join(DEBIAN_PACKAGES)})")
        if not Path("/sys/fs/cgroup/cgroup.controllers").exists():  # cgroup v1 (v2 has every controller)
            for sub in ("cpu", "memory", "pids"):
                if not any(Path(f"/sys/fs/cgroup/{d}").is_dir() for d in (sub, f"{sub},cpuacct", f"cpuacct,{sub}")):
                    raise NodeError(f"no cgroup controller {sub!r} mounted under /sys/fs/cgroup")

    def build(self) -> dict[str, Path]:
        bins = build_binaries(self.builder)
        bins.update(self.cluster.binaries())
        if netpol.enabled():
            bins["kube-router"] = netpol.build(self.builder)
        return bins

    # -- up -------------------------------------------------------------------------------------------

    def up(self, timeout: float = 180.0, taint: bool = True) -> bool:
        """Start the node unless it already runs for this cluster. Returns True if this call started it."""
        with self._locked():
            st = self.state()
            self.check_owner(st)
            if st and self.is_up(st):
                self.log(f"node {NODE_NAME!r} already up in cluster {self.cluster.name!r}")
                self._netpol_up()
                return False
            if self.dir.exists():
                self.log(f"cleaning up leftovers of a previous run in {self.dir}")
                self._down()
            self.preflight()
            if not self.cluster.is_up():
                raise NodeError(f"cluster {self.cluster.name!r} is not up (run `hack/cluster up`)")
            t0 = time.monotonic()
            bins = self.build()
            t_bins = time.monotonic() - t0
            try:
                self._start(bins, time.monotonic() + timeout, taint)
            except BaseException:
                self._dump_logs()
                self.log("start failed: stopping what was started")
                self._down()
                raise
            self.log(f"node {NODE_NAME!r} Ready in {time.monotonic() - t0:.1f}s (binaries {t_bins:.1f}s)")
            self._netpol_up()
            return True

    def _netpol_up(self) -> None:
        """The NetworkPolicy engine (lorafleet.dev.netpol), unless LORAFLEET_NODE_NETPOL=off. Optional: if it
        cannot start, the node stays up without it (`status` shows it)."""
        if not netpol.enabled():
            return
        try:
            netpol.start_for(self)
        except (netpol.NetpolError, BuildError, NodeError, subprocess.SubprocessError) as e:
            self.log(f"NetworkPolicy engine not running: {e}")

    def _start(self, bins: dict[str, Path], deadline: float, taint: bool) -> None:
        cst = self.cluster.state()
        assert cst is not None
        server = f"https://{LOOPBACK}:{cst.ports['apiserver']}"
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        names = ("kubelet-healthz", "kube-proxy-healthz", "kube-proxy-metrics", "coredns-health", "coredns-ready")
        st = NodeState(self.cluster.name, server, dict(zip(names, _free_ports(len(names)), strict=True)), taint=taint)
        self._save(st)

        t = time.monotonic()
        self._network(st)
        self._containerd(st, deadline)
        self.log(f"network and containerd ready ({time.monotonic() - t:.1f}s)")
        t = time.monotonic()
        self.import_images(bins["pause"], st.sandbox_image)
        self.log(f"images imported ({time.monotonic() - t:.1f}s)")
        self._write_configs(st, server)
        self._apply_cluster_objects()

        d = self.dir
        self._spawn(
            st,
            "apiserver-proxy",
            [
                sys.executable,
                "-m",
                "lorafleet.dev.node",
                "forward",
                f"{NODE_IP}:{APISERVER_PROXY_PORT}",
                f"{LOOPBACK}:{cst.ports['apiserver']}",
            ],
            f"tcp://{NODE_IP}:{APISERVER_PROXY_PORT}",
            env={
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")])
                )
            },
        )
        self._spawn(
            st,
            "coredns",
            [str(bins["coredns"]), "-conf", str(d / "Corefile")],
            f"http://{LOOPBACK}:{st.ports['coredns-ready']}/ready",
        )
        self._spawn(
            st,
            "kubelet",
            [
                str(bins["kubelet"]),
                f"--config={d / 'kubelet.yaml'}",
                f"--kubeconfig={d / 'kubelet.kubeconfig'}",
                f"--root-dir={d / 'kubelet'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                f"--node-labels={NODE_POOL_LABEL}={NODE_POOL}",
                "--v=2",
            ],
            f"http://{LOOPBACK}:{st.ports['kubelet-healthz']}/healthz",
        )
        self._spawn(
            st,
            "kube-proxy",
            [str(bins["kube-proxy"]), f"--config={d / 'kube-proxy.yaml'}", "--v=2"],
            f"http://{LOOPBACK}:{st.ports['kube-proxy-healthz']}/healthz",
        )
        self._wait(st, ["apiserver-proxy", "kubelet"], deadline)
        t = time.monotonic()
        while not self.node_ready():  # the kubelet registers the Node, then reports it Ready
            for proc in st.processes.values():
                if not self.alive(proc):
                    raise NodeError(f"{proc.name} exited while waiting for the Node to be Ready")
            if time.monotonic() > deadline:
                raise NodeError(f"timed out waiting for Node {NODE_NAME} to be Ready")
            time.sleep(0.5)
        self.log(f"Node {NODE_NAME} Ready ({time.monotonic() - t:.1f}s)")
        self._wait(st, ["coredns", "kube-proxy"], deadline)

    def _network(self, st: NodeState) -> None:
        """Sysctls, the bridge with the node's IP, the CNI config and the FORWARD rule that keeps pods local."""
        for key, value in SYSCTLS.items():
            path = _sysctl_path(key)
            old = path.read_text().strip()
            if old != value:
                path.write_text(value + "\n")
                st.sysctls[key] = old
        self._save(st)
        if _run(["ip", "link", "show", BRIDGE], check=False).returncode != 0:
            _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
            st.created.append("bridge")
            self._save(st)
        addrs = _run(["ip", "-o", "-4", "addr", "show", "dev", BRIDGE]).stdout
        if f" {NODE_IP}/" not in addrs:
            _run(["ip", "addr", "add", f"{NODE_IP}/{POD_SUBNET.split('/')[1]}", "dev", BRIDGE])
        _run(["ip", "link", "set", BRIDGE, "up"])
        conflist = {
            "cniVersion": "1.0.0",
            "name": CNI_NETWORK,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_SUBNET, "gateway": NODE_IP}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        CNI_CONF.parent.mkdir(parents=True, exist_ok=True)
        CNI_CONF.write_text(json.dumps(conflist, indent=2) + "\n")
        st.created.append("cni-conf")
        if _run(["iptables", "-w", "-C", "FORWARD", *FORWARD_RULE], check=False).returncode != 0:
            _run(["iptables", "-w", "-I", "FORWARD", "1", *FORWARD_RULE])
        st.created.append("forward-rule")
        self._save(st)

    def containerd_serving(self) -> bool:
        return Path(CONTAINERD_SOCK).exists() and self._ctr("version", check=False, timeout=10).returncode == 0

    def _containerd(self, st: NodeState, deadline: float) -> None:
        """Use the containerd serving the socket if its settings work for pods, else start ours."""
        if self.containerd_serving():
            cri, problems = foreign_cri_config()
            if problems:
                raise NodeError(
                    "; ".join(problems) + ". Stop it, or start it with the config of `hack/node containerd-config`"
                )
            st.foreign_containerd = True
            st.sandbox_image = cri.get("sandbox_image", DEFAULT_SANDBOX_IMAGE)
            self._save(st)
            self.log(f"using the containerd already serving {CONTAINERD_SOCK} (left running by `down`)")
        else:
            config = self.dir / "containerd.toml"
            config.write_text(containerd_config())
            self._spawn(st, "containerd", ["containerd", f"--config={config}"], f"ctr://{CONTAINERD_SOCK}")
            self._wait(st, ["containerd"], deadline)
        plugins = self._ctr("plugins", "ls").stdout
        listed = [line for line in plugins.splitlines() if "io.containerd.grpc.v1" in line and " cri " in f" {line} "]
        if not listed or listed[0].split()[-1] != "ok":
            raise NodeError(f"containerd's CRI plugin is not running: {listed or 'not listed'}")

    def import_images(self, pause: Path | None = None, sandbox_image: str = PAUSE_IMAGE) -> dict[str, str]:
        """Build the OCI archives and import those whose digest containerd does not have yet."""
        archives = build_images(pause or _bin_path("pause", PAUSE_VERSION))
        have: dict[str, str] = {}
        for line in self._ctr("-n", K8S_NAMESPACE, "images", "ls").stdout.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 3:
                have[parts[0]] = parts[2]
        for ref, (archive, digest) in archives.items():
            if have.get(ref) != digest:
                self._ctr("-n", K8S_NAMESPACE, "images", "import", "--platform=linux/amd64", str(archive))
                self.log(f"imported {ref} ({digest[:19]})")
        if sandbox_image != PAUSE_IMAGE and have.get(sandbox_image) != archives[PAUSE_IMAGE][1]:
            # A containerd with another sandbox_image (Debian's stock config: registry.k8s.io/pause:3.6).
            self._ctr("-n", K8S_NAMESPACE, "images", "tag", "--force", PAUSE_IMAGE, sandbox_image)
            self.log(f"tagged {PAUSE_IMAGE} as {sandbox_image}, the sandbox image of the running containerd")
        return {ref: digest for ref, (_, digest) in archives.items()}

    def _issue_certs(self) -> dict[str, Path]:
        pki = self.cluster.pki
        pki.issue(f"node-{NODE_NAME}-client", f"system:node:{NODE_NAME}", ("system:nodes",), client=True)
        crt, key = pki.issue(
            f"node-{NODE_NAME}-serving",
            f"system:node:{NODE_NAME}",
            ("system:nodes",),
            server=True,
            dns=(NODE_NAME, "localhost"),
            ips=(NODE_IP, LOOPBACK),
        )
        pki.issue("node-kube-proxy", "system:kube-proxy", client=True)  # bound to system:node-proxier
        pki.issue("node-coredns", "lorafleet:coredns", client=True)
        return {"serving-crt": crt, "serving-key": key}

    def _write_configs(self, st: NodeState, server: str) -> None:
        d, pki, name = self.dir, self.cluster.pki, self.cluster.name
        serving = self._issue_certs()
        pki.kubeconfig(d / "kubelet.kubeconfig", server, f"system:node:{NODE_NAME}", f"node-{NODE_NAME}-client", name)
        pki.kubeconfig(d / "kube-proxy.kubeconfig", server, "system:kube-proxy", "node-kube-proxy", name)
        pki.kubeconfig(d / "coredns.kubeconfig", server, "lorafleet:coredns", "node-coredns", name)
        kubelet: dict[str, Any] = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": KUBELET_PORT,
            "readOnlyPort": 0,
            "healthzBindAddress": LOOPBACK,
            "healthzPort": st.ports["kubelet-healthz"],
            "tlsCertFile": str(serving["serving-crt"]),
            "tlsPrivateKeyFile": str(serving["serving-key"]),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(pki.ca_crt)},
            },
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs",
            "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCK}",
            "clusterDomain": CLUSTER_DOMAIN,
            "clusterDNS": [DNS_SERVICE_IP],
            "resolvConf": "/etc/resolv.conf",
            "failSwapOn": False,
            "podLogsDir": str(d / "pod-logs"),
            # The images are imported, never pulled: image GC must never delete them.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            # A shared developer VM's disk is often fuller than the defaults (10%/15%) allow, and its size is
            # reported as the host's (252G here), so even 1% (2.5G) evicted every pod with gigabytes still free:
            # absolute floors instead.
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "512Mi",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "512Mi",
            },
            "registerWithTaints": ([{"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"}] if st.taint else []),
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
            "shutdownGracePeriod": "0s",
        }
        (d / "kubelet.yaml").write_text(yaml.safe_dump(kubelet, sort_keys=False))
        proxy = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "iptables",
            "clientConnection": {"kubeconfig": str(d / "kube-proxy.kubeconfig")},
            "hostnameOverride": NODE_NAME,
            "bindAddress": NODE_IP,
            "healthzBindAddress": f"{LOOPBACK}:{st.ports['kube-proxy-healthz']}",
            "metricsBindAddress": f"{LOOPBACK}:{st.ports['kube-proxy-metrics']}",
            "clusterCIDR": POD_SUBNET,
            "nodePortAddresses": ["primary"],
            # Leave the machine's conntrack sysctls and route_localnet as they are.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "iptables": {"localhostNodePorts": False},
        }
        (d / "kube-proxy.yaml").write_text(yaml.safe_dump(proxy, sort_keys=False))
        corefile = (
            ".:53 {\n"
            f"    bind {NODE_IP}\n"
            "    errors\n"
            f"    health {LOOPBACK}:{st.ports['coredns-health']}\n"
            f"    ready {LOOPBACK}:{st.ports['coredns-ready']}\n"
            f"    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{\n"
            f"        kubeconfig {d / 'coredns.kubeconfig'} {name}\n"
            "        pods insecure\n"
            "        fallthrough in-addr.arpa ip6.arpa\n"
            "        ttl 30\n"
            "    }\n"
            "    cache 30\n"
            "    loadbalance\n"
            "}\n"
        )
        (d / "Corefile").write_text(corefile)

    def cluster_objects(self) -> list[dict[str, Any]]:
        """RBAC for CoreDNS, the kube-dns Service and the endpoints of `kubernetes` and `kube-dns`."""
        labels = {HARNESS_LABEL: "true"}
        managed = {**labels, "endpointslice.kubernetes.io/managed-by": "lorafleet-node-harness"}
        return [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": "lorafleet:coredns", "labels": labels},
                "rules": [
                    {"apiGroups": [""], "resources": ["services", "pods", "namespaces"], "verbs": ["list", "watch"]},
                    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
                ],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": "lorafleet:coredns", "labels": labels},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "lorafleet:coredns",
                },
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "lorafleet:coredns"}],
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": "kube-dns",
                    "namespace": "kube-system",
                    "labels": {**labels, "k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"},
                },
                "spec": {
                    "clusterIP": DNS_SERVICE_IP,
                    "ports": [
                        {"name": "dns", "port": 53, "protocol": "UDP"},
                        {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                    ],
                },
            },
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": "kube-dns-node",
                    "namespace": "kube-system",
                    "labels": {**managed, "kubernetes.io/service-name": "kube-dns"},
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}, "nodeName": NODE_NAME}],
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                ],
            },
            {
                # The API server runs with --endpoint-reconciler-type=none (it listens on 127.0.0.1, which
                # Endpoints validation rejects): point `kubernetes` at the forwarder on the node's IP.
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": "kubernetes-node",
                    "namespace": "default",
                    "labels": {**managed, "kubernetes.io/service-name": "kubernetes"},
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}}],
                "ports": [{"name": "https", "port": APISERVER_PROXY_PORT, "protocol": "TCP"}],
            },
        ]

    def _apply_cluster_objects(self) -> None:
        docs = yaml.safe_dump_all(self.cluster_objects(), sort_keys=False)
        self.kubectl("apply", "-f", "-", stdin=docs)

    # -- processes ------------------------------------------------------------------------------------

    def _spawn(self, st: NodeState, name: str, args: list[str], health: str, env: dict[str, str] | None = None) -> None:
        log = self.dir / "logs" / f"{name}.log"
        child = spawn_logged(args, log, self.dir, env)
        self._children[child.pid] = child
        st.processes[name] = Proc(name, child.pid, _start_ticks(child.pid) or 0, str(log), args, health)
        self._save(st)

    def alive(self, proc: Proc) -> bool:
        child = self._children.get(proc.pid)
        if child is not None:
            return child.poll() is None
        return _alive(proc.pid, proc.start_ticks)

    def healthy(self, proc: Proc) -> bool:
        scheme, _, rest = proc.health.partition("://")
        if scheme == "tcp":
            host, port = rest.rsplit(":", 1)
            try:
                with socket.create_connection((host, int(port)), timeout=2):
                    return True
            except OSError:
                return False
        if scheme == "ctr":
            return self.containerd_serving()
        try:
            with urllib.request.urlopen(proc.health, timeout=3) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def _wait(self, st: NodeState, names: list[str], deadline: float) -> None:
        t0 = time.monotonic()
        for n in names:
            proc = st.processes[n]
            while not self.healthy(proc):
                for other in st.processes.values():
                    if not self.alive(other):
                        code = self._children[other.pid].poll() if other.pid in self._children else None
                        raise NodeError(f"{other.name} exited (code {code}) while waiting for {n}")
                if time.monotonic() > deadline:
                    raise NodeError(f"timed out waiting for {n} ({proc.health})")
                time.sleep(0.2)
        self.log(f"{', '.join(names)} healthy ({time.monotonic() - t0:.1f}s)")

    def is_up(self, st: NodeState | None = None) -> bool:
        st = st or self.state()
        if not st or not self.cluster.is_up():
            return False
        wanted = [p for p in PROCESSES if p != "containerd" or not st.foreign_containerd]
        if set(st.processes) != set(wanted) or not all(self.alive(p) for p in st.processes.values()):
            return False
        return self.node_ready()

    def node_ready(self) -> bool:
        proc = self.kubectl(
            "get", "node", NODE_NAME, "-o", 'jsonpath={.status.conditions[?(@.type=="Ready")].status}', check=False
        )
        return proc.returncode == 0 and proc.stdout.strip() == "True"

    def _dump_logs(self, lines: int = 30) -> None:
        for log in sorted((self.dir / "logs").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            self.log(f"--- last {len(tail)} lines of {log.name} ---")
            for line in tail:
                print(f"    {line}", file=sys.stderr)

    # -- down -----------------------------------------------------------------------------------------

    def check_owner(self, st: NodeState | None = None) -> None:
        """The node serves one cluster at a time: refuse to take it from another cluster while it runs."""
        st = st or self.state()
        if st and st.cluster != self.cluster.name and any(self.alive(p) for p in st.processes.values()):
            raise NodeError(f"the node runs for cluster {st.cluster!r}: run `hack/node --name {st.cluster} down` first")

    def _follow_state(self, st: NodeState | None) -> None:
        """Talk to the cluster the node was started for (``down`` and ``status`` work whatever ``--name`` says)."""
        if st and st.cluster != self.cluster.name:
            self.cluster = LocalCluster(st.cluster, log=self.log)

    def down(self, grace: float = 10.0) -> None:
        with self._locked():
            self._follow_state(self.state())
            self._down(grace)

    def _drain(self) -> None:
        """Delete the node's pods while the kubelet still runs, so it stops their containers and sandboxes,
        tears down their network and unmounts their volumes."""
        if not self.cluster.is_up():
            return
        proc = self.kubectl(
            "delete", "pods", "-A", f"--field-selector=spec.nodeName={NODE_NAME}", "--grace-period=1",
            "--wait=true", "--timeout=60s", check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            self.log(f"draining the node failed: {proc.stderr.strip()}")

    def _remove_leftover_containers(self) -> None:
        """Kill and remove the CRI containers still in containerd (the kubelet could not stop them)."""
        if not self.containerd_serving():
            return
        ids = self._ctr(
            "-n", K8S_NAMESPACE, "containers", "ls", "-q", 'labels."io.kubernetes.pod.uid"', check=False
        ).stdout.split()
        for cid in ids:
            self._ctr("-n", K8S_NAMESPACE, "tasks", "kill", "-s", "SIGKILL", cid, check=False)
        for cid in ids:
            self._ctr("-n", K8S_NAMESPACE, "tasks", "delete", "--force", cid, check=False)
            self._ctr("-n", K8S_NAMESPACE, "containers", "delete", cid, check=False)
        if ids:
            self.log(f"removed {len(ids)} CRI containers the kubelet had not collected (stopped ones, usually)")
        for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines():
            ns = line.split()[0] if line.split() else ""
            if ns.startswith("cni-") and ids:
                _run(["ip", "netns", "delete", ns], check=False)

    def _stop(self, proc: Proc, grace: float) -> None:
        stop_processes([proc], grace, self.alive, self._children, self.log)

    def _down(self, grace: float = 10.0) -> None:
        st = self.state()
        if st is None and not self.dir.exists():
            return
        procs = st.processes if st else {}
        if (self.dir / "netpol").exists():
            netpol.engine_for(self).stop(grace)
        if "kubelet" in procs and self.alive(procs["kubelet"]):
            self._drain()
        for name in ("kubelet", "kube-proxy", "coredns", "apiserver-proxy"):
            if name in procs:
                self._stop(procs[name], grace)
        if self.cluster.is_up():
            self.kubectl("delete", "node", NODE_NAME, "--ignore-not-found", "--wait=false", check=False)
            for kind in ("endpointslices", "services"):
                self.kubectl("delete", kind, "-A", "-l", f"{HARNESS_LABEL}=true", "--ignore-not-found", check=False)
            self.kubectl("delete", "clusterrolebinding,clusterrole", "-l", f"{HARNESS_LABEL}=true", check=False)
        kube_proxy = _bin_path("kube-proxy", KUBERNETES_VERSION)
        if st and "kube-proxy" in procs and kube_proxy.exists():
            _run([str(kube_proxy), "--cleanup"], check=False)  # its iptables chains
        if "kubelet" in procs:
            _remove_kube_chains()
        self._remove_leftover_containers()
        if "containerd" in procs:
            self._stop(procs["containerd"], grace)
            if CONTAINERD_PRIVATE:  # its runtime state (sockets, runc state); images stay in its root
                shutil.rmtree(CONTAINERD_STATE, ignore_errors=True)
                with contextlib.suppress(OSError):
                    Path(CONTAINERD_STATE).parent.rmdir()
        created = st.created if st else []
        if "forward-rule" in created:
            _run(["iptables", "-w", "-D", "FORWARD", *FORWARD_RULE], check=False)
        if "cni-conf" in created:
            CNI_CONF.unlink(missing_ok=True)
            shutil.rmtree(CNI_IPAM_DIR, ignore_errors=True)
        if "bridge" in created:
            _run(["ip", "link", "delete", BRIDGE], check=False)
        for key, old in (st.sysctls if st else {}).items():
            with contextlib.suppress(OSError):
                _sysctl_path(key).write_text(old + "\n")
        for link in Path("/var/log/containers").glob("*.log"):
            with contextlib.suppress(OSError):
                if str(link.readlink()).startswith(str(self.dir)):
                    link.unlink()
        for point in _mounts_under(self.dir):
            if _run(["umount", point], check=False).returncode != 0:
                _run(["umount", "-l", point], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        if procs:
            self.log(f"node {NODE_NAME!r} down")

    # -- status ---------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        st = self.state()
        self._follow_state(st)
        if not st:
            return {"node": NODE_NAME, "up": False, "processes": {}}
        return {
            "node": NODE_NAME,
            "cluster": st.cluster,
            "up": self.is_up(st),
            "node_ip": NODE_IP,
            "pod_subnet": POD_SUBNET,
            "containerd": CONTAINERD_SOCK + (" (not started by us)" if st.foreign_containerd else ""),
            "images": [PAUSE_IMAGE, BUSYBOX_IMAGE],
            "taint": f"{TAINT_KEY}=true:NoSchedule" if st.taint else None,
            "netpol": netpol.engine_for(self).status(),
            "processes": {
                n: {"pid": p.pid, "alive": self.alive(p), "healthy": self.alive(p) and self.healthy(p), "log": p.log}
                for n, p in st.processes.items()
            },
        }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hack/node", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default=DEFAULT_NAME, help="cluster name (see hack/cluster)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start (idempotent); starts the cluster too if it is not up")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the Node to be Ready")
    up.add_argument("--no-taint", action="store_true", help=f"register without the {TAINT_KEY} taint")
    sub.add_parser("down", help="drain, stop, undo network changes, delete state")
    sub.add_parser("status", help="print what runs (JSON)")
    sub.add_parser("build", help="build kubelet, kube-proxy, CoreDNS, pause and the image archives")
    sub.add_parser("images", help="(re)import the local images into containerd")
    sub.add_parser("containerd-config", help="print the containerd config pods need on this machine")
    fwd = sub.add_parser("forward", help=argparse.SUPPRESS)
    fwd.add_argument("listen")
    fwd.add_argument("target")
    args = parser.parse_args(argv)

    if args.cmd == "forward":
        forward(args.listen, args.target)
        return 0
    node = LocalNode(LocalCluster(args.name))
    try:
        if args.cmd == "up":
            node.check_owner()
            node.preflight()
            node.cluster.up()  # idempotent; makes the cluster persistent (kept until `hack/cluster down`)
            node.up(timeout=args.timeout, taint=not args.no_taint)
            print(node.cluster.kubeconfig)
        elif args.cmd == "down":
            node.down()
        elif args.cmd == "status":
            st = node.status()
            print(json.dumps(st, indent=2))
            return 0 if st["up"] else 3
        elif args.cmd == "build":
            for name, path in node.build().items():
                print(f"{name}\t{path}")
            for ref, (archive, digest) in build_images(_bin_path("pause", PAUSE_VERSION)).items():
                print(f"{ref}\t{digest}\t{archive}")
        elif args.cmd == "images":
            node.preflight()
            if not node.containerd_serving():
                raise NodeError(f"no containerd serves {CONTAINERD_SOCK} (run `hack/node up`)")
            nst = node.state()
            sandbox = nst.sandbox_image if nst else foreign_cri_config()[0].get("sandbox_image", DEFAULT_SANDBOX_IMAGE)
            for ref, digest in node.import_images(sandbox_image=sandbox).items():
                print(f"{ref}\t{digest}")
        elif args.cmd == "containerd-config":
            print(containerd_config(), end="")
    except (BuildError, ClusterError, NodeError) as e:
        _log(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
