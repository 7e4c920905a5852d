"""The Helm chart, rendered by the real helm (built into the cache by lorafleet_dev.build): it lints, its CRDs are the
generated ones byte for byte, a typo in values fails, every setting it renders is one the operator reads, and its
RBAC grants what the controllers do (every child kind they apply, the trainer Role they hand out) in both modes,
and Secrets only in the operator's own namespace and the namespaces rbac.secretNamespaces lists.

The RBAC is proven against a real API server in tests/integration/test_chart_rbac.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorafleet.config import OperatorSettings
from lorafleet.controllers import adapterdeployment as ad_controller
from lorafleet.controllers import finetunejob as ftj_controller
from lorafleet_dev.build import Builder, BuildError
from tests.unit import objects

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "lorafleet"
KUBE_VERSION = "1.34.4"  # the local cluster's; helm built from source reports v1.20 unless told
NAMESPACE = "lorafleet-system"

Obj = dict[str, Any]
# The first run on a fresh machine builds helm (about 2 minutes) or kubectl (10 minutes or more) from source.
pytestmark = pytest.mark.timeout(1800)

# Every kind a controller applies, and its RBAC resource. A new child kind fails test_rbac_covers_every_child
# until it is added here and to the chart's rules.
CHILD_RESOURCES = {
    "ConfigMap": ("", "configmaps"),
    "ServiceAccount": ("", "serviceaccounts"),
    "Role": ("rbac.authorization.k8s.io", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io", "rolebindings"),
    "Service": ("", "services"),
    "Job": ("batch", "jobs"),
    "Deployment": ("apps", "deployments"),
    "PodDisruptionBudget": ("policy", "poddisruptionbudgets"),
    "NetworkPolicy": ("networking.k8s.io", "networkpolicies"),
}


def helm_binary() -> Path:
    """The pinned helm, built on first use (about 2 minutes with Go; see docs/dev/cluster.md)."""
    try:
        return Builder(log=lambda _: None).ensure(["helm"])["helm"]
    except BuildError as exc:
        pytest.fail(f"could not build helm for the chart tests: {exc}", pytrace=False)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def set_args(values: dict[str, Any] | None) -> list[str]:
    """--set-json per top-level key: exact JSON types, no helm string parsing surprises."""
    return [arg for key, value in (values or {}).items() for arg in ("--set-json", f"{key}={json.dumps(value)}")]


def render(
    values: dict[str, Any] | None = None, *, release: str = "lorafleet", namespace: str = NAMESPACE
) -> list[Obj]:
    out = helm(
        "template", release, str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION, *set_args(values)
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(docs: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def container(docs: list[Obj]) -> Obj:
    deployment = one(docs, "Deployment")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    return dict(containers[0])


def plain_env(docs: list[Obj]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(docs)["env"] if "value" in e}


def allows(rules: list[Obj], group: str, resource: str, verb: str) -> bool:
    return any(
        group in r.get("apiGroups", [])
        and resource in r.get("resources", [])
        and (verb in r.get("verbs", []) or "*" in r.get("verbs", []))
        for r in rules
    )


@pytest.fixture(scope="module")
def default_render() -> list[Obj]:
    return render()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in list(os.environ):
        if name.startswith("LORAFLEET_"):
            monkeypatch.delenv(name)
    yield monkeypatch


# --- chart basics ---------------------------------------------------------------------------------------------


def test_chart_lints_strictly() -> None:
    proc = helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION)
    assert "0 chart(s) failed" in proc.stdout


def test_chart_crds_are_the_generated_crds_byte_for_byte() -> None:
    top = {p.name: p.read_bytes() for p in sorted((REPO / "crds").glob("*.yaml"))}
    chart = {p.name: p.read_bytes() for p in sorted((CHART / "crds").glob("*.yaml"))}
    assert top, "crds/ is empty: run hack/generate"
    assert chart.keys() == top.keys(), "charts/lorafleet/crds/ must hold exactly the files of crds/"
    stale = [name for name in top if chart[name] != top[name]]
    assert not stale, f"charts/lorafleet/crds/ differs from crds/ for {stale}: cp crds/*.yaml charts/lorafleet/crds/"


def test_chart_app_version_is_the_operator_version() -> None:
    from lorafleet import __version__

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__ == chart["version"]


def test_default_render_has_the_expected_objects(default_render: list[Obj]) -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in default_render)
    assert kinds == [
        ("ClusterRole", "lorafleet"),
        ("ClusterRole", "lorafleet-discovery"),
        ("ClusterRoleBinding", "lorafleet"),
        ("ClusterRoleBinding", "lorafleet-discovery"),
        ("Deployment", "lorafleet"),
        ("PodDisruptionBudget", "lorafleet"),
        ("Role", "lorafleet-leader-election"),
        ("Role", "lorafleet-secrets"),  # its own namespace's Secrets only
        ("RoleBinding", "lorafleet-leader-election"),
        ("RoleBinding", "lorafleet-secrets"),
        ("Service", "lorafleet-metrics"),
        ("ServiceAccount", "lorafleet"),
    ]
    for doc in default_render:
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["kind"]


def test_deployment_is_hardened_and_probed(default_render: list[Obj]) -> None:
    deployment = one(default_render, "Deployment")
    spec = deployment["spec"]
    # Two replicas, one leading: a rollout may overlap old and new pods because only the Lease holder writes.
    assert spec["replicas"] == 2
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "lorafleet"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = container(default_render)
    assert c["command"] == ["lorafleet", "operator"]
    assert c["image"] == "lorafleet/operator:0.1.0"
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    # Read-only root: the only writable path is /tmp (discovery cache, CA bundle files).
    assert [m["mountPath"] for m in c["volumeMounts"]] == ["/tmp"]
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()


def test_metrics_service_selects_the_operator_pod(default_render: list[Obj]) -> None:
    service = one(default_render, "Service")
    pod_labels = one(default_render, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]


def test_service_monitor_is_optional() -> None:
    docs = render({"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}})
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= one(docs, "Service")["metadata"]["labels"].items()
    proc = helm(
        "template", "x", str(CHART), "--kube-version", KUBE_VERSION,
        *set_args({"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}}),
        check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "needs metrics.service.enabled" in proc.stderr


# --- values schema --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"watchNamespace": ["a"]}, "additional properties 'watchNamespace' not allowed"),
        ({"artifactStore": {"endpont": "http://minio:9000"}}, "additional properties 'endpont' not allowed"),
        ({"images": {"operator": {"repository": "x", "tags": "1"}}}, "additional properties 'tags' not allowed"),
        ({"operator": {"logFormat": "yaml"}}, "logFormat"),
        ({"networkPolicy": {"egressCIDRs": ["10.0.0.0"]}}, "egressCIDRs"),
        ({"artifactStore": {"uri": "minio://bucket"}}, "uri"),
        ({"images": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"replicas": 0}, "replicas"),
        ({"leaderElection": {"leaseDuration": 15}}, "additional properties 'leaseDuration' not allowed"),
        ({"leaderElection": {"retryPeriodSeconds": 0}}, "retryPeriodSeconds"),
        ({"rbac": {"secretNamespaces": ["*", "team-a"]}}, "secretNamespaces"),  # "*" only alone
        ({"rbac": {"secretNamespaces": ["Team_A"]}}, "secretNamespaces/0"),
    ],
)
def test_schema_rejects_typos_and_bad_values(values: dict[str, Any], complaint: str) -> None:
    proc = helm("template", "x", str(CHART), "--kube-version", KUBE_VERSION, *set_args(values), check=False)
    assert proc.returncode != 0, f"{values} should have been rejected"
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert complaint in proc.stderr, proc.stderr


def test_every_default_value_is_in_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(value: Any, node: Obj, path: str) -> None:
        if not isinstance(value, dict) or node.get("additionalProperties") is not False:
            return
        for key, child in value.items():
            assert key in node["properties"], f"{path}{key} is in values.yaml but not in values.schema.json"
            walk(child, node["properties"][key], f"{path}{key}.")

    walk(values, schema, "")


# --- the settings the chart renders are the ones the operator reads ----------------------------------------


FULL_VALUES: dict[str, Any] = {
    "watchNamespaces": ["team-a", "team-b"],
    "images": {
        "registry": "registry.corp.example/ml/",
        "pullPolicy": "Always",
        "trainer": {"repository": "lorafleet/trainer", "tag": "0.1.0-cuda12"},
        "vllmCpu": {"repository": "lorafleet/vllm-cpu", "digest": "sha256:" + "a" * 64},
    },
    "artifactStore": {
        "endpoint": "https://minio.storage.svc:9000",
        "uri": "s3://lorafleet/prod",
        "region": "eu-central-1",
        "insecureSkipTLSVerify": True,
        "credentialsSecret": "minio-credentials",
        "caBundleSecret": {"name": "minio-ca", "key": "ca.crt"},
    },
    "networkPolicy": {
        "enabled": False,
        "egressCIDRs": ["10.20.0.0/16", "192.168.1.10/32"],
        "dns": {"namespace": "dns", "podLabels": {"app": "coredns"}},
    },
    "operator": {
        "resyncMinutes": 12.5,
        "logFormat": "text",
        "metricsPort": 9090,
        "healthPort": 9091,
        "pricing": {"currency": "EUR", "gpuHour": {"nvidia-h100": 2.5, "default": 2.0}, "cpuHour": 0.05},
    },
    "replicas": 3,
    "leaderElection": {
        "enabled": True,
        "leaseDurationSeconds": 30,
        "renewDeadlineSeconds": 20,
        "retryPeriodSeconds": 4,
    },
}


def test_rendered_settings_parse_into_the_operators_settings(env: pytest.MonkeyPatch) -> None:
    docs = render(FULL_VALUES)
    for name, value in plain_env(docs).items():
        env.setenv(name, value)
    ops = OperatorSettings()
    assert ops.namespaces == ["team-a", "team-b"]
    assert ops.trainer_image == "registry.corp.example/ml/lorafleet/trainer:0.1.0-cuda12"
    assert ops.trainer_cpu_image == "registry.corp.example/ml/lorafleet/trainer-cpu:0.1.0"
    assert ops.vllm_image == "registry.corp.example/ml/vllm/vllm-openai:v0.32.0"
    assert ops.vllm_cpu_image == "registry.corp.example/ml/lorafleet/vllm-cpu@sha256:" + "a" * 64
    assert ops.sync_image == "registry.corp.example/ml/lorafleet/operator:0.1.0" == container(docs)["image"]
    assert ops.image_pull_policy == "Always"
    assert ops.store_endpoint == "https://minio.storage.svc:9000"
    assert ops.store_uri == "s3://lorafleet/prod"
    assert ops.store_region == "eu-central-1"
    assert ops.store_insecure_skip_tls_verify is True
    assert ops.store_credentials_secret == "minio-credentials"
    assert ops.network_policy is False
    assert ops.egress_cidrs == ["10.20.0.0/16", "192.168.1.10/32"]
    assert (ops.dns_namespace, ops.dns_pod_labels) == ("dns", {"app": "coredns"})
    assert ops.resync_minutes == 12.5
    assert ops.pricing is not None and ops.pricing.currency == "EUR" and ops.pricing.cpu_hour == 0.05
    assert ops.pricing.gpu_hour == {"nvidia-h100": 2.5, "default": 2.0}
    assert ops.log_format == "text"
    assert (ops.metrics_port, ops.health_port) == (9090, 9091)
    assert ops.leader_election is True
    election = (ops.leader_election_lease_duration, ops.leader_election_renew_deadline)
    assert election == (30, 20) and ops.leader_election_retry_period == 4
    c = container(docs)
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 9090, "health": 9091}


def test_defaults_parse_into_the_operators_defaults(env: pytest.MonkeyPatch, default_render: list[Obj]) -> None:
    defaults = OperatorSettings()  # no LORAFLEET_* variables set
    for name, value in plain_env(default_render).items():
        env.setenv(name, value)
    rendered = OperatorSettings()
    differ = {f: (getattr(rendered, f), getattr(defaults, f)) for f in OperatorSettings.model_fields
              if f != "operator_namespace" and getattr(rendered, f) != getattr(defaults, f)}  # fmt: skip
    # Leader election is the one deliberate difference: on in the chart (two replicas), off in a lone process.
    assert differ.pop("leader_election") == (True, False)
    assert not differ, f"the chart's defaults differ from the operator's: {differ}"


def test_every_rendered_lorafleet_variable_is_a_setting() -> None:
    known = {f"LORAFLEET_{name.upper()}" for name in OperatorSettings.model_fields}
    names = {e["name"] for e in container(render(FULL_VALUES))["env"]}
    unknown = {n for n in names if n.startswith("LORAFLEET_")} - known
    assert not unknown, f"the chart sets variables the operator does not read: {unknown}"


def test_store_credentials_come_from_the_secret_never_from_values() -> None:
    docs = render(FULL_VALUES)
    env = {e["name"]: e for e in container(docs)["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"] == {"secretKeyRef": {"name": "minio-credentials", "key": key}}
    assert env["AWS_CA_BUNDLE"]["value"] == "/etc/lorafleet/store-ca/ca.pem"
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    ca = next(v for v in pod["volumes"] if v["name"] == "store-ca")
    assert ca["secret"] == {"secretName": "minio-ca", "items": [{"key": "ca.crt", "path": "ca.pem"}]}
    assert "AWS_ACCESS_KEY_ID" not in plain_env(render())


def test_pod_labels_cannot_break_the_selector() -> None:
    docs = render({"podLabels": {"app.kubernetes.io/name": "other", "team": "ml"}})
    deployment = one(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["team"] == "ml"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


# --- RBAC ------------------------------------------------------------------------------------------------------


def _children_of_every_kind() -> list[Obj]:
    settings = OperatorSettings(store_endpoint="http://minio:9000", store_uri="s3://lorafleet", network_policy=True)
    base = objects.ready(objects.base_model())
    ftj = objects.fine_tune_job(resources={"nodes": 2, "gpusPerNode": 1})  # distributed: the rendezvous Service
    typed_base = objects.as_base_model(base)
    ftj_children, error = ftj_controller.plan(objects.as_fine_tune_job(ftj), typed_base, settings)
    assert error is None
    ad = objects.adapter_deployment_obj(objects.adapter_deployment(replicas=2))
    ad_children, error = ad_controller.plan(ad, typed_base, {}, settings)
    assert error is None
    return ftj_children + ad_children


def operator_rules(docs: list[Obj], namespace: str | None = None) -> list[Obj]:
    if namespace is None:
        return list(one(docs, "ClusterRole", "lorafleet")["rules"])
    roles = [d for d in find(docs, "Role", "lorafleet") if d["metadata"]["namespace"] == namespace]
    assert len(roles) == 1, f"no Role in {namespace}"
    return list(roles[0]["rules"])


@pytest.mark.parametrize("mode", ["cluster", "namespaced"])
def test_rbac_covers_every_child_the_controllers_apply(mode: str) -> None:
    docs = render({"watchNamespaces": ["team-a"]} if mode == "namespaced" else None)
    rules = operator_rules(docs, "team-a" if mode == "namespaced" else None)
    children = _children_of_every_kind()
    assert {c["kind"] for c in children} == set(CHILD_RESOURCES), "a new child kind: add it to the chart's RBAC"
    for kind, (group, resource) in CHILD_RESOURCES.items():
        # server-side apply creates missing objects; each pass lists owned children and prunes unwanted ones
        for verb in ("create", "patch", "list", "delete"):
            assert allows(rules, group, resource, verb), f"{mode}: cannot {verb} {resource} ({kind})"


@pytest.mark.parametrize("mode", ["cluster", "namespaced"])
def test_rbac_covers_reads_watches_status_and_events(mode: str) -> None:
    docs = render({"watchNamespaces": ["team-a"]} if mode == "namespaced" else None)
    rules = operator_rules(docs, "team-a" if mode == "namespaced" else None)
    needed = [
        *[("lorafleet.io", p, v) for p in ("basemodels", "finetunejobs", "adapterdeployments")
          for v in ("get", "list", "watch", "patch")],
        *[("lorafleet.io", f"{p}/status", "patch") for p in ("basemodels", "finetunejobs", "adapterdeployments")],
        ("batch", "jobs", "get"), ("batch", "jobs", "list"), ("batch", "jobs", "watch"),
        ("apps", "deployments", "get"), ("apps", "deployments", "list"), ("apps", "deployments", "watch"),
        ("", "services", "get"), ("", "pods", "list"), ("", "pods", "watch"),
        ("", "events", "create"), ("events.k8s.io", "events", "create"),
    ]  # fmt: skip
    missing = [n for n in needed if not allows(rules, *n)]
    assert not missing, f"{mode}: missing {missing}"


@pytest.mark.parametrize("mode", ["cluster", "namespaced"])
def test_rbac_holds_what_the_trainer_role_grants(mode: str) -> None:
    """RBAC escalation prevention: creating a Role that grants X requires holding X."""
    docs = render({"watchNamespaces": ["team-a"]} if mode == "namespaced" else None)
    rules = operator_rules(docs, "team-a" if mode == "namespaced" else None)
    trainer_roles = [c for c in _children_of_every_kind() if c["kind"] == "Role"]
    assert trainer_roles
    for role in trainer_roles:
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for res in rule["resources"]:
                    for verb in rule["verbs"]:
                        assert allows(rules, group, res, verb), f"trainer Role grants {verb} {res}; operator lacks it"


def test_rbac_is_least_privilege() -> None:
    rules = operator_rules(render())
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"], rule
    assert not allows(rules, "", "secrets", "list"), "the operator reads Secrets by name only"
    assert not allows(rules, "", "secrets", "watch")
    assert not allows(rules, "", "pods", "patch"), "no pod writes: the trainer reports into its own ConfigMap"
    for group, resource in [("lorafleet.io", p) for p in ("basemodels", "finetunejobs", "adapterdeployments")]:
        assert not allows(rules, group, resource, "delete"), f"the operator never deletes a tenant's {resource}"
    for verb in ("escalate", "bind"):
        assert not allows(rules, "rbac.authorization.k8s.io", "roles", verb)


def secret_verbs(docs: list[Obj]) -> dict[str, set[str]]:
    """Namespace ("*": cluster-wide) -> the Secret verbs the operator holds there, from every (Cluster)Role."""
    out: dict[str, set[str]] = {}
    for doc in docs:
        if doc["kind"] in ("Role", "ClusterRole") and not doc["metadata"]["name"].endswith("-discovery"):
            ns = doc["metadata"].get("namespace", "*")
            for rule in doc.get("rules") or []:
                if "" in rule["apiGroups"] and "secrets" in rule["resources"]:
                    out.setdefault(ns, set()).update(rule["verbs"])
    return out


GET, WRITE = {"get"}, {"get", "create", "patch", "delete"}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param({}, {NAMESPACE: GET}, id="default: only its own namespace"),
        pytest.param({"rbac": {"secretNamespaces": ["team-a"]}}, {NAMESPACE: GET, "team-a": GET}, id="listed"),
        pytest.param(
            {"rbac": {"secretNamespaces": ["team-a", "team-b"]}, "artifactStore": {"sts": {"enabled": True}}},
            {NAMESPACE: GET, "team-a": WRITE, "team-b": WRITE},
            id="sts writes where listed, never in its own namespace",
        ),
        pytest.param(
            {"rbac": {"secretNamespaces": ["team-a"], "mintSecrets": True}},
            {NAMESPACE: GET, "team-a": WRITE},
            id="mintSecrets without the default store's sts (a ClusterArtifactStore's spec.sts)",
        ),
        pytest.param(
            {
                "rbac": {"secretNamespaces": ["team-a"], "mintSecrets": False},
                "artifactStore": {"sts": {"enabled": True}},
            },
            {NAMESPACE: GET, "team-a": GET},
            id="mintSecrets false overrides sts",
        ),
        pytest.param(
            {"rbac": {"secretNamespaces": ["*"], "mintSecrets": True}},
            {NAMESPACE: GET, "*": WRITE},
            id="mintSecrets with star: cluster-wide",
        ),
        pytest.param({"rbac": {"secretNamespaces": ["*"]}}, {NAMESPACE: GET, "*": GET}, id="star: cluster-wide"),
        pytest.param(
            {"watchNamespaces": ["team-a", "team-b"], "rbac": {"secretNamespaces": ["team-b"]}},
            {NAMESPACE: GET, "team-b": GET},
            id="namespaced: a watched namespace is not a Secret namespace",
        ),
        pytest.param(
            {"watchNamespaces": ["team-a", "team-b"], "rbac": {"secretNamespaces": ["*"]}},
            {NAMESPACE: GET, "team-a": GET, "team-b": GET},
            id="namespaced star: every watched namespace",
        ),
    ],
)
def test_secrets_only_in_the_operators_namespace_and_those_listed(values: Obj, expected: dict[str, set[str]]) -> None:
    """Least privilege (issue 15): Secret rights follow rbac.secretNamespaces, not the watched scope."""
    docs = render(values)
    assert secret_verbs(docs) == expected
    for doc in find(docs, "RoleBinding", "lorafleet-secrets"):
        assert doc["roleRef"]["name"] == "lorafleet-secrets" and doc["metadata"]["namespace"] in expected
        assert doc["subjects"] == [{"kind": "ServiceAccount", "name": "lorafleet", "namespace": NAMESPACE}]


def test_secret_namespaces_outside_the_watched_ones_are_refused() -> None:
    values = {"watchNamespaces": ["team-a"], "rbac": {"secretNamespaces": ["team-b"]}}
    proc = helm("template", "x", str(CHART), "--kube-version", KUBE_VERSION, *set_args(values), check=False)
    assert proc.returncode != 0 and 'rbac.secretNamespaces lists "team-b", which watchNamespaces does not' in (
        proc.stderr
    )


def test_namespaced_mode_has_a_role_per_namespace_and_no_cluster_wide_grant() -> None:
    docs = render({"watchNamespaces": ["team-a", "team-b"]})
    assert not find(docs, "ClusterRole", "lorafleet") and not find(docs, "ClusterRoleBinding", "lorafleet")
    for ns in ("team-a", "team-b"):
        binding = next(d for d in find(docs, "RoleBinding") if d["metadata"]["namespace"] == ns)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "lorafleet"}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "lorafleet", "namespace": NAMESPACE}]
    assert plain_env(docs)["LORAFLEET_NAMESPACES"] == '["team-a","team-b"]'
    # kopf's runtime observation is cluster-scoped and read-only; it can be turned off.
    discovery = one(docs, "ClusterRole", "lorafleet-discovery")["rules"]
    assert all(set(r["verbs"]) == {"list", "watch"} for r in discovery)
    no_discovery = render({"watchNamespaces": ["team-a"], "rbac": {"clusterDiscovery": False}})
    assert not find(no_discovery, "ClusterRole") and not find(no_discovery, "ClusterRoleBinding")


def test_rbac_and_service_account_can_be_brought_by_the_user() -> None:
    docs = render({"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "platform-sa"}})
    assert sorted(d["kind"] for d in docs) == ["Deployment", "PodDisruptionBudget", "Service"]
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "platform-sa"


def test_every_value_is_documented() -> None:
    """docs/configuration.md names every value: `a.b.c`, or `a.b.c` / `.d` rows for sibling keys."""
    doc = (REPO / "docs" / "configuration.md").read_text()
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing: list[str] = []

    def walk(value: Any, node: Obj, path: str) -> None:
        strict = node.get("additionalProperties") is False and path != "resources"
        if isinstance(value, dict) and strict and value:
            for key, child in value.items():
                walk(child, node["properties"][key], f"{path}.{key}" if path else key)
            return
        parent, _, leaf = path.rpartition(".")
        if f"`{path}`" not in doc and not (f"`{parent}." in doc and f"`.{leaf}`" in doc):
            missing.append(path)

    walk(values, schema, "")
    assert not missing, f"values not documented in docs/configuration.md: {missing}"


# --- leader election ------------------------------------------------------------------------------------------


def test_pod_knows_its_name_and_namespace_for_the_lease(default_render: list[Obj]) -> None:
    fields = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container(default_render)["env"]
              if "fieldRef" in e.get("valueFrom", {})}  # fmt: skip
    assert fields["POD_NAME"] == "metadata.name"  # the holder identity
    assert fields["POD_NAMESPACE"] == fields["LORAFLEET_OPERATOR_NAMESPACE"] == "metadata.namespace"
    assert plain_env(default_render)["LORAFLEET_LEADER_ELECTION"] == "true"


def test_lease_rbac_is_its_own_lease_in_its_own_namespace_only(default_render: list[Obj]) -> None:
    role = one(default_render, "Role", "lorafleet-leader-election")
    assert role["metadata"]["namespace"] == NAMESPACE
    rules = role["rules"]
    assert {r["apiGroups"][0] for r in rules} == {"coordination.k8s.io"} and {r["resources"][0] for r in rules} == {
        "leases"
    }
    named = [r for r in rules if r.get("resourceNames")]
    assert named == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                      "resourceNames": ["lorafleet-operator"], "verbs": ["get", "update"]}]  # fmt: skip
    assert [r["verbs"] for r in rules if not r.get("resourceNames")] == [["create"]]  # a name cannot limit create
    binding = one(default_render, "RoleBinding", "lorafleet-leader-election")
    assert binding["roleRef"]["name"] == "lorafleet-leader-election"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "lorafleet", "namespace": NAMESPACE}]
    # The operator's own rules grant no Lease anywhere else.
    assert not allows(operator_rules(default_render), "coordination.k8s.io", "leases", "update")
    assert not allows(operator_rules(default_render), "coordination.k8s.io", "leases", "create")


def test_pdb_keeps_one_pod_and_selects_the_operator(default_render: list[Obj]) -> None:
    pdb = one(default_render, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    pod_labels = one(default_render, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert not find(render({"replicas": 1}), "PodDisruptionBudget"), "a PDB of one pod blocks every drain"
    assert not find(render({"podDisruptionBudget": {"enabled": False}}), "PodDisruptionBudget")


def test_without_election_one_replica_recreated_and_more_refused() -> None:
    docs = render({"leaderElection": {"enabled": False}, "replicas": 1})
    spec = one(docs, "Deployment")["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}, "never two operators at once"
    assert plain_env(docs)["LORAFLEET_LEADER_ELECTION"] == "false"
    assert not find(docs, "Role", "lorafleet-leader-election") and not find(docs, "PodDisruptionBudget")
    refused = helm("template", "lorafleet", str(CHART), "--kube-version", KUBE_VERSION,
                   *set_args({"leaderElection": {"enabled": False}}), check=False)  # fmt: skip
    assert refused.returncode != 0 and "replicas > 1 needs leaderElection.enabled" in refused.stderr
