"""The node's life: ``LocalNode`` (preflight, up, down, status; state in ``state.json`` under a lock) and the
``hack/node`` command line. The parts live beside it: binaries, network, containerd, kubelet."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lorafleet_dev import netpol
from lorafleet_dev.build import KUBERNETES_VERSION, Builder, BuildError, cache_dir
from lorafleet_dev.cluster import (
    DEFAULT_NAME,
    LOOPBACK,
    ClusterError,
    LocalCluster,
    Proc,
    _alive,
    _free_ports,
    _start_ticks,
    spawn_logged,
    stop_processes,
)
from lorafleet_dev.images import ImageBuildError
from lorafleet_dev.node import containerd, kubelet, network
from lorafleet_dev.node.binaries import _bin_path, build_binaries, build_images
from lorafleet_dev.node.config import (
    APISERVER_PROXY_PORT,
    BRIDGE,
    BUSYBOX_IMAGE,
    CNI_CONF,
    CNI_IPAM_DIR,
    CONTAINERD_PRIVATE,
    CONTAINERD_SOCK,
    CONTAINERD_STATE,
    DEBIAN_PACKAGES,
    DEFAULT_SANDBOX_IMAGE,
    FORWARD_RULE,
    HARNESS_LABEL,
    NODE_IP,
    NODE_NAME,
    NODE_POOL,
    NODE_POOL_LABEL,
    PAUSE_IMAGE,
    PAUSE_VERSION,
    POD_SUBNET,
    PROCESSES,
    REQUIRED_FILES,
    TAINT_KEY,
    NodeError,
    NodeState,
    _log,
    _run,
    _sysctl_path,
)
from lorafleet_dev.node.containerd import containerd_config, foreign_cri_config
from lorafleet_dev.node.network import _mounts_under, _remove_kube_chains, forward
from lorafleet_dev.paths import PRODUCT_SOURCES, TOOLS_SOURCES


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
        """The NetworkPolicy engine (lorafleet_dev.netpol), unless LORAFLEET_NODE_NETPOL=off. Optional: if it
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
        network.setup(self, st)
        containerd.start_or_share(self, st, deadline)
        self.log(f"network and containerd ready ({time.monotonic() - t:.1f}s)")
        t = time.monotonic()
        self.import_images(bins["pause"], st.sandbox_image)
        self.log(f"images imported ({time.monotonic() - t:.1f}s)")
        kubelet.write_configs(self, st, server)
        kubelet.apply_cluster_objects(self)

        d = self.dir
        self._spawn(
            st,
            "apiserver-proxy",
            [
                sys.executable,
                "-m",
                "lorafleet_dev.node",
                "forward",
                f"{NODE_IP}:{APISERVER_PROXY_PORT}",
                f"{LOOPBACK}:{cst.ports['apiserver']}",
            ],
            f"tcp://{NODE_IP}:{APISERVER_PROXY_PORT}",
            env={
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [str(TOOLS_SOURCES), str(PRODUCT_SOURCES), os.environ.get("PYTHONPATH")])
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

    def containerd_serving(self) -> bool:
        return containerd.serving(self)

    def import_images(self, pause: Path | None = None, sandbox_image: str = PAUSE_IMAGE) -> dict[str, str]:
        """Build the node's images and import those whose build containerd does not hold yet."""
        return containerd.import_images(self, pause, sandbox_image)

    def cluster_objects(self) -> list[dict[str, Any]]:
        return kubelet.cluster_objects(self)

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
        containerd.remove_leftover_containers(self)
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
    from lorafleet_dev import node as package

    parser = argparse.ArgumentParser(prog="hack/node", description=(package.__doc__ or "").split("\n\n")[0])
    parser.add_argument("--name", default=DEFAULT_NAME, help="cluster name (see hack/cluster)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start (idempotent); starts the cluster too if it is not up")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the Node to be Ready")
    up.add_argument("--no-taint", action="store_true", help=f"register without the {TAINT_KEY} taint")
    sub.add_parser("down", help="drain, stop, undo network changes, delete state")
    sub.add_parser("status", help="print what runs (JSON)")
    sub.add_parser("build", help="build kubelet, kube-proxy, CoreDNS, pause and the node images")
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
            for ref, image in build_images(_bin_path("pause", PAUSE_VERSION)).items():
                print(f"{ref}\t{image.image_id}")
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
    except (BuildError, ClusterError, ImageBuildError, NodeError) as e:
        _log(f"error: {e}")
        return 1
    return 0
