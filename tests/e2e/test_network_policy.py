"""The egress NetworkPolicy lorafleet renders for a training pod is enforced on the real node (docs/dev/node.md).

The engine is kube-router's firewall (``lorafleet_dev.netpol``), started by ``hack/node up`` or by the ``node``
fixture. Two HTTP listeners run on the host: one on the node's IP 10.85.0.1 (where MinIO listens in the
training test; the policy's allowed CIDR here) and one on the machine's own address outside the pod network
(e.g. eth0's), which pods reach through the host's INPUT chain, never through the node's FORWARD DROP.
A pod with the labels the policy selects gets an answer from both without the policy, only from the allowed
one with it, and from both again once the policy is deleted; a pod without those labels is never affected.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kubernetes import client

from lorafleet.config import OperatorSettings
from lorafleet.resources import finetunejob as ftj_res
from lorafleet_dev.cluster import LocalCluster
from lorafleet_dev.node import NODE_IP, POD_SUBNET, LocalNode
from lorafleet_dev.testing import wait_until
from tests.e2e.conftest import NodeHandle
from tests.unit import objects

NODE_PORTS = range(30000, 32768)  # kube-router lets pods reach host addresses on NodePorts, policy or not


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        host = self.server.server_address[0]  # type: ignore[index]
        body = f"hello-from-{host}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _listener(host: str) -> Iterator[str]:
    """An HTTP server on host:<free port outside the NodePort range>; yields its URL."""
    servers = []
    try:
        while True:
            server = ThreadingHTTPServer((host, 0), _Hello)
            servers.append(server)
            if server.server_address[1] not in NODE_PORTS:
                break
        for extra in servers[:-1]:
            extra.server_close()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield f"http://{host}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def _outside_host_address() -> str:
    """An address of this machine outside the pod network (pods reach it via INPUT, not FORWARD)."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True).stdout
    for addr in re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", out):
        if ipaddress.ip_address(addr) not in ipaddress.ip_network(POD_SUBNET):
            return addr
    pytest.fail(f"no global IPv4 address outside {POD_SUBNET} on this machine:\n{out}")


def _training_policy(ns: str, ftj_name: str) -> dict[str, Any]:
    """The NetworkPolicy the operator renders for a FineTuneJob whose only egress CIDR is the node's IP."""
    settings = OperatorSettings(
        store_endpoint=f"http://{NODE_IP}:9000",
        store_uri="s3://lorafleet",
        store_credentials_secret="lorafleet-store",
        egress_cidrs=[f"{NODE_IP}/32"],
    )
    ftj = objects.fine_tune_job(ftj_name, ns)
    base = objects.as_base_model(objects.ready(objects.base_model(namespace=ns)))
    children = ftj_res.desired_children(objects.as_fine_tune_job(ftj), base, settings)
    [policy] = [c for c in children if c["kind"] == "NetworkPolicy"]
    # The FineTuneJob is not in the cluster: without this the garbage collector would delete the policy.
    del policy["metadata"]["ownerReferences"]
    return policy


def _fetch(node: NodeHandle, ns: str, pod: str, url: str) -> str:
    """What a pod gets from url (busybox wget; `wget -T` segfaults in busybox 1.35, hence `timeout`)."""
    script = f"timeout 5 wget -q -O - {url} 2>&1; echo rc=$?"
    proc = node.kubectl_run("exec", "-n", ns, pod, "--", "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    print(f"{pod} -> {url}: {' '.join(proc.stdout.split())}")  # shown with `pytest -s`
    return str(proc.stdout)


def _answered(output: str, host: str) -> bool:
    return f"hello-from-{host}" in output


def _policy_chain_of(pod: str, ns: str, policy: str) -> bool:
    """kube-router's firewall chain for the pod runs through the policy's chain."""
    rules = subprocess.run(["iptables", "-w", "-S"], capture_output=True, text=True, check=True).stdout
    chains = set(re.findall(rf"POD name:{re.escape(pod)} namespace: {re.escape(ns)} to chain (KUBE-POD-FW-\w+)", rules))
    return any(
        line.startswith(f"-A {chain} ") and f"run through nw policy {policy}" in line
        for chain in chains
        for line in rules.splitlines()
    )


def _pod_chain_exists(pod: str, ns: str) -> bool:
    rules = subprocess.run(["iptables", "-w", "-S"], capture_output=True, text=True, check=True).stdout
    return f"POD name:{pod} namespace: {ns} " in rules


def test_training_egress_policy_is_enforced(node: NodeHandle, namespace: str) -> None:
    from lorafleet_dev import netpol

    ns = namespace
    engine = netpol.engine_for(LocalNode(LocalCluster())).status()
    assert engine["running"] and engine["forward_jump"], f"no NetworkPolicy engine on the node: {engine}"

    policy = _training_policy(ns, "netpol-probe")
    selected = policy["spec"]["podSelector"]["matchLabels"]
    assert selected == {"lorafleet.io/finetunejob": "netpol-probe"}
    policy_name = policy["metadata"]["name"]
    networking = client.NetworkingV1Api(node.cluster.api_client)
    outside = _outside_host_address()

    node.create_pod(ns, node.pod("trainer", ["sleep", "3600"], labels=dict(selected)))
    node.create_pod(ns, node.pod("other", ["sleep", "3600"], labels={"app": "not-selected"}))
    for pod in ("trainer", "other"):
        node.wait_phase(ns, pod, ("Running",))
        wait_until(lambda p=pod: _pod_chain_exists(p, ns), timeout=30, what=f"kube-router's chain for {pod}")

    with _listener(NODE_IP) as allowed_url, _listener(outside) as outside_url:
        # Without the policy: the outside address answers the selected pod (so only the engine can block it).
        out = _fetch(node, ns, "trainer", outside_url)
        assert _answered(out, outside), f"without a policy, {outside_url} should answer: {out}"
        assert _answered(_fetch(node, ns, "trainer", allowed_url), NODE_IP)

        networking.create_namespaced_network_policy(ns, policy)
        wait_until(
            lambda: _policy_chain_of("trainer", ns, policy_name),
            timeout=30,
            what=f"kube-router applying {policy_name} to the trainer pod",
        )
        out = _fetch(node, ns, "trainer", outside_url)
        assert not _answered(out, outside), f"the policy allows only {NODE_IP}/32, yet {outside_url} answered"
        assert "rc=0" not in out, out
        out = _fetch(node, ns, "trainer", allowed_url)
        assert _answered(out, NODE_IP), f"{NODE_IP}/32 is allowed by the policy: {out}"
        out = _fetch(node, ns, "other", outside_url)
        assert _answered(out, outside), f"a pod the policy does not select is not restricted: {out}"

        networking.delete_namespaced_network_policy(policy_name, ns)
        wait_until(
            lambda: not _policy_chain_of("trainer", ns, policy_name),
            timeout=30,
            what=f"kube-router removing {policy_name}",
        )
        out = _fetch(node, ns, "trainer", outside_url)
        assert _answered(out, outside), f"with the policy deleted, {outside_url} answers again: {out}"
