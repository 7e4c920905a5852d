"""A real node for the local cluster, where pods really run: ``python -m lorafleet_dev.node`` (``hack/node``).

Commands::

    up                 start the cluster if needed, then containerd (unless one already serves the socket), the
                       node's network, kubelet, kube-proxy and CoreDNS; import the local images; wait until the
                       Node is Ready (idempotent)
    down               drain the node, stop everything ``up`` started, undo its network changes, delete its state
    status             print what runs (JSON)
    build              build (and cache) kubelet, kube-proxy, CoreDNS and pause, and the node's images
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
  busybox-static with every applet linked), built by buildah from ``tools/lorafleet_dev/node_images/*/Dockerfile``
  (lorafleet_dev.images, the one image builder) and imported with ``ctr -n k8s.io images import``.
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

from lorafleet_dev.node.binaries import build_binaries, build_images
from lorafleet_dev.node.config import (
    APISERVER_PROXY_PORT,
    BUSYBOX_IMAGE,
    CLUSTER_DOMAIN,
    CONTAINERD_PRIVATE,
    CONTAINERD_SOCK,
    COREDNS_VERSION,
    DNS_SERVICE_IP,
    HARNESS_LABEL,
    NODE_IP,
    NODE_NAME,
    NODE_POOL,
    NODE_POOL_LABEL,
    PAUSE_IMAGE,
    PAUSE_VERSION,
    POD_SUBNET,
    TAINT_KEY,
    NodeError,
    NodeState,
)
from lorafleet_dev.node.containerd import containerd_config, foreign_cri_config, running_containerd
from lorafleet_dev.node.lifecycle import LocalNode, main
from lorafleet_dev.node.network import forward

__all__ = [
    "APISERVER_PROXY_PORT",
    "BUSYBOX_IMAGE",
    "CLUSTER_DOMAIN",
    "CONTAINERD_PRIVATE",
    "CONTAINERD_SOCK",
    "COREDNS_VERSION",
    "DNS_SERVICE_IP",
    "HARNESS_LABEL",
    "NODE_IP",
    "NODE_NAME",
    "NODE_POOL",
    "NODE_POOL_LABEL",
    "PAUSE_IMAGE",
    "PAUSE_VERSION",
    "POD_SUBNET",
    "TAINT_KEY",
    "LocalNode",
    "NodeError",
    "NodeState",
    "build_binaries",
    "build_images",
    "containerd_config",
    "foreign_cri_config",
    "forward",
    "main",
    "running_containerd",
]
