"""The whole loop on the real node, as ``lorafleet-dev demo`` runs it (lorafleet_dev.loop): a FineTuneJob trains a
LoRA in a pod, the adapter lands in MinIO with its manifest, an AdapterDeployment's vLLM (the vllm-cpu image)
serves the base model and the adapter through the Service, and adapters are added and removed without
restarting the pod. The operator runs as a pod, installed with the Helm chart, and the NetworkPolicies it
creates are enforced (kube-router). The FineTuneJob's evaluation (held-out routing tickets, a quality bar on
exactMatch) shows the adapter beating its base in status.evaluation, the manifest and the stored predictions, and
the operator's prices (the chart's operator.pricing) give status.usage.estimatedCost; `kubectl get ftj -o wide`
shows both. Also: a trainer pod deleted mid-run is replaced and resumes from its checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from lorafleet.storage import ArtifactStore, BaseModelRef, VersionFolder
from lorafleet_dev import loop
from lorafleet_dev.operator import install_crds
from lorafleet_dev.s3server import S3Server
from tests.e2e.conftest import NodeHandle

pytestmark = pytest.mark.e2e


@pytest.fixture
def world(node: NodeHandle, namespace: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """MinIO on the node's address with the tiny model and the dataset, the store Secret, and the operator
    installed with the Helm chart: a pod on the real node watching only this test's namespace, NetworkPolicies
    on (kube-router enforces them on this node)."""
    loop.ensure_images()
    server = S3Server(tmp_path / "minio" / "data", host=node.ip)
    server.start()
    op: loop.ChartOperator | None = None
    try:
        model_digest = loop.seed_store(server, tmp_path)
        install_crds(node.cluster)
        loop.store_secret(node.cluster.core, namespace, server)
        release = "lf-" + hashlib.sha256(namespace.encode()).hexdigest()[:8]
        op = loop.ChartOperator(
            node.cluster.kubeconfig, node.cluster.api_client, namespace, server, release, tmp_path / "helm"
        )
        op.install()
        yield {
            "server": server,
            "operator": op,
            "res": loop.Resources(node.cluster.api_client, namespace),
            "model_dir": tmp_path / "tiny-model",
            "model_digest": model_digest,
        }
    finally:
        if op is not None:
            with contextlib.suppress(Exception):
                op.uninstall()
        server.remove()


def _debug(node: NodeHandle, namespace: str, op: loop.ChartOperator) -> str:
    """Pods, their descriptions and every container's log: what to read when the loop does not finish."""
    out = []
    for args in (("get", "pods,jobs,deploy", "-n", namespace, "-o", "wide"), ("describe", "pods", "-n", namespace)):
        proc = node.kubectl_run(*args)
        out.append(f"$ kubectl {' '.join(args)}\n{proc.stdout[-6000:]}{proc.stderr}")
    for pod in node.cluster.core.list_namespaced_pod(namespace).items:
        for c in [*(pod.spec.init_containers or []), *pod.spec.containers]:
            try:
                log = node.cluster.core.read_namespaced_pod_log(pod.metadata.name, namespace, container=c.name)
            except client.ApiException as e:
                log = f"(no log: {e.reason})"
            errors = [line for line in log.splitlines() if "Error" in line or "error" in line][-15:]
            out.append(f"--- log of {pod.metadata.name}/{c.name}:\n{log[-3000:]}\n(error lines: {errors})")
    out.append(f"operator log:\n{op.log_tail()}")
    return "\n".join(out)


def _no_crashed_containers(node: NodeHandle, namespace: str, selector: str) -> None:
    for pod in node.cluster.core.list_namespaced_pod(namespace, label_selector=selector).items:
        for cs in [*(pod.status.init_container_statuses or []), *(pod.status.container_statuses or [])]:
            term = cs.state.terminated if cs.state else None
            if term is not None and term.exit_code not in (0, 3):  # 3: interrupted, resumes in the next pod
                raise AssertionError(f"{pod.metadata.name}/{cs.name} exited {term.exit_code} ({term.reason})")


def _no_failed_adapter(ad: dict[str, Any]) -> None:
    failed = [a for a in (ad.get("status") or {}).get("adapters") or [] if a["state"] == "Failed"]
    if failed:
        raise AssertionError(f"adapters failed: {failed}")


@pytest.mark.timeout(1800)
def test_train_store_serve_then_add_and_remove_an_adapter_without_restart(
    node: NodeHandle, namespace: str, world: dict[str, Any]
) -> None:
    res: loop.Resources = world["res"]
    op: loop.ChartOperator = world["operator"]
    core = node.cluster.core
    res.create(loop.base_model(namespace))
    res.create(loop.fine_tune_job(namespace))
    res.create(
        loop.adapter_deployment(namespace, [{"name": "support-bot", "fineTuneJobRef": {"name": "support-bot-v1"}}])
    )

    def served(objs: list[dict[str, Any]]) -> bool:
        _, ftj, ad = objs
        if (ftj.get("status") or {}).get("phase") == "Failed":
            raise AssertionError(f"the FineTuneJob failed: {ftj['status']}")
        _no_failed_adapter(ad)
        return (
            loop.phase_is("Succeeded")(ftj)
            and loop.phase_is("Ready")(ad)
            and loop.adapter_states(ad) == {"support-bot": "Loaded"}
        )

    def healthy() -> None:
        assert op.alive(), f"the operator exited:\n{op.log_tail()}"
        _no_crashed_containers(node, namespace, "lorafleet.io/adapterdeployment=assistants")

    objects = [
        ("BaseModel", loop.BASE_MODEL_NAME),
        ("FineTuneJob", "support-bot-v1"),
        ("AdapterDeployment", "assistants"),
    ]
    try:
        (_, ftj, _), seen = loop.watch(res, objects, served, timeout=900, show=print, check=healthy)
    except (AssertionError, TimeoutError) as e:
        raise AssertionError(f"{e}\n{_debug(node, namespace, op)}") from None
    print("first seen (s):", json.dumps({k: round(v, 1) for k, v in seen.items()}))

    # Trained in a pod on the real node; stored with its manifest and lineage; recorded from the manifest.
    artifact = ftj["status"]["artifact"]
    manifest, digest, _ = ArtifactStore(world["server"].store_settings()).read_manifest(
        VersionFolder.parse(artifact["uri"])
    )
    assert digest == artifact["digest"] and manifest.kind == "adapter" and manifest.name == "support-bot"
    assert manifest.base_model is not None and manifest.base_model.uri == loop.MODEL_URI
    assert manifest.base_model.digest == world["model_digest"]
    assert manifest.dataset is not None and manifest.dataset.uri == loop.DATASET_URI
    assert manifest.metrics["steps"] == loop.TRAIN_STEPS and manifest.metrics["trainLoss"] < 2.0, manifest.metrics

    # Evaluated on held-out tickets it never trained on: the adapter beats its base by the bar, as judged by the
    # operator from the manifest; the predictions are stored with the adapter; the CPU time is priced.
    evaluation, usage = ftj["status"]["evaluation"], ftj["status"]["usage"]
    print("\n".join(loop.evaluation_lines(ftj)), "\n" + loop.usage_line(ftj))
    scores = {m["name"]: m for m in evaluation["metrics"]}
    assert list(scores) == loop.EVAL_METRICS, evaluation
    em = scores["exactMatch"]
    assert em["examples"] == loop.ROUTING_HELD_OUT and em["adapter"] - em["base"] >= loop.EXACT_MATCH_BAR, em
    assert scores["rougeL"]["adapter"] > scores["rougeL"]["base"] and scores["evalLoss"]["delta"] < 0, scores
    assert evaluation["passed"] is True and evaluation["score"].startswith("exactMatch "), evaluation
    assert manifest.evaluation is not None and manifest.evaluation["metrics"]["exactMatch"]["adapter"] == pytest.approx(
        em["adapter"], abs=1e-4
    )
    predictions = loop.pull_predictions(world["server"], ftj, world["model_dir"].parent / "pulled")
    held_out = loop.held_out_tickets()
    assert [p["reference"] for p in predictions] == [a for _, a in held_out[: len(predictions)]] and predictions
    assert re.fullmatch(r"0\.\d{4} USD", usage["estimatedCost"]), usage  # 500m x seconds at 0.05 USD per CPU-hour
    assert usage["cpuSeconds"] == pytest.approx(0.5 * usage["wallSeconds"]) and usage["tokensTrained"] > 0, usage
    wide = node.kubectl_run("get", "ftj", "support-bot-v1", "-n", namespace, "-o", "wide")
    print(wide.stdout)
    header, row = wide.stdout.splitlines()[:2]
    assert "SCORE" in header and "COST" in header and evaluation["score"] in row and usage["estimatedCost"] in row

    # Every workload runs under its egress NetworkPolicy (store and API server only), rendered by the operator.
    policies = client.NetworkingV1Api(node.cluster.api_client).list_namespaced_network_policy(namespace).items
    assert {p.metadata.name for p in policies} >= {"support-bot-v1-egress", "assistants-egress"}, policies

    # Served by vLLM in a pod on the real node, through the Service (kube-proxy), base model and adapter.
    pods = loop.serving_pods(core, namespace)
    assert len(pods) == 1 and pods[0].spec.node_name == node.name, [p.spec.node_name for p in pods]
    pod_uid, restarts = pods[0].metadata.uid, loop.restarts(pods[0])
    url = loop.service_url(core, namespace)
    base_answer = loop.chat(url, loop.BASE_MODEL_NAME)
    adapter_answer = loop.chat(url, "support-bot")
    print(f"base model:  {base_answer!r}\nsupport-bot: {adapter_answer!r}")
    assert adapter_answer != base_answer
    assert "Settings" in adapter_answer or "Security" in adapter_answer, adapter_answer  # it learned the answer

    # A second adapter (pushed to the store from outside the cluster, pinned by digest) is loaded into the
    # running pod: no restart, no new pod.
    from lorafleet_dev.vllm_local import make_lora_adapter

    extra_dir = make_lora_adapter(world["model_dir"], Path(world["model_dir"]).parent / "extra", seed=7, r=8)
    pushed = ArtifactStore(world["server"].store_settings()).push(
        extra_dir,
        VersionFolder.parse(f"{loop.ADAPTER_ROOT}/{namespace}/adapters/extra/v1"),  # the namespace root
        kind="adapter",
        name="extra",
        version="v1",
        base_model=BaseModelRef(name=loop.BASE_MODEL_NAME, uri=loop.MODEL_URI, digest=world["model_digest"]),
    )
    both = [
        {"name": "support-bot", "fineTuneJobRef": {"name": "support-bot-v1"}},
        {"name": "extra", "artifact": {"uri": pushed.folder.uri, "digest": pushed.digest}},
    ]

    def still_serving() -> None:  # the replica stays in the Service while the new adapter loads
        healthy()
        assert loop.chat(url, "support-bot") == adapter_answer

    t0 = time.monotonic()
    res.set_adapters(both)
    try:
        loop.watch(
            res,
            [("AdapterDeployment", "assistants")],
            lambda objs: (
                _no_failed_adapter(objs[0])
                or loop.adapter_states(objs[0]) == {"support-bot": "Loaded", "extra": "Loaded"}
            ),
            timeout=240,
            show=print,
            check=still_serving,
        )
    except (AssertionError, TimeoutError) as e:
        raise AssertionError(f"{e}\n{_debug(node, namespace, op)}") from None
    print(f"second adapter Loaded {time.monotonic() - t0:.1f} s after the spec changed")
    extra_answer = loop.chat(url, "extra")
    assert extra_answer not in (base_answer, adapter_answer)
    pods = loop.serving_pods(core, namespace)
    assert [p.metadata.uid for p in pods] == [pod_uid] and loop.restarts(pods[0]) == restarts

    # Removed: unloaded from the same pod; the other adapter still answers as before.
    t0 = time.monotonic()
    res.set_adapters(both[:1])

    def unloaded(objs: list[dict[str, Any]]) -> bool:
        if loop.adapter_states(objs[0]) != {"support-bot": "Loaded"}:
            return False
        try:
            loop.chat(url, "extra")
        except loop.ChatError as e:
            return e.status == 404
        return False

    loop.watch(res, [("AdapterDeployment", "assistants")], unloaded, timeout=240, show=print, check=healthy)
    print(f"second adapter unloaded {time.monotonic() - t0:.1f} s after the spec changed")
    assert loop.chat(url, "support-bot") == adapter_answer
    pods = loop.serving_pods(core, namespace)
    assert [p.metadata.uid for p in pods] == [pod_uid] and loop.restarts(pods[0]) == restarts


_STOPPED = re.compile(r"stopped by a signal at step (\d+)")


def _events(log: str, name: str) -> list[dict[str, Any]]:
    out = []
    for line in log.splitlines():
        if line.startswith("{") and f'"event":"{name}"' in line:
            out.append(json.loads(line))
    return out


@pytest.mark.timeout(1800)
def test_trainer_pod_deleted_mid_run_resumes_from_its_checkpoint(
    node: NodeHandle, namespace: str, world: dict[str, Any]
) -> None:
    res: loop.Resources = world["res"]
    op: loop.ChartOperator = world["operator"]
    core = node.cluster.core
    interval, steps = 25, 400
    res.create(loop.base_model(namespace))
    res.create(loop.fine_tune_job(namespace, "long", "long-bot", steps=steps, interval=interval))
    selector = "job-name=long-train"

    def past_first_checkpoint(objs: list[dict[str, Any]]) -> bool:
        progress = (objs[0].get("status") or {}).get("progress") or {}
        return int(progress.get("step") or 0) > interval + 10

    try:
        loop.watch(res, [("FineTuneJob", "long")], past_first_checkpoint, timeout=600, show=print)
        first = core.list_namespaced_pod(namespace, label_selector=selector).items
        assert len(first) == 1, [p.metadata.name for p in first]
        victim = first[0].metadata.name
        core.delete_namespaced_pod(victim, namespace)  # the default grace period: SIGTERM, as an eviction sends
        print(f"deleted {victim}")

        # The Job's pod finalizer keeps the deleted pod readable until the Job has counted it.
        def stopped_at() -> int | None:
            try:
                pod = core.read_namespaced_pod(victim, namespace)
                log = core.read_namespaced_pod_log(victim, namespace, container="trainer")
            except client.ApiException:
                return None
            found = _STOPPED.findall(log)
            for cs in pod.status.container_statuses or []:
                term = cs.state.terminated if cs.state else None
                if term is not None and term.message:
                    found += _STOPPED.findall(term.message)
            return int(found[-1]) if found else None

        deadline = time.monotonic() + 60
        stopped = None
        while stopped is None and time.monotonic() < deadline:
            stopped = stopped_at()
            time.sleep(0.5)
        assert stopped is not None, f"no 'stopped by a signal' from {victim}\n{_debug(node, namespace, op)}"

        done, _ = loop.watch(
            res,
            [("FineTuneJob", "long")],
            lambda o: loop.phase_is("Succeeded", "Failed")(o[0]),
            timeout=900,
            show=print,
        )
    except (AssertionError, TimeoutError) as e:
        raise AssertionError(f"{e}\n{_debug(node, namespace, op)}") from None
    assert done[0]["status"]["phase"] == "Succeeded", done[0]["status"]

    pods = core.list_namespaced_pod(namespace, label_selector=selector).items
    retry = [p for p in pods if p.metadata.name != victim]
    assert len(retry) == 1, [p.metadata.name for p in pods]
    log = core.read_namespaced_pod_log(retry[0].metadata.name, namespace, container="trainer")
    resumed = _events(log, "resume")
    assert resumed, f"the retry did not resume:\n{log[-3000:]}"
    resume_step = int(resumed[0]["step"])
    repeated = stopped - resume_step
    print(f"stopped at step {stopped}, resumed at step {resume_step}: {repeated} steps repeated (interval {interval})")
    assert 0 <= repeated < interval
    job = node.cluster.batch.read_namespaced_job("long-train", namespace)
    assert (job.status.failed or 0) == 0, job.status  # exit 3 (interrupted) is ignored by the podFailurePolicy
    manifest, _, _ = ArtifactStore(world["server"].store_settings()).read_manifest(
        VersionFolder.parse(done[0]["status"]["artifact"]["uri"])
    )
    assert manifest.metrics["steps"] == steps
