"""Operator benchmark (issue #14, point 6): lorafleet's operator against a minimal kopf operator, same cluster.

    python benchmarks/operator/run.py [--n 1000] [--steady 60] [--churn SECONDS] [--restart] [--out FILE.json]
        [--lorafleet-rev REV]   # lorafleet's operator/ as committed at REV (git archive), not the working tree

Uses the local control plane of ``lorafleet_dev.cluster`` (etcd, kube-apiserver, controller-manager, scheduler,
kwok fake nodes; built from source on first use, shared with concurrent sessions through acquire/release) and
installs the CRDs from crds/. Then, for each operator in turn (``--operators baseline,lorafleet``), in a fresh
namespace of its own that only it watches:

1. a counting reverse proxy (proxy.py) starts in front of the API server and the operator starts as a
   subprocess whose kubeconfig points at that proxy: every API request the operator makes, and only those, is
   counted by verb and resource;
2. a BaseModel (pvc:// source: Ready without an object store), then, once the operator watches FineTuneJobs,
   a burst of ``--n`` FineTuneJobs from ``--creators`` threads. The harness watches FineTuneJobs and Jobs
   directly (not through the proxy) and times, per object, from the FineTuneJob's ADDED event to its Job's
   ADDED event (create -> first child), and to the first event that shows a status with observedGeneration or
   conditions (create -> status written; n/a for the baseline, which writes none);
3. operator RSS (VmRSS of /proc/<pid>/status) once every object has its Job (and status);
4. after ``--settle`` s and then until no FineTuneJob or Job has changed for ``--quiet`` s, a steady-state
   window of ``--steady`` s in which nothing changes: API requests per minute by verb (and by verb and
   resource), FineTuneJob changes seen, RSS after it;
5. optionally ``--churn S``: S seconds of creating ``--churn-rate`` (10) FineTuneJobs a second and deleting each
   one 10 creations later, from a thread pool, RSS after; ``--restart``: SIGKILL the operator, clear every
   status (subresource), start it again, time until every status is current again (observedGeneration ==
   generation; n/a for the baseline);
6. the operator and proxy stop, the objects (by collection) and the namespace are deleted, and waited for
   before the next operator starts.

Results: JSON (``--out``) and a markdown table (printed, and next to the JSON as .md) with lorafleet, the
baseline and the ratio. The training pods are pinned to a node label no node has, so they stay Pending and
the objects do not change state during the steady window (``--schedule`` lets them run on the kwok nodes for
1000 h instead). Not a test; results go to docs/dev/operator-benchmark.md. The work folder (lfbench-* in the
temporary directory: the operators' and proxies' logs, kubeconfigs, the --lorafleet-rev export) is removed at the
end, unless --keep or a run failed (then its logs are there, and the last line says so).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from lorafleet_dev.cluster import LocalCluster
from lorafleet_dev.operator import CRDS, install_crds
from lorafleet_dev.testing import ClusterHandle

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GROUP, VERSION = "lorafleet.io", "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
BASE_MODEL = "bench-model"
OPERATORS = ("baseline", "lorafleet")
WRITE_VERBS = ("create", "update", "patch", "apply", "delete", "deletecollection")
VERBS = ("get", "list", "watch", *WRITE_VERBS)
NO_NODE = {"lorafleet.io/benchmark-node": "none"}  # no node has it: training pods stay Pending
KWOK_DURATION = "lorafleet.io/kwok-duration"  # see lorafleet_dev.kwok
Obj = dict[str, Any]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- objects ----------------------------------------------------------------------------------------------


def base_model(namespace: str) -> Obj:
    return {
        "apiVersion": API_VERSION,
        "kind": "BaseModel",
        "metadata": {"name": BASE_MODEL, "namespace": namespace},
        "spec": {"family": "llama", "source": {"uri": "pvc://shared-models/tiny-llama"}},
    }


def fine_tune_job(name: str, namespace: str, schedule: bool) -> Obj:
    """As tests/unit/objects.fine_tune_job (one GPU, 1 CPU, 1 GiB), each with its own adapter name."""
    resources: Obj = {"gpusPerNode": 1, "cpu": 1, "memory": "1Gi"}
    if schedule:
        resources["podAnnotations"] = {KWOK_DURATION: "1000h"}  # Running on a kwok node, never finishing
    else:
        resources["nodeSelector"] = dict(NO_NODE)
    return {
        "apiVersion": API_VERSION,
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "baseModelRef": {"name": BASE_MODEL},
            "dataset": {"uri": "s3://datasets/support/train.jsonl", "format": "chat"},
            "output": {"adapterName": name, "version": "v1"},
            "training": {"maxSteps": 100, "checkpointInterval": 20},
            "resources": resources,
        },
    }


def adapter_deployment(name: str, namespace: str, schedule: bool) -> Obj:
    """As tests/unit/objects.adapter_deployment without adapters: one vLLM replica of the BaseModel."""
    resources: Obj = {"cpu": 1, "memory": "1Gi"}
    if schedule:
        resources["podAnnotations"] = {KWOK_DURATION: "1000h"}
    else:
        resources["nodeSelector"] = dict(NO_NODE)
    return {
        "apiVersion": API_VERSION,
        "kind": "AdapterDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"baseModelRef": {"name": BASE_MODEL}, "replicas": 1, "adapters": [], "resources": resources},
    }


@dataclass(frozen=True)
class Kind:
    """What a burst creates, and the child whose appearance is timed."""

    kind: str
    plural: str
    build: Callable[[str, str, bool], Obj]
    child: tuple[str, str, str]  # group, version, plural
    child_kind: str


KINDS = {
    "finetunejob": Kind("FineTuneJob", "finetunejobs", fine_tune_job, ("batch", "v1", "jobs"), "Job"),
    "adapterdeployment": Kind(
        "AdapterDeployment", "adapterdeployments", adapter_deployment, ("apps", "v1", "deployments"), "Deployment"
    ),
}


# -- small helpers ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> dict[str, float] | None:
    """VmRSS and VmHWM (peak) of a process, MiB."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summary(values: list[float], expected: int) -> Obj:
    return {
        "count": len(values),
        "missing": expected - len(values),
        "p50": percentile(values, 0.5),
        "p99": percentile(values, 0.99),
        "max": max(values) if values else None,
        "mean": sum(values) / len(values) if values else None,
    }


def by_verb(counts: dict[str, int]) -> dict[str, int]:
    out: collections.Counter[str] = collections.Counter()
    for key, n in counts.items():
        out[key.split(" ", 1)[0]] += n
    return dict(out)


def per_minute(counts: dict[str, int], seconds: float) -> dict[str, float]:
    return {k: round(v * 60.0 / seconds, 1) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    keys = set(after) | set(before)
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys if after.get(k, 0) != before.get(k, 0)}


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "operator"], capture_output=True, text=True
        ).stdout.strip()
        return rev + (" (operator/ modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def export_operator(rev: str, into: Path) -> tuple[str, Path]:
    """`git archive` of operator/ at `rev` into `into` (the working tree is left alone); returns the full commit
    and the folder to put on PYTHONPATH."""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", commit, "operator", "crds"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return commit, into / "operator"  # and its CRDs in into/crds, installed instead of the working tree's


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- the counting proxy -----------------------------------------------------------------------------------


class Proxy:
    """proxy.py as a subprocess in front of the cluster's API server, for one operator."""

    def __init__(self, cluster: LocalCluster, log_path: Path) -> None:
        self.cluster = cluster
        self.port = free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        status = self.cluster.status()
        cert, key = self.cluster.pki.pair("admin")
        args = [
            sys.executable,
            str(HERE / "proxy.py"),
            f"--port={self.port}",
            f"--upstream={status['server']}",
            f"--ca={self.cluster.pki.ca_crt}",
            f"--cert={cert}",
            f"--key={key}",
        ]
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                self.counts()
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"the proxy exited: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError("the proxy did not start in 30 s")

    def counts(self) -> dict[str, int]:
        with urllib.request.urlopen(f"{self.url}/_bench/counts", timeout=10) as resp:
            return dict(json.loads(resp.read())["counts"])

    def kubeconfig(self, path: Path, user: str) -> Path:
        """A kubeconfig for the operator: plain HTTP to the proxy, which authenticates upstream."""
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "bench", "cluster": {"server": self.url}}],
            "users": [{"name": user, "user": {"token": f"unused-{user}"}}],
            "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": user}}],
            "current-context": "bench",
        }
        path.write_text(yaml.safe_dump(doc))
        return path

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


def stop_process(proc: subprocess.Popen[bytes], kill: bool = False, grace: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the operators under test -----------------------------------------------------------------------------


@dataclass
class Operator:
    name: str
    namespace: str
    kubeconfig: Path
    log_path: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    source: Path | None = None  # a folder holding the lorafleet package to run instead of the working tree's
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    metrics_port: int = field(default_factory=free_port)

    @property
    def writes_status(self) -> bool:
        return self.name == "lorafleet"

    def command(self) -> list[str]:
        if self.name == "baseline":
            return [sys.executable, str(HERE / "baseline.py"), f"--namespace={self.namespace}"]
        return [sys.executable, "-m", "lorafleet.cli", "operator"]

    def env(self) -> dict[str, str]:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        if self.name == "lorafleet":
            # As OperatorProcess (tools/lorafleet_dev/operator.py) and the integration tests, but one exact
            # namespace. The default store is configured (the FineTuneJobs' outputs need one) and never
            # contacted: the BaseModel is pvc:// and no trainer runs.
            env.update(
                {
                    "LORAFLEET_LOG_FORMAT": "text",
                    "LORAFLEET_METRICS_PORT": str(self.metrics_port),
                    "LORAFLEET_HEALTH_PORT": str(free_port()),
                    "LORAFLEET_NAMESPACES": json.dumps([self.namespace]),
                    "LORAFLEET_STORE_ENDPOINT": "http://127.0.0.1:9",
                    "LORAFLEET_STORE_URI": "s3://lorafleet-bench/adapters",
                    "AWS_ACCESS_KEY_ID": "unused",
                    "AWS_SECRET_ACCESS_KEY": "unused",
                }
            )
        if self.source is not None:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.source), env.get("PYTHONPATH", "")) if p)
        env.update(self.extra_env)
        return env

    def module_path(self) -> str:
        """Where the operator's Python imports lorafleet (or kopf, for the baseline) from."""
        module = "lorafleet" if self.name == "lorafleet" else "kopf"
        code = f"import {module}; print({module}.__file__)"
        proc = subprocess.run([sys.executable, "-c", code], env=self.env(), capture_output=True, text=True, cwd=REPO)
        return proc.stdout.strip() or proc.stderr.strip()[-300:]

    def start(self) -> None:
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.command(), env=self.env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.started_at = time.monotonic()

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None:
            stop_process(self.proc, kill=kill)
            self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss(self) -> dict[str, float] | None:
        return rss_mib(self.proc.pid) if self.proc is not None else None

    def external_requests(self) -> dict[str, int]:
        """lorafleet_external_requests_total by target (s3, sts, pod) from the operator's /metrics; {} for the
        baseline, which makes none."""
        if not self.writes_status or not self.alive():
            return {}
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as resp:
                text = resp.read().decode()
        except OSError:
            return {}
        counts: dict[str, int] = {}
        for line in text.splitlines():
            if line.startswith("lorafleet_external_requests_total{"):
                labels, _, value = line.rpartition(" ")
                target = labels.partition('target="')[2].partition('"')[0]
                counts[target] = counts.get(target, 0) + int(float(value))
        return counts

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


# -- watching what happens --------------------------------------------------------------------------------


class Watcher(threading.Thread):
    """Watches one resource in one namespace straight from the API server (not through the proxy) and calls
    `on_event(type, object, monotonic time of arrival)` for every event, resuming after the server ends a watch."""

    def __init__(
        self,
        api: client.ApiClient,
        group: str,
        version: str,
        plural: str,
        namespace: str,
        on_event: Callable[[str, Obj, float], None],
    ) -> None:
        super().__init__(name=f"watch-{plural}", daemon=True)
        self.custom = client.CustomObjectsApi(api)
        self.args = (group, version, namespace, plural)
        self.on_event = on_event
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self.watch: watch.Watch | None = None

    def run(self) -> None:
        rv = ""
        while not self.stopping.is_set():
            try:
                if not rv:
                    listed: Obj = self.custom.list_namespaced_custom_object(*self.args)  # type: ignore[assignment]
                    rv = listed["metadata"]["resourceVersion"]
                    now = time.monotonic()
                    for obj in listed.get("items") or []:
                        self.on_event("ADDED", obj, now)
                self.watch = watch.Watch()  # type: ignore[no-untyped-call]
                self.ready.set()
                for event in self.watch.stream(  # type: ignore[no-untyped-call]
                    self.custom.list_namespaced_custom_object,
                    *self.args,
                    resource_version=rv,
                    timeout_seconds=240,
                    allow_watch_bookmarks=True,
                ):
                    now = time.monotonic()
                    obj = event["object"]
                    rv = obj.get("metadata", {}).get("resourceVersion") or rv
                    if event["type"] == "ERROR":
                        rv = ""  # 410 Gone: list again
                        break
                    if event["type"] != "BOOKMARK":
                        self.on_event(event["type"], obj, now)
            except ApiException as exc:
                if exc.status == 410:
                    rv = ""
                elif not self.stopping.is_set():
                    log(f"watch {self.args[-1]}: {exc.status} {exc.reason}; retrying")
                    time.sleep(1)
            except Exception as exc:
                if not self.stopping.is_set():
                    log(f"watch {self.args[-1]}: {exc!r}; retrying")
                    time.sleep(1)

    def stop(self) -> None:
        self.stopping.set()
        if self.watch is not None:
            self.watch.stop()  # type: ignore[no-untyped-call]


class Timeline:
    """What the harness saw, per FineTuneJob name: when it appeared, its Job appeared, its status was written."""

    def __init__(self, owner_kind: str = "FineTuneJob") -> None:
        self.owner_kind = owner_kind
        self.created: dict[str, float] = {}
        self.job: dict[str, float] = {}
        self.status: dict[str, float] = {}
        self.current: dict[str, bool] = {}  # status.observedGeneration == metadata.generation, as last seen
        self.modified = 0  # FineTuneJob MODIFIED events
        self.last_change = time.monotonic()  # of any FineTuneJob or Job event
        self.lock = threading.Lock()

    def on_finetunejob(self, type_: str, obj: Obj, at: float) -> None:
        name = obj["metadata"]["name"]
        status = obj.get("status") or {}
        with self.lock:
            if type_ == "DELETED":
                self.current.pop(name, None)
                return
            self.last_change = at
            if type_ == "MODIFIED":
                self.modified += 1
            self.created.setdefault(name, at)
            if status.get("observedGeneration") is not None or status.get("conditions"):
                self.status.setdefault(name, at)
            self.current[name] = status.get("observedGeneration") == obj["metadata"].get("generation")

    def on_job(self, type_: str, obj: Obj, at: float) -> None:
        self.last_change = at
        if type_ != "ADDED":
            return
        for ref in obj["metadata"].get("ownerReferences") or []:
            if ref.get("kind") == self.owner_kind and ref.get("controller"):
                with self.lock:
                    self.job.setdefault(ref["name"], at)


# -- one operator's run -----------------------------------------------------------------------------------


@dataclass
class Settings:
    n: int
    steady: float
    settle: float
    quiet: float
    settle_timeout: float
    churn: float
    churn_rate: float
    restart: bool
    creators: int
    schedule: bool
    burst_timeout: float
    keep: bool
    lorafleet_env: dict[str, str]
    lorafleet_source: Path | None
    kind: Kind = KINDS["finetunejob"]


def api_client(kubeconfig: Path, pool: int = 32) -> client.ApiClient:
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)  # type: ignore[no-untyped-call]
    cfg.connection_pool_maxsize = pool
    return client.ApiClient(cfg)


def wait_for(probe: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> float:
    """Seconds until probe() is true; TimeoutError after `timeout`."""
    t0 = time.monotonic()
    while not probe():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - t0


class Run:
    def __init__(self, name: str, cluster: LocalCluster, settings: Settings, workdir: Path, run_id: str) -> None:
        self.name = name
        self.cluster = cluster
        self.s = settings
        self.namespace = f"lfbench-{run_id}-{name}"
        self.api = api_client(cluster.kubeconfig)
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.proxy = Proxy(cluster, workdir / f"{name}-proxy.log")
        kubeconfig = self.proxy.kubeconfig(workdir / f"{name}.kubeconfig", f"bench-{name}")
        extra = settings.lorafleet_env if name == "lorafleet" else {}
        source = settings.lorafleet_source if name == "lorafleet" else None
        self.op = Operator(name, self.namespace, kubeconfig, workdir / f"{name}.log", extra, source)
        self.timeline = Timeline(settings.kind.kind)
        self.watchers: list[Watcher] = []
        self.burst_end, self.burst_modified = 0.0, 0
        self.result: Obj = {
            "operator": name,
            "namespace": self.namespace,
            "log": str(self.op.log_path),
            "imports": self.op.module_path(),
        }

    # -- lifecycle

    def create_namespace(self) -> None:
        self.core.create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=self.namespace, labels={"lorafleet.io/bench": "true"}))
        )

        def has_default_sa() -> bool:
            try:
                self.core.read_namespaced_service_account("default", self.namespace)
                return True
            except ApiException as exc:
                if exc.status != 404:
                    raise
                return False

        wait_for(has_default_sa, 60, f"ServiceAccount default in {self.namespace}")

    def start_watchers(self) -> None:
        watch_api = api_client(self.cluster.kubeconfig, pool=4)
        self.watchers = [
            Watcher(watch_api, GROUP, VERSION, self.s.kind.plural, self.namespace, self.timeline.on_finetunejob),
            Watcher(watch_api, *self.s.kind.child, self.namespace, self.timeline.on_job),
        ]
        for w in self.watchers:
            w.start()
        for w in self.watchers:
            w.ready.wait(30)

    def watching(self, counts: dict[str, int]) -> int:
        return counts.get(f"watch {self.s.kind.plural}", 0)

    def start_operator(self) -> float:
        """Start the operator; seconds until it watches FineTuneJobs (as the proxy sees it)."""
        before = self.watching(self.proxy.counts())
        self.op.start()

        def watching() -> bool:
            if not self.op.alive():
                raise RuntimeError(f"{self.name} exited at start:\n{self.op.log_tail()}")
            return self.watching(self.proxy.counts()) > before

        return wait_for(watching, 120, f"{self.name} to watch FineTuneJobs")

    def cleanup(self, wait: bool = True) -> None:
        for w in self.watchers:
            w.stop()
        self.op.stop()
        self.proxy.stop()
        if self.s.keep:
            log(f"keeping namespace {self.namespace}")
            return
        log(f"deleting namespace {self.namespace}")
        t0 = time.monotonic()
        # One deletecollection per kind first: the namespace controller and the garbage collector delete object
        # by object at the controller-manager's client QPS (minutes for 1,000 Jobs and their pods).
        deletes: tuple[Callable[[], object], ...] = (
            lambda: self.custom.delete_collection_namespaced_custom_object(
                GROUP, VERSION, self.namespace, self.s.kind.plural
            ),
            lambda: client.AppsV1Api(self.api).delete_collection_namespaced_deployment(
                self.namespace, propagation_policy="Background"
            ),
            lambda: client.BatchV1Api(self.api).delete_collection_namespaced_job(
                self.namespace, propagation_policy="Background"
            ),
            lambda: self.core.delete_collection_namespaced_pod(self.namespace),
            # lorafleet's other children, else left to the garbage collector
            lambda: self.core.delete_collection_namespaced_config_map(self.namespace),
            lambda: self.core.delete_collection_namespaced_service_account(self.namespace),
            lambda: client.RbacAuthorizationV1Api(self.api).delete_collection_namespaced_role(self.namespace),
            lambda: client.RbacAuthorizationV1Api(self.api).delete_collection_namespaced_role_binding(self.namespace),
            lambda: client.NetworkingV1Api(self.api).delete_collection_namespaced_network_policy(self.namespace),
            lambda: self.core.delete_collection_namespaced_event(self.namespace),
        )
        for delete in deletes:
            with contextlib.suppress(ApiException):
                delete()
        with contextlib.suppress(ApiException):
            self.core.delete_namespace(self.namespace, propagation_policy="Background")

        def gone() -> bool:
            try:
                self.core.read_namespace(self.namespace)
                return False
            except ApiException as exc:
                return bool(exc.status == 404)

        if not wait:  # the last operator: nothing runs after it, so its namespace goes away in the background
            self.api.close()  # type: ignore[no-untyped-call]
            return
        try:
            wait_for(gone, 900, f"namespace {self.namespace} deleted", interval=2)
            self.result["namespace_deleted_s"] = round(time.monotonic() - t0, 1)
        except TimeoutError as exc:
            log(str(exc))
        self.api.close()  # type: ignore[no-untyped-call]

    # -- phases

    def burst(self) -> None:
        s, tl = self.s, self.timeline
        names = [f"bench-{i:05d}" for i in range(s.n)]
        posted: dict[str, float] = {}
        counts0 = self.proxy.counts()

        def create(name: str) -> None:
            self.custom.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, s.kind.plural, s.kind.build(name, self.namespace, s.schedule)
            )
            posted[name] = time.monotonic()

        log(f"{self.name}: creating {s.n} {s.kind.kind}s ({s.creators} threads)")
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(s.creators) as pool:
            list(pool.map(create, names))
        created_s = time.monotonic() - t0
        what = f"{s.kind.child_kind}s and statuses" if self.op.writes_status else f"{s.kind.child_kind}s"
        log(f"{self.name}: {s.n} created in {created_s:.1f} s; waiting for {what}")

        def done() -> bool:
            if not self.op.alive():
                raise RuntimeError(f"{self.name} exited during the burst:\n{self.op.log_tail()}")
            jobs = sum(1 for n in names if n in tl.job)
            statuses = sum(1 for n in names if n in tl.status) if self.op.writes_status else s.n
            return jobs >= s.n and statuses >= s.n

        last_report = time.monotonic()

        def progress() -> bool:
            nonlocal last_report
            if time.monotonic() - last_report > 15:
                last_report = time.monotonic()
                log(f"{self.name}: {len(tl.job)} {s.kind.child_kind}s, {len(tl.status)} statuses, load {load()}")
            return done()

        timed_out = False
        try:
            wait_for(progress, s.burst_timeout, "the burst", interval=0.5)
        except TimeoutError as exc:
            log(f"{self.name}: {exc}")
            timed_out = True
        complete_s = time.monotonic() - t0
        counts1 = self.proxy.counts()
        start = {n: tl.created.get(n, posted.get(n, t0)) for n in names}
        to_job = [tl.job[n] - start[n] for n in names if n in tl.job]
        to_status = [tl.status[n] - start[n] for n in names if n in tl.status]
        burst_requests = diff(counts1, counts0)
        self.result["burst"] = {
            "n": s.n,
            "created_in_s": round(created_s, 2),
            "complete_in_s": round(complete_s, 2),
            "timed_out": timed_out,
            "create_to_job_s": summary(to_job, s.n),
            "create_to_status_s": summary(to_status, s.n) if self.op.writes_status else None,
            "requests": sum(burst_requests.values()),
            "requests_by_verb": by_verb(burst_requests),
            "rss_mib": self.op.rss(),
            "load": load(),
        }
        self.burst_end, self.burst_modified = time.monotonic(), tl.modified
        log(f"{self.name}: burst done in {complete_s:.1f} s; RSS {self.op.rss()}")

    def writes(self) -> int:
        """The operator's writes so far (every verb but get, list and watch), from its proxy."""
        return sum(n for key, n in self.proxy.counts().items() if key.split(" ", 1)[0] in WRITE_VERBS)

    def settle(self) -> None:
        """Wait until no FineTuneJob or Job has changed, and the operator has written nothing, for `quiet` seconds
        (status conditions still moving after the first status was written, Job status updates, Events still
        being posted at their rate): the steady window must see nothing changing."""
        t0 = time.monotonic()
        writes0 = self.writes()
        time.sleep(self.s.settle)
        tl = self.timeline
        last_write: list[float] = [self.writes(), time.monotonic()]

        def quiet() -> bool:
            now, writes = time.monotonic(), self.writes()
            if writes != last_write[0]:
                last_write[:] = [writes, now]
            return now - tl.last_change >= self.s.quiet and now - last_write[1] >= self.s.quiet

        try:
            wait_for(
                quiet,
                self.s.settle_timeout,
                f"{self.s.quiet:.0f} s without a FineTuneJob or Job change or a write by the operator",
                interval=1,
            )
            settled = True
        except TimeoutError as exc:
            log(f"{self.name}: {exc}; measuring anyway")
            settled = False
        self.result["settle"] = {
            "settled": settled,
            "seconds": round(time.monotonic() - t0, 1),
            # from the end of the burst to the last change of a FineTuneJob or Job before the window
            "last_change_after_burst_s": round(tl.last_change - self.burst_end, 1),
            "finetunejob_modifications_since_burst": tl.modified - self.burst_modified,
            # the burst's tail: status changes, Events posted at their rate
            "writes_after_burst": int(last_write[0]) - writes0,
            "last_write_after_burst_s": round(float(last_write[1]) - self.burst_end, 1),
        }
        log(f"{self.name}: settled={settled} after {self.result['settle']['seconds']} s")

    def steady(self) -> None:
        self.settle()
        counts0, modified0, t0 = self.proxy.counts(), self.timeline.modified, time.monotonic()
        external0 = self.op.external_requests()
        log(f"{self.name}: steady-state window of {self.s.steady:.0f} s")
        time.sleep(self.s.steady)
        counts1, elapsed = self.proxy.counts(), time.monotonic() - t0
        external = diff(self.op.external_requests(), external0)
        requests = diff(counts1, counts0)
        verbs = by_verb(requests)
        self.result["steady"] = {
            "seconds": round(elapsed, 1),
            "requests_per_min": round(sum(requests.values()) * 60 / elapsed, 1),
            "writes_per_min": round(sum(verbs.get(v, 0) for v in WRITE_VERBS) * 60 / elapsed, 1),
            "by_verb_per_min": per_minute(verbs, elapsed),
            "by_request_per_min": per_minute(requests, elapsed),
            "finetunejob_modifications": self.timeline.modified - modified0,
            "external_per_min": {t: per_minute(external, elapsed).get(t, 0.0) for t in ("s3", "sts", "pod")}
            if self.op.writes_status
            else {"s3": 0.0, "sts": 0.0, "pod": 0.0},
            "rss_mib": self.op.rss(),
            "alive": self.op.alive(),
            "load": load(),
        }
        log(f"{self.name}: steady {self.result['steady']['requests_per_min']} req/min; RSS {self.op.rss()}")

    def churn(self) -> None:
        """Create `churn_rate` FineTuneJobs a second and delete each one `churn_rate` creations later (about N + rate
        objects at any time), from a thread pool so that the rate does not depend on one request's latency."""
        s = self.s
        log(f"{self.name}: churn for {s.churn:.0f} s at {s.churn_rate:.0f} creates and deletes a second")
        lag = max(1, int(s.churn_rate))
        outcome: collections.Counter[str] = collections.Counter()

        def create(name: str) -> None:
            try:
                self.custom.create_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, s.kind.plural, s.kind.build(name, self.namespace, s.schedule)
                )
                outcome["created"] += 1
            except ApiException as exc:
                outcome[f"create {exc.status}"] += 1

        def delete(name: str) -> None:
            try:
                self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, s.kind.plural, name)
                outcome["deleted"] += 1
            except ApiException as exc:
                outcome[f"delete {exc.status}"] += 1

        rss_before = self.op.rss()
        submitted = 0
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max(4, lag)) as pool:
            while time.monotonic() - t0 < s.churn:
                time.sleep(max(0.0, t0 + submitted / s.churn_rate - time.monotonic()))
                pool.submit(create, f"churn-{submitted:06d}")
                if submitted >= lag:
                    pool.submit(delete, f"churn-{submitted - lag:06d}")
                submitted += 1
        elapsed = time.monotonic() - t0  # until the last request returned
        time.sleep(self.s.settle)
        self.result["churn"] = {
            "seconds": round(elapsed, 1),
            "outcome": dict(outcome),
            "creates_per_s": round(outcome["created"] / elapsed, 2),
            "deletes_per_s": round(outcome["deleted"] / elapsed, 2),
            "rss_before_mib": rss_before,
            "rss_after_mib": self.op.rss(),
            "alive": self.op.alive(),
            "load": load(),
        }
        log(f"{self.name}: churn done {dict(outcome)}; RSS {rss_before} -> {self.op.rss()}")

    def restart(self) -> None:
        names = [f"bench-{i:05d}" for i in range(self.s.n)]
        log(f"{self.name}: restart: SIGKILL, clear {len(names) if self.op.writes_status else 0} statuses, start")
        self.op.stop(kill=True)
        if self.op.writes_status:

            def clear(name: str) -> None:
                self.custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, self.namespace, self.s.kind.plural, name, {"status": None}
                )

            with concurrent.futures.ThreadPoolExecutor(self.s.creators) as pool:
                list(pool.map(clear, names))
            wait_for(lambda: not any(self.timeline.current.get(n) for n in names), 120, "statuses cleared")
        watching_s = self.start_operator()
        current_s: float | None = None
        if self.op.writes_status:

            def all_current() -> bool:
                return all(self.timeline.current.get(n) for n in names)

            try:
                current_s = wait_for(all_current, self.s.burst_timeout, "every status current", interval=0.5)
                current_s = time.monotonic() - self.op.started_at
            except TimeoutError as exc:
                log(f"{self.name}: {exc}")
        self.result["restart"] = {
            "watching_after_s": round(watching_s, 2),
            "statuses_current_after_s": None if current_s is None else round(current_s, 2),
            "rss_mib": self.op.rss(),
            "load": load(),
        }
        log(f"{self.name}: restart: watching after {watching_s:.1f} s, statuses current after {current_s}")

    def run(self, last: bool = False) -> Obj:
        self.result["load_before"] = load()
        self.create_namespace()
        try:
            self.custom.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, "basemodels", base_model(self.namespace)
            )
            self.start_watchers()
            self.proxy.start()
            log(f"{self.name}: starting the operator in {self.namespace}")
            self.result["watching_after_s"] = round(self.start_operator(), 2)
            if self.op.writes_status:
                wait_for(self._base_model_ready, 60, "BaseModel Ready")
            time.sleep(2)
            self.result["idle_rss_mib"] = self.op.rss()
            self.burst()
            self.steady()
            if self.s.churn > 0:
                self.churn()
            if self.s.restart:
                self.restart()
        except Exception as exc:
            self.result["error"] = f"{exc!r}"
            log(f"{self.name}: failed: {exc!r}\n{self.op.log_tail()}")
        finally:
            self.result["proxy_counts_total"] = self._safe_counts()
            self.cleanup(wait=not last)
        return self.result

    def _base_model_ready(self) -> bool:
        bm: Obj = self.custom.get_namespaced_custom_object(  # type: ignore[assignment]
            GROUP, VERSION, self.namespace, "basemodels", BASE_MODEL
        )
        return bool((bm.get("status") or {}).get("phase") == "Ready")

    def _safe_counts(self) -> dict[str, int]:
        try:
            return dict(sorted(self.proxy.counts().items()))
        except (OSError, ValueError):
            return {}


# -- the report -------------------------------------------------------------------------------------------


def _get(result: Obj, *path: str) -> Any:
    value: Any = result
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        text = f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}" if abs(value) < 1000 else f"{value:,.0f}"
    else:
        text = f"{value:,}"
    return f"{text}{unit}"


def _ratio(a: Any, b: Any) -> str:
    if not isinstance(a, int | float) or not isinstance(b, int | float):
        return "n/a"
    if b == 0:
        return "= (0)" if a == 0 else "inf (baseline 0)"
    return f"{a / b:.2f}x"


def markdown(report: Obj) -> str:
    results = {r["operator"]: r for r in report["results"]}
    base, lf = results.get("baseline", {}), results.get("lorafleet", {})
    rows: list[tuple[str, tuple[str, ...], str]] = [
        ("create -> Job p50", ("burst", "create_to_job_s", "p50"), " s"),
        ("create -> Job p99", ("burst", "create_to_job_s", "p99"), " s"),
        ("create -> Job max", ("burst", "create_to_job_s", "max"), " s"),
        ("create -> status written p50", ("burst", "create_to_status_s", "p50"), " s"),
        ("create -> status written p99", ("burst", "create_to_status_s", "p99"), " s"),
        ("burst: N created in", ("burst", "created_in_s"), " s"),
        ("burst: every Job (and status) after", ("burst", "complete_in_s"), " s"),
        ("burst: API requests", ("burst", "requests"), ""),
        ("steady: API requests/min", ("steady", "requests_per_min"), ""),
        ("steady: writes/min", ("steady", "writes_per_min"), ""),
        *[(f"steady: {v}/min", ("steady", "by_verb_per_min", v), "") for v in VERBS],
        *[(f"steady: {t} HTTP requests/min", ("steady", "external_per_min", t), "") for t in ("s3", "sts", "pod")],
        ("settle: last FineTuneJob/Job change after burst", ("settle", "last_change_after_burst_s"), " s"),
        ("settle: FineTuneJob changes after burst", ("settle", "finetunejob_modifications_since_burst"), ""),
        ("settle: operator writes after burst", ("settle", "writes_after_burst"), ""),
        ("settle: last operator write after burst", ("settle", "last_write_after_burst_s"), " s"),
        ("steady: FineTuneJob changes seen", ("steady", "finetunejob_modifications"), ""),
        ("RSS idle, before the burst", ("idle_rss_mib", "VmRSS"), " MiB"),
        ("RSS after the burst", ("burst", "rss_mib", "VmRSS"), " MiB"),
        ("RSS after steady state", ("steady", "rss_mib", "VmRSS"), " MiB"),
        ("churn: creates/s achieved", ("churn", "creates_per_s"), ""),
        ("RSS after churn", ("churn", "rss_after_mib", "VmRSS"), " MiB"),
        ("restart: watching again after", ("restart", "watching_after_s"), " s"),
        ("restart: every status current after", ("restart", "statuses_current_after_s"), " s"),
    ]
    n, steady = report["settings"]["n"], report["settings"]["steady"]
    lines = [
        f"Operator benchmark, {report['date']}, lorafleet at {report['lorafleet_commit']} (harness at "
        f"{report['commit']}), N={n}, steady window {steady:.0f} s",
        f"load average at start {report['load_start']}, at end {report['load_end']}; {report['machine']}",
        "",
        "| metric | baseline (minimal kopf) | lorafleet | lorafleet / baseline |",
        "|---|---:|---:|---:|",
    ]
    for label, path, unit in rows:
        b, lv = _get(base, *path), _get(lf, *path)
        if path[0] in ("churn", "restart") and b is None and lv is None:
            continue
        if path[:2] == ("steady", "by_verb_per_min"):
            b = b if b is not None or not base.get("steady") else 0.0
            lv = lv if lv is not None or not lf.get("steady") else 0.0
        ratio = "" if label.startswith(("burst: N created", "churn: creates")) else _ratio(lv, b)  # harness speed
        lines.append(f"| {label} | {_fmt(b, unit)} | {_fmt(lv, unit)} | {ratio} |")
    for name, res in results.items():
        per_request = _get(res, "steady", "by_request_per_min") or {}
        if per_request:
            lines += ["", f"Steady state, {name}: requests/min by verb and resource", ""]
            lines += ["| request | per min |", "|---|---:|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in per_request.items()]
        if res.get("error"):
            lines += ["", f"**{name} failed**: {res['error']}"]
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}"


@contextlib.contextmanager
def local_cluster() -> Iterator[LocalCluster]:
    cluster = LocalCluster()
    cluster.acquire()
    try:
        yield cluster
    finally:
        cluster.release()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="objects in the burst (default 1000)")
    parser.add_argument(
        "--kind", choices=sorted(KINDS), default="finetunejob", help="what the burst creates (default finetunejob)"
    )
    parser.add_argument("--steady", type=float, default=60.0, help="steady-state window, seconds (default 60)")
    parser.add_argument("--settle", type=float, default=10.0, help="pause after the burst and churn, seconds")
    parser.add_argument(
        "--quiet",
        type=float,
        default=40.0,
        help="before the steady window, wait until nothing changed for this long (default 40 s > lorafleet's resync)",
    )
    parser.add_argument("--settle-timeout", type=float, default=600.0, help="give up waiting for quiet after (s)")
    parser.add_argument("--churn", type=float, default=0.0, help="seconds of create/delete churn (default off)")
    parser.add_argument("--churn-rate", type=float, default=10.0, help="creates (and deletes) per second")
    parser.add_argument("--restart", action="store_true", help="kill and restart the operator, time recovery")
    parser.add_argument("--creators", type=int, default=4, help="threads creating the burst (default 4)")
    parser.add_argument("--schedule", action="store_true", help="let training pods run on the kwok nodes")
    parser.add_argument("--burst-timeout", type=float, default=0.0, help="seconds (default max(300, 1.5 N))")
    parser.add_argument("--operators", default=",".join(OPERATORS), help="which, in order (default baseline,lorafleet)")
    parser.add_argument(
        "--lorafleet-env", action="append", default=[], metavar="KEY=VALUE", help="extra LORAFLEET_* for lorafleet"
    )
    parser.add_argument(
        "--lorafleet-rev",
        metavar="REV",
        help="run lorafleet's operator as committed at REV (git archive of operator/), not the working tree's",
    )
    parser.add_argument("--keep", action="store_true", help="keep the namespaces and the work folder (debugging)")
    parser.add_argument("--out", type=Path, help="write the JSON here and the markdown next to it (.md)")
    return parser.parse_args(argv)


def _interrupted(signum: int, _: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Stop cleanly (operators, proxies, namespaces) on SIGTERM, and on SIGINT even when started in the
    # background by a shell, which starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    operators = [o.strip() for o in args.operators.split(",") if o.strip()]
    unknown = set(operators) - set(OPERATORS)
    if unknown:
        raise SystemExit(f"unknown operators {sorted(unknown)}: choose from {', '.join(OPERATORS)}")
    settings = Settings(
        n=args.n,
        steady=args.steady,
        settle=args.settle,
        quiet=args.quiet,
        settle_timeout=args.settle_timeout,
        churn=args.churn,
        churn_rate=args.churn_rate,
        restart=args.restart,
        creators=args.creators,
        schedule=args.schedule,
        burst_timeout=args.burst_timeout or max(300.0, 1.5 * args.n),
        keep=args.keep,
        lorafleet_env=dict(kv.split("=", 1) for kv in args.lorafleet_env),
        lorafleet_source=None,
        kind=KINDS[args.kind],
    )
    run_id = uuid.uuid4().hex[:5]
    workdir = Path(tempfile.mkdtemp(prefix=f"lfbench-{run_id}-"))
    failed = True  # until every run is done without an error: otherwise the logs in workdir are kept
    try:
        report = run_all(args, settings, operators, run_id, workdir, argv)
        failed = any(r.get("error") for r in report["results"])
    finally:
        if args.keep or failed:
            log(f"work folder kept ({'--keep' if args.keep else 'a run failed or was interrupted'}): {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            log(f"removed the work folder {workdir} (--keep keeps it)")
    return 1 if failed else 0


def run_all(
    args: argparse.Namespace, settings: Settings, operators: list[str], run_id: str, workdir: Path,
    argv: list[str] | None,
) -> Obj:  # fmt: skip
    """Every operator in turn on the shared local cluster; the report (also written to --out, with its .md)."""
    lorafleet_commit = git_revision()
    if args.lorafleet_rev:
        lorafleet_commit, settings.lorafleet_source = export_operator(args.lorafleet_rev, workdir / "src")
    report: Obj = {
        "benchmark": "operator",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", "benchmarks/operator/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "commit": git_revision(),
        "lorafleet_commit": lorafleet_commit,
        "machine": machine(),
        "settings": {
            **{k: v for k, v in vars(settings).items() if k not in ("lorafleet_env", "lorafleet_source", "kind")},
            "kind": settings.kind.kind,
        }
        | {"lorafleet_env": settings.lorafleet_env, "lorafleet_source": str(settings.lorafleet_source or "")},
        "load_start": load(),
        "workdir": str(workdir),
        "results": [],
    }
    log(f"logs and kubeconfigs in {workdir}; load {report['load_start']}")
    with local_cluster() as cluster:
        crds = settings.lorafleet_source.parent / "crds" if settings.lorafleet_source else CRDS
        install_crds(ClusterHandle(cluster.kubeconfig, api_client(cluster.kubeconfig), local=True), crds)
        for i, name in enumerate(operators):
            last = i == len(operators) - 1
            report["results"].append(Run(name, cluster, settings, workdir, run_id).run(last=last))
            if args.out:  # what is done so far survives an interrupted run
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(report, indent=2) + "\n")
    report["load_end"] = load()
    text = markdown(report)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)
        log(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    sys.exit(main())
