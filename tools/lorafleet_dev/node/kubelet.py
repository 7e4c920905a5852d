"""The node's Kubernetes side: certificates and kubeconfigs for the kubelet, kube-proxy and CoreDNS, their config
files, and the cluster objects the node needs (CoreDNS RBAC, kube-dns, the endpoints of kubernetes and kube-dns)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lorafleet_dev.cluster import LOOPBACK
from lorafleet_dev.node.config import (
    APISERVER_PROXY_PORT,
    CLUSTER_DOMAIN,
    CONTAINERD_SOCK,
    DNS_SERVICE_IP,
    HARNESS_LABEL,
    KUBELET_PORT,
    NODE_IP,
    NODE_NAME,
    POD_SUBNET,
    TAINT_KEY,
    NodeState,
)

if TYPE_CHECKING:
    from lorafleet_dev.node.lifecycle import LocalNode


def issue_certs(node: LocalNode) -> dict[str, Path]:
    pki = node.cluster.pki
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


def write_configs(node: LocalNode, st: NodeState, server: str) -> None:
    d, pki, name = node.dir, node.cluster.pki, node.cluster.name
    serving = issue_certs(node)
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


def cluster_objects(node: LocalNode) -> list[dict[str, Any]]:
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


def apply_cluster_objects(node: LocalNode) -> None:
    docs = yaml.safe_dump_all(node.cluster_objects(), sort_keys=False)
    node.kubectl("apply", "-f", "-", stdin=docs)
