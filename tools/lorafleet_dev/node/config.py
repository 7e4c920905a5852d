"""The real node's constants (names, addresses, paths), its saved state and small helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet_dev.cluster import (
    Proc,
    run_command,
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
DEBIAN_PACKAGES = ("containerd", "runc", "containernetworking-plugins", "iptables", "busybox-static", "buildah")
REQUIRED_FILES = {
    "containerd": Path("/usr/bin/containerd"),
    "containerd-shim-runc-v2": Path("/usr/bin/containerd-shim-runc-v2"),
    "ctr": Path("/usr/bin/ctr"),
    "runc": Path("/usr/sbin/runc"),
    "iptables": Path("/usr/sbin/iptables"),
    **{f"cni {p}": CNI_BIN_DIR / p for p in ("bridge", "host-local", "loopback", "portmap")},
    "busybox": BUSYBOX_BINARY,
    "buildah": Path("/usr/bin/buildah"),  # builds the node's images (lorafleet_dev.images)
}
# Start order; `down` stops them in reverse.
PROCESSES = ("containerd", "apiserver-proxy", "coredns", "kubelet", "kube-proxy")
SYSCTLS = {"net/ipv4/ip_forward": "1", "net/bridge/bridge-nf-call-iptables": "1"}
FORWARD_RULE = ["-s", POD_SUBNET, "!", "-d", POD_SUBNET, "-m", "comment", "--comment", "lorafleet-node", "-j", "DROP"]


class NodeError(RuntimeError):
    pass


def _log(msg: str) -> None:
    print(f"[node] {msg}", file=sys.stderr, flush=True)


def _run(args: Sequence[str], check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return run_command(args, NodeError, check, timeout)


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
