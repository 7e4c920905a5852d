"""NetworkPolicy enforcement on the local real node: kube-router's firewall only, as a host process.

``python -m lorafleet_dev.netpol {build,start,stop,status}``; ``hack/node up`` starts it after kube-proxy and
``hack/node down`` stops it (``lorafleet_dev.node``), unless ``LORAFLEET_NODE_NETPOL=off``.

* **Binary**: kube-router (``github.com/cloudnativelabs/kube-router/v2``, pinned), built through the Go module
  proxy by a wrapper module under ``${LORAFLEET_CACHE}/src/kube-router-<version>/`` into
  ``${LORAFLEET_CACHE}/bin/kube-router-<version>/kube-router``; build time recorded in ``bin/build-times.json``.
  The proxy here serves only v2.1.0 of it and the checksum database has no entry for it, so the wrapper's
  ``go.sum`` starts from the module's hashes pinned below (go then verifies the download against them instead
  of asking sum.golang.org); its dependencies are verified as usual.
* **Run**: ``kube-router --run-firewall=true --run-router=false --run-service-proxy=false`` with its own client
  certificate (``CN=lorafleet:kube-router``, a ClusterRole to get, list and watch what its informers need),
  ``--hostname-override=lorafleet-node``, its health server off (it would listen on every address). It needs
  ``ipset`` and ``iptables`` (Debian packages, installed with apt-get when missing). It writes jumps from
  INPUT/FORWARD/OUTPUT to ``KUBE-ROUTER-*``, ``KUBE-POD-FW-*`` and ``KUBE-NWPLCY-*`` chains and ``KUBE-SRC-*`` /
  ``KUBE-DST-*`` ipsets; ``stop`` removes exactly those. Pods that no policy selects stay open.
* **Adapted to the node**: a guard rule first in ``KUBE-ROUTER-FORWARD`` keeps the node's FORWARD DROP (pods
  never reach beyond the machine), and wrappers of ``iptables-save``/``iptables-restore`` on kube-router's PATH
  keep the filter table's counters across its full-table rewrites (docs/node.md has why).

State (pid, log, kubeconfig): ``<node state dir>/netpol/`` (default ``${LORAFLEET_CACHE}/node/lorafleet-node``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lorafleet_dev.build import Builder, BuildError, cache_dir
from lorafleet_dev.cluster import ClusterError, LocalCluster, _alive, _start_ticks, run_command, spawn_logged

KUBE_ROUTER_VERSION = os.environ.get("LORAFLEET_KUBE_ROUTER_VERSION", "v2.1.0")
KUBE_ROUTER_MODULE = "github.com/cloudnativelabs/kube-router/v2"
KUBE_ROUTER_PACKAGE = f"{KUBE_ROUTER_MODULE}/cmd/kube-router"
# The module's hashes (h1: of the zip and of go.mod) as the proxy served them on first download: sum.golang.org
# has no entry reachable from here (404), so these pins stand in for it. Other versions: checksum DB as usual.
KUBE_ROUTER_SUMS = {
    "v2.1.0": (
        "h1:xWsptKtmZ44L+NjwFKoFAFlVdxCz8fka9A/eYJe95Ok=",
        "h1:JU/k2Qqcph0myF1cRDLidz1SZdoSrPczuYcGxYRSP0A=",
    ),
}
USER = "lorafleet:kube-router"
HARNESS_LABEL = "lorafleet.io/node-harness"
DEBIAN_PACKAGES = ("ipset", "iptables")


class NetpolError(RuntimeError):
    pass


def _log(msg: str) -> None:
    print(f"[netpol] {msg}", file=sys.stderr, flush=True)


def _run(args: Sequence[str], check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return run_command(args, NetpolError, check, timeout)


# -- binary ------------------------------------------------------------------------------------------------


def binary_path(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "bin" / f"kube-router-{KUBE_ROUTER_VERSION}" / "kube-router"


def build(builder: Builder | None = None) -> Path:
    """Build kube-router once into the binary cache (a wrapper module that requires the pinned release)."""
    builder = builder or Builder()
    dest = binary_path(builder.cache)
    if dest.exists():
        return dest
    if not shutil.which("go"):
        raise BuildError("cannot build kube-router: `go` is not on PATH (needed once to fill the cache)")
    start = time.monotonic()
    v = KUBE_ROUTER_VERSION
    gomod = f"module lorafleet.local/build/kube-router\n\ngo 1.24.0\n\nrequire {KUBE_ROUTER_MODULE} {v}\n"
    # A tools file keeps the command's package in the module graph for `go mod tidy` (never compiled).
    files = {"tools.go": f'//go:build tools\n\npackage tools\n\nimport _ "{KUBE_ROUTER_PACKAGE}"\n'}
    if v in KUBE_ROUTER_SUMS:
        zip_sum, mod_sum = KUBE_ROUTER_SUMS[v]
        files["go.sum"] = f"{KUBE_ROUTER_MODULE} {v} {zip_sum}\n{KUBE_ROUTER_MODULE} {v}/go.mod {mod_sum}\n"
    src = builder._wrapper_module(f"kube-router-{v}", gomod, files)
    pkg = f"{KUBE_ROUTER_MODULE}/pkg/version"
    ldflags = f"-s -w -X {pkg}.Version={v} -X {pkg}.BuildDate={time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
    with tempfile.TemporaryDirectory(dir=builder.cache) as out:
        builder._go(["build", "-trimpath", f"-ldflags={ldflags}", "-o", f"{out}/kube-router", KUBE_ROUTER_PACKAGE], src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copy2(Path(out) / "kube-router", tmp)
        tmp.chmod(0o755)
        tmp.replace(dest)
    took = time.monotonic() - start
    builder.log(f"built kube-router {v} in {took:.0f}s")
    record = builder.cache / "bin" / "build-times.json"
    data = json.loads(record.read_text()) if record.exists() else {}
    data[f"kube-router-{v}"] = round(took, 1)
    record.write_text(json.dumps(data, indent=2) + "\n")
    return dest


# -- running it --------------------------------------------------------------------------------------------

# Rules and sets that only kube-router's firewall creates (removed by `stop`).
CHAIN_PREFIXES = ("KUBE-ROUTER-", "KUBE-NWPLCY-", "KUBE-POD-FW-")
JUMP_COMMENT = "kube-router netpol"
IPSET_PREFIXES = ("KUBE-SRC-", "KUBE-DST-")
FORWARD_CHAIN = "KUBE-ROUTER-FORWARD"
GUARD_COMMENT = "lorafleet-netpol"


# kube-router's firewall syncs by `iptables-save -t filter`, editing the text, and `iptables-restore -T filter`
# without --noflush: the whole filter table is rewritten, and every rule's packet counters (kubelet's,
# kube-proxy's, the node's FORWARD DROP that tests/e2e/test_node.py reads) would drop to 0 on each sync, which
# follows every pod change on the node. These two wrappers, first on kube-router's PATH, keep them: the save
# keeps a copy with counters (`-c`) and hands kube-router the text without them; the restore puts each kept
# counter back on the identical rule and restores with `-c`. Rules kube-router added start from 0.
_SAVE_SHIM = """#!/bin/sh
# lorafleet_dev.netpol: iptables-save for kube-router that keeps a copy with counters.
case "$*" in *--help*|*--version*|*-V*) exec {real} "$@";; esac
{real} -c "$@" > "{stash}.tmp" || exit $?
mv "{stash}.tmp" "{stash}"
sed -E 's/^\\[[0-9]+:[0-9]+\\] //' "{stash}"
"""
_RESTORE_SHIM = """#!/bin/sh
# lorafleet_dev.netpol: iptables-restore for kube-router that puts back the counters its save kept.
case "$*" in *--help*|*--version*|*-V*) exec {real} "$@";; esac
[ -f "{stash}" ] || exec {real} "$@"
awk 'FILENAME == ARGV[1] {{ if (match($0, /^\\[[0-9]+:[0-9]+\\] -A /)) {{ c = substr($0, 1, RLENGTH - 4);
                   r = substr($0, RLENGTH - 2); if (!(r in kept)) kept[r] = c }}; next }}
     /^-A / && ($0 in kept) {{ print kept[$0] " " $0; next }}
     {{ print }}' "{stash}" - | {real} -c "$@"
"""


def write_shims(directory: Path) -> Path:
    """The iptables-save / iptables-restore wrappers (see above) in directory/bin; returns that dir."""
    bindir = directory / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    stash = directory / "filter-with-counters.txt"
    for name, template in (("iptables-save", _SAVE_SHIM), ("iptables-restore", _RESTORE_SHIM)):
        real = shutil.which(name)
        if not real:
            raise NetpolError(f"{name} not found (Debian: apt-get install iptables)")
        path = bindir / name
        path.write_text(template.format(real=shlex.quote(real), stash=stash))
        path.chmod(0o755)
    return bindir


def enabled() -> bool:
    return os.environ.get("LORAFLEET_NODE_NETPOL", "kube-router") not in ("off", "0", "false", "none")


def guard_rule(pod_subnet: str) -> list[str]:
    """kube-router jumps to its chains from FORWARD position 1 and ACCEPTs every local pod's traffic that its
    policies allow (also pods without any policy), before the node's ``FORWARD -s <pods> ! -d <pods> -j DROP``.
    This rule, first in ``KUBE-ROUTER-FORWARD``, returns what pods send beyond the pod network to FORWARD, so the
    node's DROP still sees (and counts) it: nothing leaves the machine, whatever a policy allows."""
    return ["-s", pod_subnet, "!", "-d", pod_subnet, "-m", "comment", "--comment", GUARD_COMMENT, "-j", "RETURN"]


@dataclass
class Engine:
    """kube-router's firewall for one node (the node's state dir holds its state under ``netpol/``)."""

    node_name: str
    state_dir: Path  # the node's state dir
    pod_subnet: str
    service_cidr: str
    log: Callable[[str], None] = _log

    @property
    def dir(self) -> Path:
        return self.state_dir / "netpol"

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    def state(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.state_file.read_text())
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def alive(self, st: dict[str, Any] | None = None) -> bool:
        st = st or self.state()
        return st is not None and _alive(int(st["pid"]), st.get("start_ticks"))

    def jump_installed(self) -> bool:
        return JUMP_COMMENT in _run(["iptables", "-w", "-S", "FORWARD"], check=False).stdout

    def guard_installed(self) -> bool:
        args = ["iptables", "-w", "-C", FORWARD_CHAIN, *guard_rule(self.pod_subnet)]
        return _run(args, check=False).returncode == 0

    # -- prerequisites ----------------------------------------------------------------------------------

    @staticmethod
    def preflight(install: bool = True) -> None:
        """ipset and iptables (Debian packages; apt-get install as root when missing)."""
        missing = [p for p in DEBIAN_PACKAGES if not shutil.which(p)]
        apt = install and os.environ.get("LORAFLEET_NODE_NO_APT") != "1" and os.geteuid() == 0
        apt = apt and shutil.which("apt-get") is not None
        if missing and apt:
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            cmd = ["apt-get", "install", "-y", "--no-install-recommends", *DEBIAN_PACKAGES]
            if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
                subprocess.run(["apt-get", "update"], env=env, capture_output=True)
                subprocess.run(cmd, env=env, capture_output=True)
            missing = [p for p in DEBIAN_PACKAGES if not shutil.which(p)]
        if missing:
            raise NetpolError(f"missing {', '.join(missing)} (Debian: apt-get install {' '.join(DEBIAN_PACKAGES)})")

    def cluster_objects(self) -> list[dict[str, Any]]:
        """What kube-router's informers and its node lookup read (labelled, so `hack/node down` deletes it)."""
        labels = {HARNESS_LABEL: "true"}
        rules = [
            {
                "apiGroups": [""],
                "resources": ["pods", "namespaces", "nodes", "services", "endpoints"],
                "verbs": ["get", "list", "watch"],
            },
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
            {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["list", "watch"]},
        ]
        return [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": USER, "labels": labels},
                "rules": rules,
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": USER, "labels": labels},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": USER},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": USER}],
            },
        ]

    def args(self, binary: Path) -> list[str]:
        return [
            str(binary),
            "--run-firewall=true",
            "--run-router=false",
            "--run-service-proxy=false",
            f"--kubeconfig={self.dir / 'kube-router.kubeconfig'}",
            f"--hostname-override={self.node_name}",
            f"--service-cluster-ip-range={self.service_cidr}",
            "--health-port=0",  # its health server would listen on every address, pods' gateway included
            "--metrics-port=0",
            "--v=1",  # one line per sync ("sync iptables took ...")
        ]

    # -- start / stop -----------------------------------------------------------------------------------

    def start(self, cluster: LocalCluster, kubectl: Callable[..., Any], server: str, timeout: float = 60.0) -> bool:
        """Start kube-router unless it runs; wait for its first sync, then add the guard. True if started here."""
        st = self.state()
        if st and self.alive(st):
            self._ensure_guard(time.monotonic() + timeout)
            return False
        self.preflight()
        binary = build(cluster.builder)
        self.dir.mkdir(parents=True, exist_ok=True)
        cluster.pki.issue("node-kube-router", USER, client=True)
        cluster.pki.kubeconfig(self.dir / "kube-router.kubeconfig", server, USER, "node-kube-router", cluster.name)
        kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(self.cluster_objects(), sort_keys=False))
        log = self.dir / "kube-router.log"
        args = self.args(binary)
        shims = write_shims(self.dir)
        t0 = time.monotonic()
        child = spawn_logged(args, log, self.dir, {"PATH": f"{shims}{os.pathsep}{os.environ.get('PATH', '')}"})
        data = {"pid": child.pid, "start_ticks": _start_ticks(child.pid), "log": str(log), "args": args}
        self.state_file.write_text(json.dumps(data, indent=2) + "\n")
        deadline = t0 + timeout
        while not (self.jump_installed() and "sync iptables took" in log.read_text(errors="replace")):
            if child.poll() is not None:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                raise NetpolError(f"kube-router exited ({child.returncode}):\n{tail}")
            if time.monotonic() > deadline:
                raise NetpolError(f"kube-router did not finish its first sync in {timeout:.0f}s (log {log})")
            time.sleep(0.3)
        self._ensure_guard(deadline)
        self.log(f"kube-router {KUBE_ROUTER_VERSION} (firewall only) synced in {time.monotonic() - t0:.1f}s")
        return True

    def _ensure_guard(self, deadline: float) -> None:
        """Insert the guard; a sync that saved the table just before would drop it again, so check twice."""
        confirmed = 0
        while confirmed < 2:
            if self.guard_installed():
                confirmed += 1
            else:
                confirmed = 0
                _run(["iptables", "-w", "-I", FORWARD_CHAIN, "1", *guard_rule(self.pod_subnet)])
            if time.monotonic() > deadline:
                raise NetpolError(f"could not keep the guard rule first in {FORWARD_CHAIN}")
            time.sleep(0.5)

    def stop(self, grace: float = 10.0) -> None:
        """Stop kube-router and remove its jumps, chains and ipsets (only names kube-router's firewall uses)."""
        st = self.state()
        if st and self.alive(st):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(st["pid"]), signal.SIGTERM)
            end = time.monotonic() + grace
            while self.alive(st) and time.monotonic() < end:
                time.sleep(0.1)
            if self.alive(st):
                self.log(f"kube-router did not stop in {grace:.0f}s: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(int(st["pid"]), signal.SIGKILL)
        removed = cleanup_iptables()
        if st or removed:
            self.log(f"kube-router stopped; removed {removed} of its chains, rules and ipsets")
        self.state_file.unlink(missing_ok=True)

    def status(self) -> dict[str, Any]:
        st = self.state()
        if not st:
            return {"engine": "kube-router", "version": KUBE_ROUTER_VERSION, "running": False}
        return {
            "engine": "kube-router",
            "version": KUBE_ROUTER_VERSION,
            "running": self.alive(st),
            "pid": st["pid"],
            "log": st["log"],
            "forward_jump": self.jump_installed(),
            "guard": self.guard_installed(),
        }


def cleanup_iptables() -> int:
    """Remove kube-router's firewall rules from INPUT/FORWARD/OUTPUT, its chains and its ipsets."""
    removed = 0
    for chain in ("INPUT", "FORWARD", "OUTPUT"):
        for line in _run(["iptables", "-w", "-S", chain], check=False).stdout.splitlines():
            if line.startswith(f"-A {chain} ") and JUMP_COMMENT in line:
                spec = shlex.split(line)[2:]
                if _run(["iptables", "-w", "-D", chain, *spec], check=False).returncode == 0:
                    removed += 1
    chains = [
        line.split()[1]
        for line in _run(["iptables", "-w", "-S"], check=False).stdout.splitlines()
        if line.startswith("-N ") and line.split()[1].startswith(CHAIN_PREFIXES)
    ]
    for flag in ("-F", "-X"):
        for chain in chains:
            _run(["iptables", "-w", flag, chain], check=False)
    removed += len(chains)
    if shutil.which("ipset"):
        for name in _run(["ipset", "list", "-n"], check=False).stdout.split():
            if name.startswith(IPSET_PREFIXES) and _run(["ipset", "destroy", name], check=False).returncode == 0:
                removed += 1
    return removed


# -- the node's hook and the command line ------------------------------------------------------------------


def engine_for(node: Any) -> Engine:
    """The engine of a ``lorafleet_dev.node.LocalNode``."""
    from lorafleet_dev.cluster import SERVICE_CIDR
    from lorafleet_dev.node import NODE_NAME, POD_SUBNET

    return Engine(NODE_NAME, node.dir, POD_SUBNET, SERVICE_CIDR, node.log)


def start_for(node: Any, timeout: float = 60.0) -> bool:
    """Start the engine for a running node (called by ``LocalNode.up`` with the node's lock held)."""
    st = node.state()
    if st is None or not st.server:
        raise NetpolError("the node is not up (no state): run `hack/node up` first")
    return engine_for(node).start(node.cluster, node.kubectl, st.server, timeout)


def main(argv: Sequence[str] | None = None) -> int:
    from lorafleet_dev.cluster import DEFAULT_NAME
    from lorafleet_dev.node import LocalNode, NodeError

    parser = argparse.ArgumentParser(prog="python -m lorafleet_dev.netpol", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default=DEFAULT_NAME, help="cluster name (see hack/cluster)")
    parser.add_argument("cmd", choices=("build", "start", "stop", "status"))
    args = parser.parse_args(argv)
    try:
        if args.cmd == "build":
            print(build())
            return 0
        node = LocalNode(LocalCluster(args.name))
        if args.cmd == "status":
            print(json.dumps(engine_for(node).status(), indent=2))
            return 0
        with node._locked():
            node._follow_state(node.state())
            if args.cmd == "start":
                start_for(node)
            else:
                engine_for(node).stop()
    except (BuildError, ClusterError, NetpolError, NodeError) as e:
        _log(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
