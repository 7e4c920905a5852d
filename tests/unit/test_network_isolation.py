"""Tenant isolation on the network, as rendered and as the gateway decides it (issue 15, point 6).

* DNS egress reaches only the cluster DNS pods in their namespace (one peer with both selectors), as configured.
* A serving pod's inference port admits its own namespace and the namespaces its spec lists; the state port (not
  on the Service) admits only the operator's namespace.
* API keys reach the pod only as a Secret volume; the gateway admits a protected adapter's request only with one
  of its keys (401 otherwise, 503 when none is configured: fail closed), compares in constant time, re-reads a
  rotated key, and sees the model vLLM would see (a duplicate key is refused).
* Request bodies have a per-request cap and a shared memory budget.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lorafleet.config import OperatorSettings
from lorafleet.contracts.serving import GATEWAY_PORT, STATE_PORT
from lorafleet.resources import adapterdeployment as ad_res
from lorafleet.resources import finetunejob as ftj_res
from lorafleet.resources.common import NAMESPACE_NAME_LABEL
from lorafleet.serving.guard import ApiKeys, BodyBudget, bearer_token, body_too_large, model_of
from tests.unit import objects

SETTINGS = OperatorSettings(
    store_endpoint="http://minio:9000", store_uri="s3://lorafleet", operator_namespace="lorafleet-system"
)
SECRET_VALUE = "sk-team-a-0123456789"


def _ad_children(settings: OperatorSettings = SETTINGS, **spec: object) -> dict[str, dict]:
    ad = objects.adapter_deployment_obj(objects.adapter_deployment(**spec))
    base = objects.as_base_model(objects.ready(objects.base_model()))
    children = ad_res.desired_children(ad, base, [], {}, settings)
    return {f"{c['kind']}/{c['metadata']['name']}": c for c in children}


def _ftj_policy(settings: OperatorSettings = SETTINGS) -> dict:
    ftj = objects.as_fine_tune_job(objects.fine_tune_job())
    base = objects.as_base_model(objects.ready(objects.base_model()))
    children = ftj_res.desired_children(ftj, base, settings)
    return next(c for c in children if c["kind"] == "NetworkPolicy")


def _dns_rules(policy: dict) -> list[dict]:
    return [r for r in policy["spec"]["egress"] if {"protocol": "UDP", "port": 53} in r.get("ports", [])]


@pytest.mark.parametrize("policy", ["training", "serving"])
def test_dns_egress_goes_only_to_the_cluster_dns_pods_in_their_namespace(policy: str) -> None:
    rendered = _ftj_policy() if policy == "training" else _ad_children()["NetworkPolicy/chat-egress"]
    [rule] = _dns_rules(rendered)
    # One peer with both selectors: a pod must match both (two peers would admit either).
    assert rule["to"] == [
        {
            "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ]


def test_the_platform_team_can_point_dns_elsewhere() -> None:
    settings = SETTINGS.model_copy(update={"dns_namespace": "dns", "dns_pod_labels": {"app": "coredns"}})
    [rule] = _dns_rules(_ftj_policy(settings))
    assert rule["to"][0]["namespaceSelector"]["matchLabels"] == {NAMESPACE_NAME_LABEL: "dns"}
    assert rule["to"][0]["podSelector"]["matchLabels"] == {"app": "coredns"}


def test_dns_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_DNS_NAMESPACE", "dns")
    monkeypatch.setenv("LORAFLEET_DNS_POD_LABELS", '{"app": "coredns"}')
    settings = OperatorSettings()
    assert (settings.dns_namespace, settings.dns_pod_labels) == ("dns", {"app": "coredns"})


def test_egress_policy_no_longer_opens_the_serving_port_to_everyone() -> None:
    egress = _ad_children()["NetworkPolicy/chat-egress"]
    assert egress["spec"]["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": {"lorafleet.io/adapterdeployment": "chat"}}}]}
    ]


def test_serving_port_admits_own_namespace_and_listed_ones_state_port_only_the_operator() -> None:
    children = _ad_children(access={"allowedNamespaces": ["ingress", "team-b", "ingress", "ml"]})
    policy = children["NetworkPolicy/chat-ingress"]
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    assert spec["podSelector"] == {"matchLabels": {"lorafleet.io/adapterdeployment": "chat"}}
    serving, state = spec["ingress"]
    assert serving["ports"] == [{"protocol": "TCP", "port": GATEWAY_PORT}]
    assert serving["from"] == [
        {"podSelector": {}},  # this namespace (ml), listed or not
        {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: "ingress"}}},
        {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: "team-b"}}},
    ]
    assert state == {
        "from": [{"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: "lorafleet-system"}}}],
        "ports": [{"protocol": "TCP", "port": STATE_PORT}],
    }
    assert policy["metadata"]["ownerReferences"][0]["controller"] is True


def test_by_default_only_the_own_namespace_reaches_the_serving_port() -> None:
    serving, _ = _ad_children()["NetworkPolicy/chat-ingress"]["spec"]["ingress"]
    assert serving["from"] == [{"podSelector": {}}]


def test_no_policies_when_the_platform_turns_them_off() -> None:
    children = _ad_children(SETTINGS.model_copy(update={"network_policy": False}))
    assert not [k for k in children if k.startswith("NetworkPolicy/")]


def test_allowed_namespaces_must_be_namespace_names() -> None:
    with pytest.raises(ValueError, match="allowedNamespaces"):
        _ad_children(access={"allowedNamespaces": ["Team_B"]})


def test_state_port_is_not_behind_the_service() -> None:
    children = _ad_children()
    service = children["Service/chat"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    sidecar = children["Deployment/chat-vllm"]["spec"]["template"]["spec"]["containers"][1]
    assert {p["name"]: p["containerPort"] for p in sidecar["ports"]} == {"http": GATEWAY_PORT, "state": STATE_PORT}
    assert f"--status-listen=0.0.0.0:{STATE_PORT}" in sidecar["command"]


def test_the_operator_reads_state_from_the_state_port(monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.request

    from lorafleet.controllers import adapterdeployment as ad_controller

    asked: list[str] = []

    def refused(url: str, timeout: float) -> None:
        asked.append(url)
        raise ConnectionRefusedError

    monkeypatch.setattr(urllib.request, "urlopen", refused)
    ad_controller._fetch_state({"metadata": {"name": "p"}, "status": {"podIP": "10.0.0.9"}})
    assert asked == [f"http://10.0.0.9:{STATE_PORT}/lorafleet/state"]


def test_api_keys_reach_the_pod_only_as_a_secret_volume() -> None:
    adapters = [
        {"name": "support-bot", "fineTuneJobRef": {"name": "support"}, "apiKeySecretRef": {"name": "k", "key": "a"}},
        {"name": "sql", "artifact": {"uri": "s3://lorafleet/adapters/sql/v3"}},
    ]
    children = _ad_children(adapters=adapters)
    pod = children["Deployment/chat-vllm"]["spec"]["template"]["spec"]
    sidecar = pod["containers"][1]
    [volume] = [v for v in pod["volumes"] if v["name"] == "api-keys"]
    assert volume["projected"]["sources"] == [
        {"secret": {"name": "k", "items": [{"key": "a", "path": "support-bot"}], "optional": True}}
    ]
    assert {"name": "api-keys", "mountPath": ad_res.API_KEYS_MOUNT, "readOnly": True} in sidecar["volumeMounts"]
    assert "--protected-model=support-bot" in sidecar["command"]
    assert "--protected-model=sql" not in sidecar["command"]
    # No env var of any container refers to the key's Secret (values or secretKeyRef).
    env = json.dumps([c.get("env") for c in pod["containers"] + pod["initContainers"]])
    assert '"k"' not in env
    # The vllm container cannot read the keys.
    assert all(m["name"] != "api-keys" for m in pod["containers"][0]["volumeMounts"])


def test_without_api_keys_the_pod_has_no_key_volume() -> None:
    pod = _ad_children()["Deployment/chat-vllm"]["spec"]["template"]["spec"]
    assert all(v["name"] != "api-keys" for v in pod["volumes"])
    assert not [a for a in pod["containers"][1]["command"] if a.startswith(("--api-keys-dir", "--protected-model"))]


def test_request_cap_is_passed_to_the_sidecar_and_bounded_at_admission() -> None:
    sidecar = _ad_children(service={"maxRequestBytes": 1 << 20})["Deployment/chat-vllm"]["spec"]["template"]["spec"][
        "containers"
    ][1]
    assert f"--max-request-bytes={1 << 20}" in sidecar["command"]
    default = _ad_children()["Deployment/chat-vllm"]["spec"]["template"]["spec"]["containers"][1]
    assert f"--max-request-bytes={8 << 20}" in default["command"]
    with pytest.raises(ValueError, match="maxRequestBytes"):
        _ad_children(service={"maxRequestBytes": 1 << 30})


# -- the gateway's checks --------------------------------------------------------------------------------------


def _keys(tmp_path: Path, **files: str) -> ApiKeys:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return ApiKeys(tmp_path, frozenset({"secret-bot", "missing-bot"}))


def test_unprotected_models_need_no_key(tmp_path: Path) -> None:
    keys = _keys(tmp_path, **{"secret-bot": SECRET_VALUE})
    assert keys.check("base", None) is None
    assert keys.check(None, None) is None
    assert ApiKeys(None).check("secret-bot", None) is None  # nothing protected at all


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (None, 401),
        ("", 401),
        (f"Basic {SECRET_VALUE}", 401),
        ("Bearer ", 401),
        ("Bearer sk-wrong", 401),
        (f"Bearer {SECRET_VALUE}x", 401),
        (f"Bearer {SECRET_VALUE}", None),
        (f"bearer   {SECRET_VALUE} ", None),
        ("Bearer sk-second", None),  # a second line: the next key during a rotation
    ],
)
def test_protected_models_need_one_of_their_keys(tmp_path: Path, header: str | None, status: int | None) -> None:
    keys = _keys(tmp_path, **{"secret-bot": f"{SECRET_VALUE}\nsk-second\n\n"})
    refusal = keys.check("secret-bot", header)
    assert (refusal.status if refusal else None) == status
    if refusal is not None:
        assert refusal.body()["error"]["code"] == 401 and "secret-bot" in refusal.message
        assert SECRET_VALUE not in json.dumps(refusal.body())  # never echoed
        assert dict(refusal.headers)["WWW-Authenticate"].startswith("Bearer")


def test_a_protected_model_without_keys_is_refused_to_everyone(tmp_path: Path) -> None:
    keys = _keys(tmp_path, **{"secret-bot": "\n"})
    for model in ("secret-bot", "missing-bot"):
        refusal = keys.check(model, f"Bearer {SECRET_VALUE}")
        assert refusal is not None and refusal.status == 503 and "apiKeySecretRef" in refusal.message


def test_a_rotated_key_is_read_again(tmp_path: Path) -> None:
    keys = _keys(tmp_path, **{"secret-bot": "old"})
    assert keys.check("secret-bot", "Bearer old") is None
    # The kubelet swaps the volume's files: a new inode and mtime.
    new = tmp_path / ".new"
    new.write_text("new")
    os.replace(new, tmp_path / "secret-bot")
    assert keys.check("secret-bot", "Bearer new") is None
    refusal = keys.check("secret-bot", "Bearer old")
    assert refusal is not None and refusal.status == 401


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import hmac

    from lorafleet.serving import guard

    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def compare(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(guard.hmac, "compare_digest", compare)
    keys = _keys(tmp_path, **{"secret-bot": "k1\nk2"})
    assert keys.check("secret-bot", "Bearer k1") is None
    assert seen == [(b"k1", b"k1"), (b"k1", b"k2")]  # every key compared, even after a match


def test_bearer_token() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("BEARER abc") == "abc"
    assert bearer_token("Token abc") is None
    assert bearer_token(None) is None


@pytest.mark.parametrize(
    ("body", "model"),
    [
        (b'{"model": "a", "prompt": "x"}', "a"),
        (b'{"prompt": "x"}', None),
        (b'{"model": 3}', None),
        (b"[1, 2]", None),
        (b"not json", None),
        (b"\xff\xfe", None),
        (b"", None),
        (None, None),
    ],
)
def test_model_of(body: bytes | None, model: str | None) -> None:
    assert model_of(body) == model


def test_a_duplicate_model_key_is_refused() -> None:
    # Parsers differ on which duplicate wins: the gateway must check the model vLLM serves.
    with pytest.raises(ValueError, match="duplicate key"):
        model_of(b'{"model": "open", "model": "secret-bot"}')


def test_body_budget() -> None:
    budget = BodyBudget(10)
    assert budget.reserve(6) and not budget.reserve(5) and budget.reserve(4)
    budget.release(6)
    assert budget.held == 4 and budget.reserve(6)
    budget.release(100)
    assert budget.held == 0


def test_body_too_large_names_the_limit_and_the_field() -> None:
    refusal = body_too_large(1024)
    assert refusal.status == 413 and "1024 bytes" in refusal.message and "maxRequestBytes" in refusal.message
