"""`lorafleet-dev demo`: fine-tune and serve a tiny model end to end, on a local cluster.

As root (the default where containers can run): the local control plane and a real node (containerd, kubelet,
kube-proxy, CoreDNS, kube-router, all built from upstream sources), lorafleet's images built from their Dockerfiles with
buildah and imported, MinIO as the on-prem store, the operator installed with the Helm chart as a pod; then a
BaseModel, a FineTuneJob and an AdapterDeployment: the Job trains a LoRA in a pod, the adapter lands in the store
with its manifest, vLLM (CPU) serves the base model and the adapter in another pod. The FineTuneJob evaluates the
adapter against its base on held-out support tickets (spec.evaluation, with a quality bar) and the operator prices
its CPU time (the chart's operator.pricing): the demo prints the base vs adapter scores, the bar's verdict, sample
predictions, the cost line and `kubectl get ftj`; then it asks both models the same questions through the Service
and prints the answers and the timings (lorafleet_dev.loop; the e2e tests in tests/e2e/test_loop.py assert the same
steps).

Without root, or with LORAFLEET_DEMO_NODE=kwok, or against another cluster (LORAFLEET_CLUSTER=external): the kwok
variant: the operator reconciles the three kinds, but pods do not execute on kwok nodes, so the training Job
"completes" on a fake GPU node, no adapter is written, and the AdapterDeployment honestly reports it Pending.

Either way the demo's scratch folder (``lorafleet-demo-*`` in the temporary directory: MinIO's data, the tiny model)
is removed when it ends, success or failure (``LORAFLEET_KEEP_WORKDIR=1`` keeps it); the logs worth reading (MinIO's,
the operator's) are kept in ``${LORAFLEET_CACHE}/demo-logs`` (the last run's), and the last lines say where.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

from kubernetes import client, config

from lorafleet import GROUP, VERSION
from lorafleet.storage import ArtifactStore, VersionFolder
from lorafleet_dev.build import cache_dir
from lorafleet_dev.operator import OperatorProcess, install_crds
from lorafleet_dev.s3server import S3Server, build
from lorafleet_dev.testing import ClusterHandle

NAMESPACE = "lorafleet-demo"
ADAPTER_ROOT = "s3://lorafleet"
MODEL_URI = "s3://models/tiny-llama/r1"
KEEP_WORKDIR_ENV = "LORAFLEET_KEEP_WORKDIR"  # =1: keep the scratch folder (MinIO's data) after the demo

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


def logs_dir() -> Path:
    """Where the demo keeps the last run's logs (small); the scratch folder itself is removed."""
    return cache_dir() / "demo-logs"


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    """The demo's scratch folder (MinIO's data dir and log, the tiny model), removed at the end, success or failure,
    unless LORAFLEET_KEEP_WORKDIR=1: a folder per run left in /tmp had filled the disk (1.8 GB each). Its logs are
    copied to logs_dir() first (the previous run's logs there are replaced), so no report points into a removed
    folder. Whatever uses the folder (MinIO) must be stopped when the block ends. The last lines say where the logs
    are."""
    logs = logs_dir()
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="lorafleet-demo-"))
    try:
        yield path
    finally:
        for log in path.glob("*.log"):
            with contextlib.suppress(OSError):
                shutil.copy2(log, logs / log.name)
        if os.environ.get(KEEP_WORKDIR_ENV) == "1":
            print(f"\nscratch folder kept ({KEEP_WORKDIR_ENV}=1): {path} (MinIO's data and log); remove it when done")
        else:
            shutil.rmtree(path, ignore_errors=True)
        kept = sorted(p.name for p in logs.iterdir())
        print(f"logs: {logs}{' (' + ', '.join(kept) + ')' if kept else ' (none written)'}", flush=True)


def _start_store(workdir: Path) -> S3Server:
    """MinIO on loopback (built from source on first use) holding a stand-in base model version."""
    server = S3Server(data_dir=workdir / "minio", binary=build())
    server.start()
    try:
        for bucket in ("models", "lorafleet"):
            server.create_bucket(bucket)
        model = workdir / "model"
        model.mkdir()
        (model / "config.json").write_text('{"model_type": "llama"}')
        (model / "model.safetensors").write_bytes(b"\0" * 4096)
        pushed = ArtifactStore(server.store_settings()).push(
            model, VersionFolder.parse(MODEL_URI), kind="model", name="tiny-llama", version="r1"
        )
    except BaseException:
        server.stop()
        raise
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
    from lorafleet_dev.cluster import LocalCluster

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
    with workdir() as work:
        return _run_kwok(keep, work)


def _run_kwok(keep: bool, work: Path) -> int:
    t0 = time.monotonic()
    timings: list[tuple[str, float]] = []
    print("lorafleet-dev demo: starting the cluster (the first run builds Kubernetes from source)...", flush=True)
    cluster, started = _cluster()
    timings.append(("cluster up", time.monotonic() - t0))
    install_crds(cluster)
    store = _start_store(work)
    timings.append(("object store up, model pushed", time.monotonic() - t0))
    core = client.CoreV1Api(cluster.api_client)
    custom = client.CustomObjectsApi(cluster.api_client)
    env = {**store.env(), "LORAFLEET_STORE_URI": ADAPTER_ROOT, "LORAFLEET_RESYNC_SECONDS": "5"}
    operator = OperatorProcess(cluster.kubeconfig, logs_dir() / "operator.log", env)
    try:
        if not any(ns.metadata and ns.metadata.name == NAMESPACE for ns in core.list_namespace().items):
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
        operator.start()
        t_apply = time.monotonic()
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
        try:
            operator.stop()
            if started and not keep:
                from lorafleet_dev.cluster import LocalCluster

                LocalCluster().down()
        finally:
            store.stop()  # its data and log: workdir()
    print("\ntimings in seconds (the first two since launch, the others since the objects were applied):")
    for what, seconds in timings:
        print(f"  {what:<32} {seconds:6.1f}")
    print(
        "\nThe training Job ran on a fake (kwok) GPU node, so no adapter was produced: the AdapterDeployment "
        "reports it Pending instead of pretending to serve it."
    )
    return 0


def real_node_possible() -> bool:
    if os.environ.get("LORAFLEET_CLUSTER") == "external" or os.environ.get("LORAFLEET_DEMO_NODE") == "kwok":
        return False
    return os.geteuid() == 0


def run_real(keep: bool) -> int:
    """The whole loop on the real node (see the module docstring)."""
    with workdir() as work:
        return _run_real(keep, work)


def _run_real(keep: bool, work: Path) -> int:
    from lorafleet_dev import images, loop
    from lorafleet_dev.cluster import LocalCluster
    from lorafleet_dev.node import NODE_IP, LocalNode

    t0 = time.monotonic()
    timings: list[tuple[str, float]] = []

    def mark(what: str) -> None:
        timings.append((what, time.monotonic() - t0))
        print(f"[{time.monotonic() - t0:6.1f}s] {what}", flush=True)

    print(
        "lorafleet-dev demo: a real node on this machine (the first run builds Kubernetes, CoreDNS, kube-router, "
        "MinIO and three images from source: expect 20 to 40 minutes; later runs take a few)",
        flush=True,
    )
    node = LocalNode()
    node.preflight()  # root, the node's Debian packages (installed when missing), cgroups: one line if not
    images.require()  # buildah, mmdebstrap, containerd, runc
    local = LocalCluster()
    cluster_started = local.up()
    node_started = node.up()
    cluster = ClusterHandle(local.kubeconfig, _api_client(str(local.kubeconfig)), local=True)
    mark("cluster and real node up")
    loop.ensure_images()
    mark("images built and imported")
    store = S3Server(work / "minio", host=NODE_IP, binary=build())
    store.start()
    core = client.CoreV1Api(cluster.api_client)
    operator: loop.ChartOperator | None = None
    try:
        digest = loop.seed_store(store, work)
        print(
            f"pushed the tiny base model to {loop.MODEL_URI} ({digest}), the dataset to {loop.DATASET_URI} and the "
            f"held-out tickets to {loop.EVAL_URI}"
        )
        mark("object store up, model and dataset uploaded")
        _fresh_namespace(core)
        install_crds(cluster)
        loop.store_secret(core, NAMESPACE, store)
        operator = loop.ChartOperator(cluster.kubeconfig, cluster.api_client, NAMESPACE, store)
        operator.install()
        mark("operator installed with Helm (a pod on the node)")
        res = loop.Resources(cluster.api_client, NAMESPACE)
        res.create(loop.base_model(NAMESPACE))
        res.create(loop.fine_tune_job(NAMESPACE))
        t_apply = time.monotonic()
        mark("BaseModel and FineTuneJob applied")

        def operator_alive() -> None:
            if not operator or not operator.alive():
                raise RuntimeError(f"the operator pod is not running:\n{operator.log_tail() if operator else ''}")

        def training(objs: list[dict[str, Any]]) -> bool:
            status = objs[1].get("status") or {}
            return (
                status.get("phase") in ("Succeeded", "Failed")
                or int((status.get("progress") or {}).get("step") or 0) > 0
            )

        # The AdapterDeployment is applied once the adapter is training (about 20 s before it is stored), so that
        # vLLM's start (about 45 s) ends after the FineTuneJob: the replica turns ready with the adapter in its set.
        # A set that changes after a replica is ready reaches it with the kubelet's periodic sync, up to about 90 s
        # later (docs/serving.md, "Known limits"): applied together, the demo took 60 s or 110 s by that race.
        _, seen_training = loop.watch(
            res,
            [("BaseModel", loop.BASE_MODEL_NAME), ("FineTuneJob", "support-bot-v1")],
            training,
            timeout=600,
            show=lambda table: print(table, flush=True),
            check=operator_alive,
            started=t_apply,
        )
        res.create(
            loop.adapter_deployment(NAMESPACE, [{"name": "support-bot", "fineTuneJobRef": {"name": "support-bot-v1"}}])
        )
        mark("AdapterDeployment applied (the adapter is training)")

        def served(objs: list[dict[str, Any]]) -> bool:
            ftj, ad = objs[1], objs[2]
            if (ftj.get("status") or {}).get("phase") == "Failed":
                raise RuntimeError(f"the FineTuneJob failed: {ftj['status'].get('conditions')}")
            failed = [a for a in (ad.get("status") or {}).get("adapters") or [] if a["state"] == "Failed"]
            if failed:
                raise RuntimeError(f"an adapter failed: {failed}")
            return (
                loop.phase_is("Succeeded")(ftj)
                and loop.phase_is("Ready")(ad)
                and loop.adapter_states(ad) == {"support-bot": "Loaded"}
            )

        objects = [
            ("BaseModel", loop.BASE_MODEL_NAME),
            ("FineTuneJob", "support-bot-v1"),
            ("AdapterDeployment", loop.DEPLOYMENT_NAME),
        ]
        objs, seen = loop.watch(
            res,
            objects,
            served,
            timeout=900,
            show=lambda table: print(table, flush=True),
            check=operator_alive,
            started=t_apply,
        )
        applied_at = t_apply - t0
        seen = {**seen, **seen_training}  # the first sighting of each phase
        timings += [(what, applied_at + secs) for what, secs in sorted(seen.items(), key=lambda kv: kv[1])]
        timings.sort(key=lambda kv: kv[1])
        ftj = objs[1]
        artifact = ftj["status"]["artifact"]
        print(f"\nadapter stored at {artifact['uri']} ({artifact['digest']}, {artifact['sizeBytes']} bytes)")
        _print_evaluation(ftj, store, work, node)
        url = loop.service_url(core, NAMESPACE)
        ticket, queue = loop.held_out_tickets()[0]
        print(f"\nasking both through the Service {url}: {loop.QUESTION!r} and a held-out {ticket!r}")
        t_ask = time.monotonic()
        answers = {
            model: (loop.chat(url, model), loop.chat(url, model, ticket, max_tokens=8))
            for model in (loop.BASE_MODEL_NAME, "support-bot")
        }
        mark("answers received")
        print(f"\n  base model ({loop.BASE_MODEL_NAME}): {answers[loop.BASE_MODEL_NAME][0]!r}")
        print(f"  adapter (support-bot):   {answers['support-bot'][0]!r}")
        print(f"  (trained answer:         {loop.SUPPORT_QA[0][1]!r})")
        print(f"\n  base model ({loop.BASE_MODEL_NAME}): {answers[loop.BASE_MODEL_NAME][1]!r}")
        print(f"  adapter (support-bot):   {answers['support-bot'][1]!r}")
        print(f"  (the rule's answer:      {queue!r}, a ticket it never trained on)")
        print(f"  four completions took {time.monotonic() - t_ask:.2f} s")
    except (RuntimeError, TimeoutError) as e:
        print(f"\nthe demo failed: {e}\noperator log:\n{operator.log_tail() if operator else ''}", file=sys.stderr)
        return 1
    finally:
        try:
            if operator is not None:  # the pod's log goes with the namespace: the last lines are kept
                with contextlib.suppress(Exception):
                    (logs_dir() / "operator.log").write_text(operator.log_tail(lines=5000) + "\n")
            if not keep:
                if operator is not None:
                    try:
                        operator.uninstall()
                    except RuntimeError as e:
                        print(f"could not uninstall the operator: {e}", file=sys.stderr)
                core.delete_namespace(NAMESPACE)
                if node_started:
                    node.down()
                if cluster_started:
                    local.down()
        finally:
            store.stop()  # its data and log: workdir()
    print("\ntimings in seconds since launch:")
    for what, seconds in timings:
        print(f"  {what:<58} {seconds:7.1f}")
    if keep:
        print(f"\nleft running (--keep): kubectl --kubeconfig {cluster.kubeconfig} -n {NAMESPACE} get all")
    return 0


def _print_evaluation(ftj: dict[str, Any], store: S3Server, work: Path, node: Any) -> None:
    """What the FineTuneJob's evaluation measured on the held-out tickets (status.evaluation), a few of the
    predictions stored next to the adapter, what the fine-tune used and cost (status.usage), and `kubectl get ftj`."""
    from lorafleet_dev import loop

    print(f"\nevaluation on held-out tickets ({loop.EVAL_URI}), from status.evaluation:")
    print("\n".join(loop.evaluation_lines(ftj)))
    predictions = loop.pull_predictions(store, ftj, work / "adapter")
    uri = (ftj["status"].get("evaluation") or {}).get("predictionsUri")
    print(f"\nsample predictions ({len(predictions)} stored in {uri}):")
    print("\n".join(loop.prediction_lines(predictions)))
    print(f"\n{loop.usage_line(ftj)}")
    proc = node.kubectl("get", "ftj", "-n", NAMESPACE, "-o", "wide", check=False)
    print(f"\n$ kubectl get ftj -o wide\n{(proc.stdout or proc.stderr).rstrip()}")


def _fresh_namespace(core: client.CoreV1Api) -> None:
    """An empty demo namespace: a previous run's is deleted first (its objects would answer for this one)."""
    try:
        core.delete_namespace(NAMESPACE)
    except client.ApiException as e:
        if e.status != 404:
            raise
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            core.read_namespace(NAMESPACE)
        except client.ApiException as e:
            if e.status == 404:
                break
            raise
        time.sleep(1)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorafleet-dev demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="leave the cluster, node and demo objects running")
    args = parser.parse_args(argv)
    if real_node_possible():
        from lorafleet_dev.build import BuildError
        from lorafleet_dev.cluster import ClusterError
        from lorafleet_dev.images import ImageBuildError
        from lorafleet_dev.node import NodeError

        try:
            return run_real(args.keep)
        except (BuildError, ClusterError, ImageBuildError, NodeError) as e:
            # A missing prerequisite is one line with its fix (bash hack/demo.sh installs them); no traceback.
            print(f"lorafleet-dev demo: {e}", file=sys.stderr)
            return 2
    print("lorafleet-dev demo: kwok variant (needs root for a real node; see `lorafleet-dev demo --help`)", flush=True)
    return run(args.keep)
