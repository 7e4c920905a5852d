"""The ingress NetworkPolicy lorafleet renders for an AdapterDeployment is enforced on the real node (issue 15):
the serving port (the gateway, 8000) answers pods of the AdapterDeployment's own namespace and of the namespaces its
spec.access.allowedNamespaces lists, and no pod of any other namespace; the status port (8002, /lorafleet/state)
answers only the operator's namespace, not even the AdapterDeployment's own.

The policy is the one the AdapterDeployment controller plans (lorafleet.controllers.adapterdeployment.plan), applied
alone (not the egress policy beside it: this test is about who may call in). The serving replicas are stood in for
by a busybox httpd pod (the node's local busybox image) carrying the labels the policy selects, which are the labels
of the planned Deployment's pods, listening on both ports: running vLLM here would test nothing more about the
policy. The engine is kube-router's firewall on the node (``lorafleet_dev.netpol``, which enforces ingress rules
as well as egress ones; bridged pod-to-pod traffic reaches iptables through bridge-nf-call-iptables). Without the
policy every caller is answered, so only the policy can block them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from lorafleet.config import OperatorSettings
from lorafleet.contracts.serving import GATEWAY_PORT, STATE_PORT
from lorafleet.controllers import adapterdeployment as ad_controller
from lorafleet_dev.cluster import LocalCluster
from lorafleet_dev.node import LocalNode
from lorafleet_dev.testing import wait_until
from tests.e2e.conftest import NodeHandle
from tests.e2e.test_network_policy import _fetch, _pod_chain_exists, _policy_chain_of
from tests.unit import objects

Obj = dict[str, Any]


def _answered(output: str, port: int) -> bool:
    return f"port-{port}" in output


def _plan(namespace: str, listed: str, operator_namespace: str) -> tuple[Obj, dict[str, str]]:
    """The ingress policy the controller plans, and the labels of the planned Deployment's pods."""
    settings = OperatorSettings(
        store_endpoint="http://10.85.0.1:9000",
        store_uri="s3://lorafleet",
        network_policy=True,
        operator_namespace=operator_namespace,
    )
    ad = objects.adapter_deployment_obj(
        objects.adapter_deployment(name="chat", namespace=namespace, access={"allowedNamespaces": [listed]})
    )
    base = objects.as_base_model(objects.ready(objects.base_model(namespace=namespace)))
    children, error = ad_controller.plan(ad, base, {}, settings)
    assert error is None and children is not None
    deployment = next(c for c in children if c["kind"] == "Deployment")
    [policy] = [
        c
        for c in children
        if c["kind"] == "NetworkPolicy" and c["spec"]["policyTypes"] == ["Ingress"]  # not the egress policy
    ]
    del policy["metadata"]["ownerReferences"]  # no AdapterDeployment exists: the garbage collector would delete it
    return policy, dict(deployment["spec"]["template"]["metadata"]["labels"])


@pytest.fixture
def namespaces(node: NodeHandle, namespace: str) -> Iterator[dict[str, str]]:
    """The AdapterDeployment's namespace, one it lists, one it does not, and the operator's."""
    names = {"own": namespace, **{role: f"{namespace[:50]}-{role}" for role in ("listed", "other", "operator")}}
    core = node.cluster.core
    for role, name in names.items():
        if role != "own":
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    for name in names.values():  # pods need the namespace's default ServiceAccount
        wait_until(
            lambda n=name: bool(core.list_namespaced_service_account(n, field_selector="metadata.name=default").items),
            timeout=30,
            what=f"ServiceAccount default in {name}",
        )
    yield names
    for role, name in names.items():
        if role != "own":
            core.delete_namespace(name, propagation_policy="Background")


def test_serving_ingress_admits_own_and_listed_namespaces_only(node: NodeHandle, namespaces: dict[str, str]) -> None:
    from lorafleet_dev import netpol

    engine = netpol.engine_for(LocalNode(LocalCluster())).status()
    assert engine["running"] and engine["forward_jump"], f"no NetworkPolicy engine on the node: {engine}"

    ns = namespaces["own"]
    policy, replica_labels = _plan(ns, namespaces["listed"], namespaces["operator"])
    selected = policy["spec"]["podSelector"]["matchLabels"]
    assert selected.items() <= replica_labels.items(), "the policy must select the serving replicas"
    policy_name = policy["metadata"]["name"]

    # The stand-in replica: an httpd per port (each daemonizes), each answering with its port.
    script = (
        f"for p in {GATEWAY_PORT} {STATE_PORT}; do mkdir -p /www$p && echo port-$p > /www$p/index.html && "
        "httpd -p $p -h /www$p || exit 1; done; exec sleep 3600"
    )
    node.create_pod(ns, node.pod("replica", ["sh", "-c", script], labels=replica_labels))
    callers = {role: f"caller-{role}" for role in namespaces}
    for role, pod in callers.items():
        node.create_pod(namespaces[role], node.pod(pod, ["sleep", "3600"]))
    node.wait_phase(ns, "replica", ("Running",))
    for role, pod in callers.items():
        node.wait_phase(namespaces[role], pod, ("Running",))
    wait_until(lambda: _pod_chain_exists("replica", ns), timeout=30, what="kube-router's chain for the replica")
    ip = node.cluster.core.read_namespaced_pod("replica", ns).status.pod_ip
    url = {port: f"http://{ip}:{port}/" for port in (GATEWAY_PORT, STATE_PORT)}

    def reply(role: str, port: int) -> str:
        return _fetch(node, namespaces[role], callers[role], url[port])

    # Without the policy, every namespace gets an answer on both ports (httpd may need a moment to listen).
    for role in namespaces:
        for port in (GATEWAY_PORT, STATE_PORT):
            wait_until(
                lambda r=role, p=port: _answered(reply(r, p), p),
                timeout=30,
                what=f"port {port} answering {role} before the policy",
            )

    client.NetworkingV1Api(node.cluster.api_client).create_namespaced_network_policy(ns, policy)
    wait_until(
        lambda: _policy_chain_of("replica", ns, policy_name),
        timeout=30,
        what=f"kube-router applying {policy_name} to the replica",
    )
    # Admitted: the gateway from its own and the listed namespace, the status port from the operator's.
    for role, port in (("own", GATEWAY_PORT), ("listed", GATEWAY_PORT), ("operator", STATE_PORT)):
        wait_until(
            lambda r=role, p=port: _answered(reply(r, p), p),
            timeout=30,
            what=f"port {port} answering {role} ({namespaces[role]}) under {policy_name}",
        )
    # Refused: everything else, the tenant's own namespace included on the status port.
    for role, port in (
        ("other", GATEWAY_PORT),
        ("other", STATE_PORT),
        ("own", STATE_PORT),
        ("listed", STATE_PORT),
        ("operator", GATEWAY_PORT),
    ):
        out = reply(role, port)
        assert not _answered(out, port) and "rc=0" not in out, (
            f"{policy_name} admits port {port} only from {'the operator' if port == STATE_PORT else 'own and listed'}"
            f" namespaces, yet {role} ({namespaces[role]}) got: {out}"
        )
