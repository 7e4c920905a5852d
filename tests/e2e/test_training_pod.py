"""A FineTuneJob really trains in a pod on the real node (docs/dev/node.md, "A FineTuneJob trains on the node").

MinIO listens on the node's bridge address (10.85.0.1), which both the operator (a subprocess on this machine)
and the pods reach. It holds the tiny Llama of ``lorafleet_dev.tiny_model`` as a model version and a small chat
dataset. The operator renders the training Job; its init container (the operator image) fetches the model, the
trainer (the CPU trainer image) trains a LoRA for a few steps, checkpoints and publishes the adapter version.
The test checks the FineTuneJob's status, the live progress the trainer posted into its progress ConfigMap (its
Role's only right), and the adapter's manifest in the store.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from lorafleet.contracts.trainer import PROGRESS_KEY, parse_progress
from lorafleet.resources import finetunejob as ftj_res
from lorafleet.storage import ArtifactStore, VersionFolder
from lorafleet.storage.client import make_client
from lorafleet_dev.operator import OperatorProcess, install_crds
from lorafleet_dev.s3server import S3Server
from tests.e2e.conftest import NodeHandle
from tests.integration.operator_fixtures import Custom, condition
from tests.trainer_fixtures import MEMORIZE_CHAT

pytestmark = pytest.mark.e2e

MODEL_URI = "s3://models/tiny-llama/r1"
DATASET_URI = "s3://datasets/chat/train.jsonl"
ADAPTER_ROOT = "s3://lorafleet"
STORE_SECRET = "lorafleet-store"


@pytest.fixture
def store_on_node(node: NodeHandle, tmp_path: Path) -> Iterator[S3Server]:
    """MinIO bound to the node's bridge address, with the tiny model and a chat dataset."""
    from lorafleet_dev.tiny_model import build

    server = S3Server(tmp_path / "minio" / "data", host=node.ip)
    server.start()
    try:
        for bucket in ("models", "datasets", "lorafleet"):
            server.create_bucket(bucket)
        model_dir = build(tmp_path / "tiny-model")
        ArtifactStore(server.store_settings()).push(
            model_dir, VersionFolder.parse(MODEL_URI), kind="model", name="tiny-llama", version="r1"
        )
        body = "".join(json.dumps(line) + "\n" for line in MEMORIZE_CHAT).encode()
        make_client(server.store_settings()).put_object(Bucket="datasets", Key="chat/train.jsonl", Body=body)
        yield server
    finally:
        server.remove()


@pytest.fixture
def operator_for_node(
    node: NodeHandle, store_on_node: S3Server, namespace: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    install_crds(node.cluster)
    node.cluster.core.create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name=STORE_SECRET),
            string_data={
                "AWS_ACCESS_KEY_ID": store_on_node.access_key,
                "AWS_SECRET_ACCESS_KEY": store_on_node.secret_key,
            },
        ),
    )
    env = {
        **store_on_node.env(),  # LORAFLEET_STORE_ENDPOINT=http://10.85.0.1:<port>, the AWS credentials
        "LORAFLEET_STORE_URI": ADAPTER_ROOT,
        "LORAFLEET_STORE_CREDENTIALS_SECRET": STORE_SECRET,
        "LORAFLEET_NETWORK_POLICY": "false",
        "LORAFLEET_RESYNC_SECONDS": "3",
        # Only this test's namespace: the local cluster may be shared with other test sessions, each with its
        # own operator and store. (An operator of theirs that watches the whole cluster can still render this
        # FineTuneJob's Job with its own store endpoint; the fast failure below then shows its logs.)
        "LORAFLEET_NAMESPACES": json.dumps([namespace]),
    }
    op = OperatorProcess(node.cluster.kubeconfig, tmp_path / "operator.log", env)
    op.start()
    time.sleep(1)
    assert op.alive(), f"the operator exited at start:\n{op.log_tail()}"
    yield op
    op.stop()


def _phase(*expected: str) -> Any:
    return lambda status, obj: (
        status.get("phase") in expected and status.get("observedGeneration") == obj["metadata"]["generation"]
    )


def _debug(node: NodeHandle, namespace: str, op: OperatorProcess) -> str:
    """What to look at when the training pod does not succeed: pods, their description and every log."""
    out = []
    for args in (("get", "pods,jobs", "-n", namespace, "-o", "wide"), ("describe", "pods", "-n", namespace)):
        try:
            proc = node.kubectl_run(*args)
            out.append(f"$ kubectl {' '.join(args)}\n{proc.stdout}{proc.stderr}")
        except subprocess.TimeoutExpired:
            out.append(f"$ kubectl {' '.join(args)}: timed out")
    for pod in node.cluster.core.list_namespaced_pod(namespace).items:
        spec = pod.spec
        for c in [*(spec.init_containers or []), *spec.containers]:
            try:
                log = node.cluster.core.read_namespaced_pod_log(pod.metadata.name, namespace, container=c.name)
            except client.ApiException as e:
                log = f"(no log: {e.reason})"
            out.append(f"--- log of {pod.metadata.name}/{c.name}:\n{log[-4000:]}")
    out.append(f"operator log:\n{op.log_tail()}")
    return "\n".join(out)


def _finished(node: NodeHandle, namespace: str) -> Any:
    """Done when the FineTuneJob is Succeeded or Failed; fails at once when a container of the training pod
    exits with an error (the Job would retry it for minutes)."""

    def predicate(status: dict[str, Any], obj: dict[str, Any]) -> bool:
        if _phase("Succeeded", "Failed")(status, obj):
            return True
        for pod in node.cluster.core.list_namespaced_pod(namespace, label_selector="job-name=tiny-train").items:
            for cs in [*(pod.status.init_container_statuses or []), *(pod.status.container_statuses or [])]:
                term = cs.state.terminated if cs.state else None
                if term is not None and term.exit_code != 0:
                    raise AssertionError(f"{pod.metadata.name}/{cs.name} exited {term.exit_code} ({term.reason})")
        return False

    return predicate


def test_finetunejob_trains_in_a_pod_on_the_real_node(
    node: NodeHandle, store_on_node: S3Server, operator_for_node: OperatorProcess, namespace: str
) -> None:
    custom = Custom(node.cluster, namespace)
    custom.create(
        {
            "apiVersion": "lorafleet.io/v1alpha1",
            "kind": "BaseModel",
            "metadata": {"name": "tiny-llama", "namespace": namespace},
            "spec": {"source": {"uri": MODEL_URI}, "family": "llama"},
        }
    )
    custom.wait_status("BaseModel", "tiny-llama", _phase("Ready"), timeout=60)

    started = time.monotonic()
    custom.create(
        {
            "apiVersion": "lorafleet.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "tiny", "namespace": namespace},
            "spec": {
                "baseModelRef": {"name": "tiny-llama"},
                "dataset": {"uri": DATASET_URI, "format": "chat"},
                "lora": {"r": 8, "alpha": 16},
                "training": {
                    "maxSteps": 10,
                    "checkpointInterval": 5,
                    "maxSequenceLength": 64,
                    "batchSize": 2,
                    "learningRate": 0.01,
                },
                "resources": {
                    "gpusPerNode": 0,
                    "cpu": 1,
                    "memory": "3Gi",
                    "nodeSelector": {"lorafleet.io/node-pool": "real"},
                    "tolerations": [{"key": "lorafleet.io/real-node", "operator": "Exists", "effect": "NoSchedule"}],
                },
                "output": {"adapterName": "tiny-chat", "version": "v1"},
            },
        }
    )
    try:
        done = custom.wait_status(
            "FineTuneJob", "tiny", _finished(node, namespace), timeout=480, what="FineTuneJob Succeeded or Failed"
        )
    except Exception as e:
        raise AssertionError(f"{e}\n{_debug(node, namespace, operator_for_node)}") from None
    seconds = time.monotonic() - started
    status = done["status"]
    assert status["phase"] == "Succeeded", f"{status}\n{_debug(node, namespace, operator_for_node)}"
    print(f"FineTuneJob Succeeded {seconds:.1f} s after creation")

    # The pod ran on the real node, not on a kwok node.
    pods = node.cluster.core.list_namespaced_pod(namespace, label_selector="job-name=tiny-train").items
    assert pods and all(p.spec.node_name == node.name for p in pods), [p.spec.node_name for p in pods]
    assert condition(status, "Ready")["status"] == "True"  # type: ignore[index]

    # The trainer posted its live progress into its own ConfigMap, with a token whose Role allows nothing else.
    progress = node.cluster.core.read_namespaced_config_map(ftj_res.names("tiny").progress, namespace)
    posted = parse_progress((progress.data or {}).get(PROGRESS_KEY))
    assert posted is not None and posted.step and posted.total_steps == 10, progress.data
    assert "lorafleet-trainer" in {m.manager for m in progress.metadata.managed_fields or []}

    artifact = status["artifact"]
    assert artifact["uri"] == f"{ADAPTER_ROOT}/{namespace}/adapters/tiny-chat/v1", artifact  # its namespace root
    assert artifact["digest"].startswith("sha256:") and artifact["sizeBytes"] > 0, artifact

    manifest, digest, _ = ArtifactStore(store_on_node.store_settings()).read_manifest(
        VersionFolder.parse(artifact["uri"])
    )
    assert digest == artifact["digest"]
    assert manifest.kind == "adapter" and manifest.name == "tiny-chat" and manifest.version == "v1"
    assert manifest.total_size == artifact["sizeBytes"]
    assert manifest.base_model is not None and manifest.base_model.name == "tiny-llama", manifest.base_model
    assert manifest.base_model.uri == MODEL_URI
    assert {f.path for f in manifest.files} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert manifest.metrics.get("steps") == 10, manifest.metrics
    print(
        "trained in the pod: "
        + json.dumps({k: manifest.metrics.get(k) for k in ("steps", "trainLoss", "trainSeconds", "wallSeconds")})
    )
