"""`lorafleet demo`: the three kinds reconciled end to end on a local cluster.

Starts the local control plane (built from upstream sources, kwok GPU and CPU nodes) unless
LORAFLEET_CLUSTER=external points at another cluster, starts MinIO on loopback with a stand-in base model
version (the operator verifies its manifest), installs the CRDs, runs the operator, applies a
BaseModel, a FineTuneJob and an AdapterDeployment, and shows their status live until they settle.

On kwok nodes pods do not execute: the training Job "completes" on a fake GPU node, so no adapter is written
and the AdapterDeployment honestly reports it Pending (ArtifactNotRecorded). Real training and serving on a
real node is the e2e path (docs/e2e.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from kubernetes import client, config

from lorafleet import GROUP, VERSION
from lorafleet.dev.operator import OperatorProcess, install_crds
from lorafleet.dev.s3server import S3Server, build
from lorafleet.dev.testing import ClusterHandle
from lorafleet.storage import ArtifactStore, VersionFolder

NAMESPACE = "lorafleet-demo"
ADAPTER_ROOT = "s3://lorafleet"
MODEL_URI = "s3://models/tiny-llama/r1"

BASE_MODEL: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "BaseModel",
    "metadata": {"name": "tiny-llama"},
    "spec": {"family": "llama", "source": {"uri": MODEL_URI}, "maxContextLength": 512},
}
FINE_TUNE_JOB: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "FineTuneJob",
    "metadata": {"name": "support-bot-v1"},
    "spec": {
        "baseModelRef": {"name": "tiny-llama"},
        "dataset": {"uri": "s3://datasets/support-chat.jsonl", "format": "chat"},
        "training": {"maxSteps": 60, "checkpointInterval": 20},
        "resources": {"gpusPerNode": 1, "podAnnotations": {"lorafleet.io/kwok-duration": "8s"}},
        "output": {"adapterName": "support-bot", "version": "v1"},
    },
}
ADAPTER_DEPLOYMENT: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "AdapterDeployment",
    "metadata": {"name": "assistants"},
    "spec": {
        "baseModelRef": {"name": "tiny-llama"},
        "replicas": 2,
        "adapters": [{"name": "support-bot", "fineTuneJobRef": {"name": "support-bot-v1"}}],
    },
}


def _start_store(workdir: Path) -> S3Server:
    """MinIO on loopback (built from source on first use) holding a stand-in base model version."""
    server = S3Server(data_dir=workdir / "minio", binary=build())
    server.start()
    for bucket in ("models", "lorafleet"):
        server.create_bucket(bucket)
    model = workdir / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"\0" * 4096)
    pushed = ArtifactStore(server.store_settings()).push(
        model, VersionFolder.parse(MODEL_URI), kind="model", name="tiny-llama", version="r1"
    )
    print(f"pushed the base model to {MODEL_URI} ({pushed.digest})", flush=True)
    return server


def _api_client(kubeconfig: str | None) -> client.ApiClient:
    loader: Any = config.new_client_from_config  # untyped in the client library
    api: client.ApiClient = loader(config_file=kubeconfig)
    return api


def _cluster() -> tuple[ClusterHandle, bool]:
    if os.environ.get("LORAFLEET_CLUSTER") == "external":
        kubeconfig = Path(os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)[0]).expanduser()
        return ClusterHandle(kubeconfig, _api_client(None), local=False), False
    from lorafleet.dev.cluster import LocalCluster

    local = LocalCluster()
    started = local.up()
    return ClusterHandle(local.kubeconfig, _api_client(str(local.kubeconfig)), local=True), started


def _read(custom: client.CustomObjectsApi, obj: dict[str, Any]) -> dict[str, Any]:
    plural = obj["kind"].lower() + "s"
    found = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, plural, obj["metadata"]["name"])
    return cast(dict[str, Any], found)


def _row(obj: dict[str, Any]) -> str:
    status = obj.get("status") or {}
    ready: dict[str, Any] = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
    extra = ""
    if obj["kind"] == "AdapterDeployment":
        extra = f" replicas {status.get('readyReplicas', 0)}/{obj['spec']['replicas']}"
        extra += "".join(f" | {a['name']}: {a['state']} ({a.get('reason', '')})" for a in status.get("adapters") or [])
    if obj["kind"] == "FineTuneJob" and status.get("jobName"):
        extra = f" job {status['jobName']}"
    return (
        f"{obj['kind']:<18} {obj['metadata']['name']:<16} {status.get('phase', '-'):<12} "
        f"{ready.get('reason', '-'):<24}{extra}"
    )


def run(keep: bool) -> int:
    t0 = time.monotonic()
    timings: list[tuple[str, float]] = []
    print("lorafleet demo: starting the cluster (the first run builds Kubernetes from source)...", flush=True)
    cluster, started = _cluster()
    timings.append(("cluster up", time.monotonic() - t0))
    install_crds(cluster)
    store = _start_store(Path(tempfile.mkdtemp(prefix="lorafleet-demo-")))
    timings.append(("object store up, model pushed", time.monotonic() - t0))
    core = client.CoreV1Api(cluster.api_client)
    custom = client.CustomObjectsApi(cluster.api_client)
    if not any(ns.metadata and ns.metadata.name == NAMESPACE for ns in core.list_namespace().items):
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
    log = Path(tempfile.gettempdir()) / "lorafleet-demo-operator.log"
    env = {**store.env(), "LORAFLEET_STORE_URI": ADAPTER_ROOT, "LORAFLEET_RESYNC_SECONDS": "5"}
    operator = OperatorProcess(cluster.kubeconfig, log, env)
    operator.start()
    t_apply = time.monotonic()
    try:
        for obj in (ADAPTER_DEPLOYMENT, FINE_TUNE_JOB, BASE_MODEL):  # dependents first: they wait, then move
            plural = obj["kind"].lower() + "s"
            try:
                custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, plural, obj["metadata"]["name"])
                time.sleep(1)
            except client.ApiException as e:
                if e.status != 404:
                    raise
            custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, plural, obj)
            print(f"applied {obj['kind']}/{obj['metadata']['name']}", flush=True)
        seen: dict[str, float] = {}
        last = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            objs = [_read(custom, o) for o in (BASE_MODEL, FINE_TUNE_JOB, ADAPTER_DEPLOYMENT)]
            table = "\n".join(_row(o) for o in objs)
            if table != last:
                print(f"--- t+{time.monotonic() - t_apply:5.1f}s\n{table}", flush=True)
                last = table
            for o in objs:
                phase = (o.get("status") or {}).get("phase")
                if phase:
                    seen.setdefault(f"{o['kind']} {phase}", time.monotonic() - t_apply)
            ad_status = objs[2].get("status") or {}
            waiting_on_job = any(
                a.get("reason") in ("FineTuneJobNotFound", "FineTuneJobNotSucceeded")
                for a in ad_status.get("adapters") or []
            )
            if (
                (objs[1].get("status") or {}).get("phase") in ("Succeeded", "Failed")
                and ad_status.get("readyReplicas") == ADAPTER_DEPLOYMENT["spec"]["replicas"]
                and not waiting_on_job
            ):
                break
            if not operator.alive():
                print(f"the operator exited:\n{operator.log_tail()}", file=sys.stderr)
                return 1
            time.sleep(1)
        else:
            print(f"timed out; operator log:\n{operator.log_tail()}", file=sys.stderr)
            return 1
        timings += sorted(seen.items(), key=lambda kv: kv[1])
    finally:
        operator.stop()
        store.remove()
        if started and not keep:
            from lorafleet.dev.cluster import LocalCluster

            LocalCluster().down()
    print("\ntimings in seconds (the first two since launch, the others since the objects were applied):")
    for what, seconds in timings:
        print(f"  {what:<32} {seconds:6.1f}")
    print(
        "\nThe training Job ran on a fake (kwok) GPU node, so no adapter was produced: the AdapterDeployment "
        "reports it Pending instead of pretending to serve it."
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorafleet demo", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the local cluster running")
    args = parser.parse_args(argv)
    return run(args.keep)
