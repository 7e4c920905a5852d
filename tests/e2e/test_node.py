"""The real node works step by step: it registers Ready with containerd and the cgroupfs driver, the local
images are there (never pulled), a pod runs and its logs and exec work through the kubelet, pods reach the
API server through the `kubernetes` Service, kube-proxy routes a ClusterIP Service to another pod, and
CoreDNS resolves Service names.

Each test is one step of docs/dev/node.md; a later step failing does not hide an earlier one working."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import uuid
from pathlib import Path

from kubernetes import client

from lorafleet_dev.build import KUBERNETES_VERSION
from lorafleet_dev.node import (
    APISERVER_PROXY_PORT,
    CONTAINERD_SOCK,
    DNS_SERVICE_IP,
    NODE_POOL,
    NODE_POOL_LABEL,
    PAUSE_IMAGE,
    TAINT_KEY,
    LocalNode,
)
from lorafleet_dev.testing import wait_until
from tests.e2e.conftest import NodeHandle

HELLO = "hello from a real container"


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:5]}"


def test_node_is_ready_with_containerd(node: NodeHandle) -> None:
    n = node.cluster.core.read_node(node.name)
    ready = {c.type: c.status for c in n.status.conditions}
    assert ready["Ready"] == "True", n.status.conditions
    info = n.status.node_info
    assert info.kubelet_version == KUBERNETES_VERSION
    assert info.container_runtime_version.startswith("containerd://1.")
    assert {"type": "InternalIP", "address": node.ip} in [a.to_dict() for a in n.status.addresses]
    assert n.metadata.labels[NODE_POOL_LABEL] == NODE_POOL
    st = LocalNode().state()
    assert [t.key for t in n.spec.taints or []] == ([TAINT_KEY] if st and st.taint else [])
    assert int(n.status.allocatable["pods"]) > 0


def test_local_images_are_on_the_node(node: NodeHandle) -> None:
    names = {name for img in node.cluster.core.read_node(node.name).status.images or [] for name in img.names or []}
    assert {node.busybox, PAUSE_IMAGE} <= names, names


def test_pod_runs_and_its_logs_and_exec_work(node: NodeHandle, namespace: str) -> None:
    node.create_pod(namespace, node.pod("hello", ["sh", "-c", f"echo '{HELLO}'; exec sleep 3600"]))
    node.wait_phase(namespace, "hello", ("Running",))
    pod = node.cluster.core.read_namespaced_pod("hello", namespace)
    assert pod.spec.node_name == node.name
    assert pod.status.pod_ip.startswith(node.ip.rsplit(".", 1)[0] + "."), pod.status.pod_ip
    # The API server fetches logs from the kubelet (its serving cert, webhook authn/authz).
    assert wait_until(lambda: HELLO in node.logs(namespace, "hello"), timeout=20, what="the pod's log")
    out = node.kubectl_run("exec", "-n", namespace, "hello", "--", "cat", "/etc/hostname")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hello"


def test_pod_reaches_the_api_server(node: NodeHandle, namespace: str) -> None:
    # Through the `kubernetes` Service (10.0.0.1:443 -> kube-proxy -> the forwarder on the node's IP).
    # busybox's TLS client cannot talk to Go's TLS server, so this checks the TCP path; the TLS check below
    # runs Python inside the pod's network namespace.
    script = 'echo | nc -w 5 "$KUBERNETES_SERVICE_HOST" "$KUBERNETES_SERVICE_PORT" && echo tcp-ok'
    phase, logs = node.run(namespace, "api-tcp", script)
    assert phase == "Succeeded" and "tcp-ok" in logs, logs

    node.create_pod(namespace, node.pod("api-tls", ["sleep", "3600"]))
    node.wait_phase(namespace, "api-tls", ("Running",))
    token = node.kubectl_run("exec", "-n", namespace, "api-tls", "--", "cat", _TOKEN).stdout.strip()
    assert token, "no service-account token in the pod"
    pid = _pod_pid(node, namespace, "api-tls")
    ca = str(node.cluster.kubeconfig.parent / "pki" / "ca.crt")
    probe = (
        "import json, ssl, sys, urllib.request\n"
        "ctx = ssl.create_default_context(cafile=sys.argv[1])\n"
        "req = urllib.request.Request('https://10.0.0.1/api/v1/namespaces/' + sys.argv[2] + '/pods',\n"
        "                             headers={'Authorization': 'Bearer ' + sys.argv[3]})\n"
        "try:\n"
        "    urllib.request.urlopen(req, context=ctx, timeout=10)\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(json.dumps({'code': e.code, 'body': json.loads(e.read())}))\n"
    )
    out = subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", "python3", "-c", probe, ca, namespace, token],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    # TLS verified against the Service IP, the token authenticated as the pod's ServiceAccount, and RBAC
    # (nothing granted) forbids listing pods: the whole in-cluster path works.
    reply = json.loads(out.stdout)
    assert reply["code"] == 403, reply
    assert f"system:serviceaccount:{namespace}:default" in reply["body"]["message"], reply


_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


def _pod_pid(node: NodeHandle, namespace: str, name: str) -> int:
    """PID of the pod's container on this machine (from containerd), to enter its network namespace."""
    pod = node.cluster.core.read_namespaced_pod(name, namespace)
    cid = pod.status.container_statuses[0].container_id.split("://", 1)[1]
    ctr = ["ctr", f"--address={CONTAINERD_SOCK}", "-n", "k8s.io"]
    tasks = subprocess.run([*ctr, "tasks", "ls"], capture_output=True, text=True, check=True)
    for line in tasks.stdout.splitlines():
        parts = line.split()
        if parts and parts[0] == cid:
            return int(parts[1])
    raise AssertionError(f"no containerd task {cid}")


def _web(node: NodeHandle, namespace: str) -> str:
    """A busybox httpd pod behind a ClusterIP Service `web` (port 80 -> 8080); returns the ClusterIP."""
    script = f"mkdir -p /www && echo '{HELLO} via a Service' > /www/index.html && exec httpd -f -p 8080 -h /www"
    node.create_pod(namespace, node.pod("web", ["sh", "-c", script], labels={"app": "web"}, ports=[8080]))
    svc = node.cluster.core.create_namespaced_service(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
        },
    )
    node.wait_phase(namespace, "web", ("Running",))

    def ready_endpoint() -> bool:
        slices = client.DiscoveryV1Api(node.cluster.api_client).list_namespaced_endpoint_slice(
            namespace, label_selector="kubernetes.io/service-name=web"
        )
        return any(e.conditions.ready for s in slices.items for e in s.endpoints or [])

    wait_until(ready_endpoint, timeout=30, what="a ready endpoint for Service web")
    return str(svc.spec.cluster_ip)


def test_cluster_ip_service_reaches_another_pod(node: NodeHandle, namespace: str) -> None:
    ip = _web(node, namespace)
    # kube-proxy may need a moment to program the new endpoint: retry inside the pod.
    script = f"for i in $(seq 20); do timeout 2 wget -qO- http://{ip}/ && exit 0; sleep 0.5; done; exit 1"
    phase, logs = node.run(namespace, "client", script)
    assert phase == "Succeeded", logs
    assert f"{HELLO} via a Service" in logs


def test_coredns_resolves_service_names(node: NodeHandle, namespace: str) -> None:
    ip = _web(node, namespace)
    fqdn = f"web.{namespace}.svc.cluster.local"
    script = (
        "cat /etc/resolv.conf; "
        f"for i in $(seq 20); do nslookup {fqdn} && break; sleep 0.5; done; "
        "timeout 5 wget -qO- http://web/ && echo short-name-ok"  # the search path of ClusterFirst
    )
    phase, logs = node.run(namespace, "dns", script)
    assert phase == "Succeeded", logs
    assert f"nameserver {DNS_SERVICE_IP}" in logs
    assert ip in logs, logs
    assert "short-name-ok" in logs and f"{HELLO} via a Service" in logs


def test_apiserver_forwarder_is_the_kubernetes_endpoint(node: NodeHandle) -> None:
    slices = node.kubectl_run(
        "get", "endpointslices", "-n", "default", "-l", "kubernetes.io/service-name=kubernetes", "-o", "json"
    )
    assert slices.returncode == 0, slices.stderr
    items = json.loads(slices.stdout)["items"]
    assert [(e["addresses"], p["port"]) for s in items for e in s["endpoints"] for p in s["ports"]] == [
        ([node.ip], APISERVER_PROXY_PORT)
    ]


def _forward_drops() -> int:
    """Packets dropped so far by the node's FORWARD rule (traffic from pods to outside the pod network)."""
    out = subprocess.run(
        ["iptables", "-w", "-L", "FORWARD", "-v", "-n", "-x"], capture_output=True, text=True, check=True
    ).stdout
    return sum(int(line.split()[0]) for line in out.splitlines() if "lorafleet-node" in line)


def _outside_address() -> str:
    """The machine's upstream resolver, or its default gateway: an address beyond the pod network."""
    resolv = Path("/etc/resolv.conf").read_text().splitlines()
    for line in resolv:
        parts = line.split()
        if parts[:1] == ["nameserver"] and not ipaddress.ip_address(parts[1]).is_loopback:
            return parts[1]
    route = subprocess.run(["ip", "-4", "route", "show", "default"], capture_output=True, text=True).stdout.split()
    assert "via" in route, "no upstream resolver and no default gateway to test with"
    return route[route.index("via") + 1]


def test_pods_get_no_answer_from_outside_the_machine(node: NodeHandle, namespace: str) -> None:
    # CoreDNS forwards nothing, and the FORWARD rule drops what pods send beyond the pod network (here: the
    # machine's upstream resolver, or its gateway).
    upstream = _outside_address()
    before = _forward_drops()
    script = (
        "nslookup kubernetes.io && echo external-name-resolved; "
        f"nslookup kubernetes.io {upstream} && echo upstream-answered; "
        f"echo | timeout 3 nc {upstream} 53 && echo upstream-tcp-connected; "
        "echo done"
    )
    phase, logs = node.run(namespace, "outside", script)
    assert phase == "Succeeded" and "done" in logs, logs
    assert "external-name-resolved" not in logs and "upstream-answered" not in logs, logs
    assert "upstream-tcp-connected" not in logs, logs
    assert _forward_drops() > before
