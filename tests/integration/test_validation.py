"""The real API server rejects bad input with the field path and what is allowed (docs/bad-inputs.md), accepts
every example, and refuses any change to a FineTuneJob's spec."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.rest import ApiException

from lorafleet_dev.build import Builder
from lorafleet_dev.paths import CRDS
from lorafleet_dev.testing import ClusterHandle, wait_until
from tests.integration.operator_fixtures import Custom
from tests.unit import objects

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def _set(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of obj with the dotted path set (value DELETE removes the key)."""
    out = copy.deepcopy(obj)
    node = out
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    last: Any = int(keys[-1]) if isinstance(node, list) else keys[-1]
    if value == "DELETE":
        del node[last]
    else:
        node[last] = value
    return out


def _clean(obj: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    out["metadata"] = {"name": out["metadata"]["name"]}
    return out


def _canary(*weights: int) -> dict[str, Any]:
    """An adapter entry whose versions v3, v4, ... have these weights."""
    versions = [
        {"name": f"v{3 + i}", "fineTuneJobRef": {"name": f"support-v{3 + i}"}, "weight": w}
        for i, w in enumerate(weights)
    ]
    return {"name": "support-bot", "versions": versions}


BM = _clean(objects.base_model())
FTJ = _clean(objects.fine_tune_job())
AD = _clean(objects.adapter_deployment())

# (id, manifest, substring the error must contain: the field path)
INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("bm-unknown-field", _set(BM, "spec.sourse", {"uri": "s3://a/b"}), "spec.sourse"),
    ("bm-bad-scheme", _set(BM, "spec.source.uri", "http://example.com/model"), "spec.source.uri"),
    ("bm-hf-without-permission", _set(BM, "spec.source.uri", "hf://meta-llama/Llama-3.1-8B"), "spec.source.uri"),
    ("bm-bad-digest", _set(BM, "spec.source.digest", "md5:abc"), "spec.source.digest"),
    ("bm-bad-endpoint", _set(BM, "spec.source.store", {"endpoint": "minio:9000"}), "spec.source.store.endpoint"),
    (
        "bm-store-on-pvc",
        _set(_set(BM, "spec.source.uri", "pvc://models/x"), "spec.source.store", {"endpoint": "http://m:9000"}),
        "spec.source.store",
    ),
    ("bm-unknown-family", _set(BM, "spec.family", "gpt"), "spec.family"),
    ("bm-bad-dtype", _set(BM, "spec.dtype", "int4"), "spec.dtype"),
    ("ftj-no-output", _set(FTJ, "spec.output", "DELETE"), "spec.output"),
    ("ftj-no-base", _set(FTJ, "spec.baseModelRef", "DELETE"), "spec.baseModelRef"),
    ("ftj-dataset-http", _set(FTJ, "spec.dataset.uri", "https://example.com/d.jsonl"), "spec.dataset.uri"),
    ("ftj-dataset-format", _set(FTJ, "spec.dataset.format", "parquet"), "spec.dataset.format"),
    (
        "ftj-eval-both",
        _set(_set(FTJ, "spec.dataset.evalSplit", 0.1), "spec.dataset.evalUri", "s3://data/eval.jsonl"),
        "spec.dataset",
    ),
    ("ftj-eval-split-too-big", _set(FTJ, "spec.dataset.evalSplit", 0.9), "spec.dataset.evalSplit"),
    ("ftj-method", _set(FTJ, "spec.method", "full"), "spec.method"),
    (
        "ftj-qlora-on-cpu",
        _set(_set(FTJ, "spec.method", "qlora"), "spec.resources.gpusPerNode", 0),
        "spec.method",
    ),
    (
        "ftj-fsdp-on-cpu",
        _set(_set(FTJ, "spec.resources.gpusPerNode", 0), "spec.resources.strategy", "fsdp"),
        "spec.resources.strategy",
    ),
    ("ftj-rank-zero", _set(FTJ, "spec.lora.r", 0), "spec.lora.r"),
    ("ftj-dropout-one", _set(FTJ, "spec.lora.dropout", 1.0), "spec.lora.dropout"),
    # lora.targetExperts (issue 16): expert weights take no LoRA dropout, set or defaulted (0.05).
    (
        "ftj-experts-with-dropout",
        _set(_set(FTJ, "spec.lora.targetExperts", True), "spec.lora.dropout", 0.1),
        "spec.lora.dropout",
    ),
    ("ftj-experts-default-dropout", _set(FTJ, "spec.lora.targetExperts", True), "spec.lora.dropout"),
    ("ftj-epochs-and-steps", _set(FTJ, "spec.training.epochs", 2), "spec.training"),
    ("ftj-learning-rate", _set(FTJ, "spec.training.learningRate", 5), "spec.training.learningRate"),
    ("ftj-adapter-name", _set(FTJ, "spec.output.adapterName", "Support Bot!"), "spec.output.adapterName"),
    ("ftj-version-slash", _set(FTJ, "spec.output.version", "v1/../../x"), "spec.output.version"),
    ("ftj-negative-backoff", _set(FTJ, "spec.backoffLimit", -1), "spec.backoffLimit"),
    ("ftj-gpus", _set(FTJ, "spec.resources.gpusPerNode", 64), "spec.resources.gpusPerNode"),
    (
        "ad-both-sources",
        _set(AD, "spec.adapters.0.artifact", {"uri": "s3://lorafleet/adapters/a/v1"}),
        "spec.adapters[0]",
    ),
    ("ad-no-source", _set(AD, "spec.adapters.0.fineTuneJobRef", "DELETE"), "spec.adapters[0]"),
    (
        "ad-duplicate-adapter",
        _set(AD, "spec.adapters.1", {"name": "support-bot", "fineTuneJobRef": {"name": "other"}}),
        "spec.adapters[1]",
    ),
    ("ad-rank", _set(AD, "spec.engine.maxLoraRank", 48), "spec.engine.maxLoraRank"),
    (
        "ad-cpu-loras",
        _set(AD, "spec.engine", {"maxLoras": 8, "maxCpuLoras": 4}),
        "spec.engine.maxCpuLoras",
    ),
    ("ad-replicas", _set(AD, "spec.replicas", -1), "spec.replicas"),
    ("ad-port", _set(AD, "spec.service.port", 70000), "spec.service.port"),
    (
        "ad-artifact-digest",
        _set(AD, "spec.adapters.1.artifact.digest", "sha256:xyz"),
        "spec.adapters[1].artifact.digest",
    ),
    # Paths and quantities (issue 15, point 7): a pvc:// path stays inside its claim; cpu and memory are quantities.
    ("ftj-pvc-dotdot", _set(FTJ, "spec.dataset.uri", "pvc://claim/../x"), "spec.dataset.uri"),
    ("ftj-pvc-absolute", _set(FTJ, "spec.dataset.uri", "pvc://claim//etc/passwd"), "spec.dataset.uri"),
    ("ftj-pvc-encoded", _set(FTJ, "spec.dataset.uri", "pvc://claim/%2e%2e/x"), "spec.dataset.uri"),
    ("ftj-pvc-backslash", _set(FTJ, "spec.dataset.uri", "pvc://claim/..\\x"), "spec.dataset.uri"),
    ("ftj-pvc-eval", _set(FTJ, "spec.dataset.evalUri", "pvc://claim/a/../../x"), "spec.dataset.evalUri"),
    ("bm-pvc-dotdot", _set(BM, "spec.source.uri", "pvc://models/../other"), "spec.source.uri"),
    ("ftj-memory-lots", _set(FTJ, "spec.resources.memory", "lots"), "spec.resources.memory"),
    ("ftj-cpu-negative", _set(FTJ, "spec.resources.cpu", -1), "spec.resources.cpu"),
    ("ftj-memory-object", _set(FTJ, "spec.resources.memory", {"gi": 64}), "spec.resources.memory"),
    ("ad-memory-lots", _set(AD, "spec.resources.memory", "64 gigs"), "spec.resources.memory"),
    # Task evaluation (issue 17): a bar needs a minimum, names a measured metric; bounded example counts.
    ("ftj-eval-bar-without-minimum", _set(FTJ, "spec.evaluation", {"require": [{"metric": "rougeL"}]}), "minScore"),
    (
        "ftj-eval-require-unmeasured",
        _set(FTJ, "spec.evaluation", {"metrics": ["exactMatch"], "require": [{"metric": "rougeL", "minScore": 0.5}]}),
        "evaluation.metrics",
    ),
    ("ftj-eval-no-examples", _set(FTJ, "spec.evaluation", {"maxExamples": 0}), "spec.evaluation.maxExamples"),
    ("ftj-eval-many-examples", _set(FTJ, "spec.evaluation", {"maxExamples": 5001}), "spec.evaluation.maxExamples"),
    ("ftj-eval-unknown-metric", _set(FTJ, "spec.evaluation", {"metrics": ["bleu"]}), "spec.evaluation.metrics[0]"),
    ("ftj-eval-no-metrics", _set(FTJ, "spec.evaluation", {"metrics": []}), "spec.evaluation.metrics"),
    # Canaries and promotion gates (issue 17): weights 0..100 summing to 100, one source per version.
    ("ad-canary-sum", _set(AD, "spec.adapters.0", _canary(90, 20)), "spec.adapters[0].versions"),
    ("ad-canary-weight", _set(AD, "spec.adapters.0", _canary(101, 0)), "spec.adapters[0].versions[0].weight"),
    ("ad-canary-negative", _set(AD, "spec.adapters.0", _canary(110, -10)), "spec.adapters[0].versions[1].weight"),
    (
        "ad-canary-same-version",
        _set(_set(AD, "spec.adapters.0", _canary(50, 50)), "spec.adapters.0.versions.1.name", "v3"),
        "spec.adapters[0].versions[1]",
    ),
    (
        "ad-canary-and-source",
        _set(_set(AD, "spec.adapters.0", _canary(90, 10)), "spec.adapters.0.fineTuneJobRef", {"name": "x"}),
        "spec.adapters[0]",
    ),
    (
        "ad-canary-version-no-source",
        _set(_set(AD, "spec.adapters.0", _canary(90, 10)), "spec.adapters.0.versions.0.fineTuneJobRef", "DELETE"),
        "spec.adapters[0].versions[0]",
    ),
    (
        "ad-canary-version-name",
        _set(_set(AD, "spec.adapters.0", _canary(90, 10)), "spec.adapters.0.versions.0.name", "v:3"),
        "spec.adapters[0].versions[0].name",
    ),
    (
        "ad-bar-without-threshold",
        _set(AD, "spec.adapters.0.requireEvaluation", [{"metric": "rougeL"}]),
        "spec.adapters[0].requireEvaluation[0]",
    ),
    (
        "ad-bar-unknown-metric",
        _set(AD, "spec.adapters.0.requireEvaluation", [{"metric": "bleu", "minScore": 0.1}]),
        "spec.adapters[0].requireEvaluation[0].metric",
    ),
]


@pytest.mark.parametrize(("case", "manifest", "field"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_manifest_is_rejected_with_its_field(
    cluster: ClusterHandle, crds: None, namespace: str, case: str, manifest: dict[str, Any], field: str
) -> None:
    with pytest.raises(ApiException) as raised:
        Custom(cluster, namespace).create(manifest)
    assert raised.value.status in (400, 422), raised.value.body
    assert field in raised.value.body, f"{case}: {field!r} not in {raised.value.body}"


def test_there_are_at_least_twenty_cases() -> None:
    assert len(INVALID) >= 20


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_server_side_dry_run(cluster: ClusterHandle, crds: None, namespace: str, path: Path) -> None:
    custom = Custom(cluster, namespace)
    # Cluster-scoped kinds (ClusterArtifactStore) are created at the cluster's endpoint, as kubectl would.
    scopes = {
        crd["spec"]["names"]["kind"]: crd["spec"]["scope"]
        for crd in (yaml.safe_load(f.read_text()) for f in sorted(CRDS.glob("*.yaml")))
    }
    for doc in yaml.safe_load_all(path.read_text()):
        plural = custom.plural(doc["kind"])
        if scopes[doc["kind"]] == "Cluster":
            custom.api.create_cluster_custom_object(
                "lorafleet.io", "v1alpha1", plural, doc, dry_run="All", field_validation="Strict"
            )
            continue
        doc["metadata"].pop("namespace", None)  # an example may name its team's namespace: this test's is used
        custom.api.create_namespaced_custom_object(
            "lorafleet.io", "v1alpha1", namespace, plural, doc, dry_run="All", field_validation="Strict"
        )


def test_valid_objects_are_accepted(cluster: ClusterHandle, crds: None, namespace: str) -> None:
    custom = Custom(cluster, namespace)
    for obj in (BM, FTJ, AD):
        created = custom.create(obj)
        assert created["metadata"]["generation"] == 1


def test_target_experts_with_dropout_zero_is_accepted(cluster: ClusterHandle, crds: None, namespace: str) -> None:
    custom = Custom(cluster, namespace)
    for name, dropout in (("experts-int", 0), ("experts-float", 0.0)):  # JSON 0 is an int: CEL compares it too
        ftj = _set(_set(FTJ, "metadata.name", name), "spec.lora", {"targetExperts": True, "dropout": dropout})
        assert custom.create(ftj)["spec"]["lora"] == {"targetExperts": True, "dropout": dropout, "r": 16, "alpha": 32}


def test_pvc_paths_inside_the_claim_and_quantities_are_accepted(
    cluster: ClusterHandle, crds: None, namespace: str
) -> None:
    custom = Custom(cluster, namespace)
    ftj = _set(FTJ, "spec.dataset.uri", "pvc://claim/data/.hidden/a..b.jsonl")
    ftj = _set(_set(ftj, "spec.resources.cpu", "500m"), "spec.resources.memory", "1.5Gi")
    assert custom.create(ftj)["spec"]["resources"]["memory"] == "1.5Gi"
    bm = _set(_set(BM, "metadata.name", "on-a-claim"), "spec.source.uri", "pvc://models/llama/")
    custom.create(bm)


def test_quality_bar_on_a_default_metric_is_accepted(cluster: ClusterHandle, crds: None, namespace: str) -> None:
    """evaluation.metrics left out defaults to [exactMatch, rougeL] on the server, so a bar on rougeL is valid."""
    ftj = _set(FTJ, "spec.evaluation", {"require": [{"metric": "rougeL", "minImprovement": 0}]})
    created = Custom(cluster, namespace).create(ftj)
    assert created["spec"]["evaluation"]["metrics"] == ["exactMatch", "rougeL"]


def test_finetunejob_spec_is_immutable(cluster: ClusterHandle, crds: None, namespace: str) -> None:
    custom = Custom(cluster, namespace)
    custom.create(FTJ)
    with pytest.raises(ApiException) as raised:
        custom.patch("FineTuneJob", FTJ["metadata"]["name"], {"spec": {"training": {"maxSteps": 5}}})
    assert raised.value.status == 422
    assert "spec is immutable" in raised.value.body
    # Metadata stays editable (labels, annotations).
    custom.patch("FineTuneJob", FTJ["metadata"]["name"], {"metadata": {"labels": {"team": "support"}}})


def test_kubectl_explain_documents_the_fields(cluster: ClusterHandle, crds: None) -> None:
    kubectl = [str(Builder().path("kubectl")), "--kubeconfig", str(cluster.kubeconfig)]

    def explain() -> str | None:
        # Discovery lags CRD installation by a moment; kubectl then answers "doesn't have a resource type".
        done = subprocess.run([*kubectl, "explain", "ftj.spec.training"], capture_output=True, text=True)
        return done.stdout if done.returncode == 0 else None

    out = wait_until(explain, timeout=30, interval=1, what="kubectl explain ftj.spec.training")
    assert "Optimisation settings." in out
    assert "checkpointInterval" in out and "Optimizer steps between checkpoints" in out
    # The category resolves to the three kinds.
    subprocess.run([*kubectl, "get", "lorafleet", "-A"], capture_output=True, text=True, check=True)


CAS = {
    "apiVersion": "lorafleet.io/v1alpha1",
    "kind": "ClusterArtifactStore",
    "metadata": {"name": "sts-validation"},
    "spec": {"endpoint": "http://minio.storage:9000", "bucket": "lorafleet", "sts": {"enabled": True}},
}


@pytest.mark.parametrize("duration", [0, 899, 43201], ids=["zero", "below-900", "above-43200"])
def test_cluster_store_sts_duration_out_of_range_is_rejected(
    cluster: ClusterHandle, crds: None, namespace: str, duration: int
) -> None:
    """STS refuses lifetimes outside 900..43200 s: the API server says so before the operator mints anything."""
    custom = Custom(cluster, namespace)
    manifest = _set(CAS, "spec.sts.durationSeconds", duration)
    with pytest.raises(ApiException) as raised:
        custom.api.create_cluster_custom_object(
            "lorafleet.io", "v1alpha1", "clusterartifactstores", manifest, dry_run="All", field_validation="Strict"
        )
    assert raised.value.status in (400, 422), raised.value.body
    assert "spec.sts.durationSeconds" in raised.value.body, raised.value.body


def test_cluster_store_sts_defaults(cluster: ClusterHandle, crds: None, namespace: str) -> None:
    """sts.enabled alone is valid; the server fills in the one-hour lifetime."""
    created = Custom(cluster, namespace).api.create_cluster_custom_object(
        "lorafleet.io", "v1alpha1", "clusterartifactstores", CAS, dry_run="All", field_validation="Strict"
    )
    assert created["spec"]["sts"] == {"enabled": True, "durationSeconds": 3600}
