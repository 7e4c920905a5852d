"""The node's network: sysctls, the bridge, the CNI config, the FORWARD rule that keeps pods local, the cleanup of
kube-proxy's and the kubelet's iptables chains, and the TCP forwarder that lets pods reach the loopback-only API
server (``python -m lorafleet_dev.node forward``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import shutil
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lorafleet_dev.node.config import (
    BRIDGE,
    CNI_CONF,
    CNI_NETWORK,
    FORWARD_RULE,
    NODE_IP,
    POD_SUBNET,
    SYSCTLS,
    NodeState,
    _run,
    _sysctl_path,
)

if TYPE_CHECKING:
    from lorafleet_dev.node.lifecycle import LocalNode


# -- the API server forwarder (run as `python -m lorafleet_dev.node forward`) -------------------------------


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


def setup(node: LocalNode, st: NodeState) -> None:
    """Sysctls, the bridge with the node's IP, the CNI config and the FORWARD rule that keeps pods local."""
    for key, value in SYSCTLS.items():
        path = _sysctl_path(key)
        old = path.read_text().strip()
        if old != value:
            path.write_text(value + "\n")
            st.sysctls[key] = old
    node._save(st)
    if _run(["ip", "link", "show", BRIDGE], check=False).returncode != 0:
        _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        st.created.append("bridge")
        node._save(st)
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
    node._save(st)
