"""Reliability under disturbance, on the real API server: a burst of FineTuneJobs converges whatever happens in the
middle of it, and what the operator writes on the way never contradicts itself.

Invariants pinned here:

* An API server restarted (SIGKILL, down a few seconds, started again with the same flags on the same etcd) while
  the operator works through a burst: every FineTuneJob converges to a current status (observedGeneration ==
  generation, phase Running, Ready/Progressing/Degraded once each with the expected status and reason), each has
  exactly one training Job, no child of any kind is duplicated or orphaned, no Job is ever deleted and created
  again, and the operator process survives the outage. It runs on a private cluster (its own etcd, API server,
  controller-manager, scheduler and kwok): the session's shared cluster keeps serving the other tests.
* The leader killed (SIGKILL) in the middle of a burst, with two replicas and leader election on: the standby takes
  the Lease and finishes the burst, with the same guarantees; the Events name only the two replicas.
* Concurrent triggers (the create handlers, Job and trainer-pod events, a 3 s resync, an API server coming back
  and a new leader resuming every object) never move a condition's lastTransitionTime backwards, never move it
  without a status change between two consecutive writes, never take a phase or an observedGeneration back, and
  never post two Events for the same transition (same object, condition type and status, reason and message:
  see lorafleet.controllers.base.transition_event).

Each scenario runs once per module (a fixture) and records what it saw: every version of every FineTuneJob and
Job (list, then watch, as an informer does, so no write between two watch events is missed), then the final
objects, their children (listed by lorafleet's owner labels) and their Events; the tests judge that record. Each
check is a pure function, and each test also shows that its checks catch the faults they look for.

Jobs' pods stay Running (kwok, ``lorafleet.io/kwok-duration: 600s``) on CPU (``gpusPerNode: 0``): the burst
takes no GPU from the tests that follow. The scenario of a store endpoint that never answers is in
test_reconcile_slow_store.py.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import signal
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from lorafleet import GROUP, VERSION
from lorafleet.resources import finetunejob as ftj_builders
from lorafleet.resources.children import owner_selector
from lorafleet.resources.common import LABEL_PREFIX, MANAGED_BY, MANAGED_BY_LABEL
from lorafleet_dev.operator import OperatorProcess, install_crds
from lorafleet_dev.s3server import S3Server
from lorafleet_dev.testing import ClusterHandle, wait_until
from tests.integration.conftest import EXTERNAL, SESSION_PREFIX
from tests.integration.operator_fixtures import ADAPTER_ROOT, MODEL_URI, Custom, election_env, lease_holder
from tests.unit import objects

Obj = dict[str, Any]

N = 40  # FineTuneJobs per burst
DISTURB_AT = N // 8  # Jobs created when the disturbance comes: the operator is in full swing, far from done
RESYNC_SECONDS = 3
CONVERGE_TIMEOUT = 90.0
SETTLE = 2 * RESYNC_SECONDS + 1  # after convergence: resync passes and late child events keep triggering
FTJ_LABEL = f"{LABEL_PREFIX}/finetunejob"  # resources.common.labels: the owner's name, on each of its children
OUR_EVENTS = "lorafleet-operator"  # reportingComponent of the transition Events
EXPECTED = {
    "Ready": ("False", "JobRunning"),
    "Progressing": ("True", "JobRunning"),
    "Degraded": ("False", "AsExpected"),
}
PHASE_RANK = {"Pending": 0, "Running": 1, "Succeeded": 2, "Failed": 2}


# -- what is recorded ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One version of a FineTuneJob, as a watch (or a list after a broken watch: after_gap) delivered it."""

    name: str
    resource_version: int
    generation: int
    observed_generation: int | None
    phase: str | None
    conditions: Mapping[str, tuple[str, str, str]]  # type -> (status, reason, lastTransitionTime)
    after_gap: bool  # versions may have been missed right before this one (a relist)

    @classmethod
    def of(cls, obj: Obj, after_gap: bool) -> Seen:
        status = obj.get("status") or {}
        conditions = {
            c["type"]: (c.get("status", ""), c.get("reason", ""), c.get("lastTransitionTime", ""))
            for c in status.get("conditions") or []
        }
        meta = obj["metadata"]
        return cls(
            meta["name"],
            int(meta["resourceVersion"]),
            int(meta.get("generation") or 0),
            status.get("observedGeneration"),
            status.get("phase"),
            conditions,
            after_gap,
        )


class Recorder:
    """Every version of one namespace's FineTuneJobs and the uid each Job name ever had, by list-then-watch in two
    threads (a relist, marked as a gap, whenever a watch breaks: the API server went away, a 410)."""

    def __init__(self, kubeconfig: Path, namespace: str) -> None:
        self.api = config.new_client_from_config(config_file=str(kubeconfig))
        custom = client.CustomObjectsApi(self.api)
        batch = client.BatchV1Api(self.api)
        self.versions: dict[str, list[Seen]] = defaultdict(list)  # FineTuneJob uid -> versions, in order
        self.job_uids: dict[str, set[str]] = defaultdict(set)  # Job name -> every uid it had
        self.relists = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        ftjs = (custom.list_namespaced_custom_object, (GROUP, VERSION, namespace, "finetunejobs"))
        jobs = (batch.list_namespaced_job, (namespace,))
        self._threads = [
            threading.Thread(target=self._loop, args=(*ftjs, self._see_ftj), daemon=True),
            threading.Thread(target=self._loop, args=(*jobs, self._see_job), daemon=True),
        ]

    def __enter__(self) -> Recorder:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)
        self.api.close()

    def jobs(self) -> int:
        with self._lock:
            return len(self.job_uids)

    def history(self) -> dict[str, list[Seen]]:
        with self._lock:
            return {uid: list(seen) for uid, seen in self.versions.items()}

    def _see_ftj(self, obj: Obj, after_gap: bool) -> None:
        seen = Seen.of(obj, after_gap)
        with self._lock:
            versions = self.versions[obj["metadata"]["uid"]]
            if not versions or versions[-1].resource_version < seen.resource_version:
                versions.append(seen)

    def _see_job(self, obj: Obj, after_gap: bool) -> None:
        with self._lock:
            self.job_uids[obj["metadata"]["name"]].add(obj["metadata"]["uid"])

    def _loop(self, list_fn: Callable[..., Any], args: tuple[str, ...], see: Callable[[Obj, bool], None]) -> None:
        rv: str | None = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    listing = json.loads(list_fn(*args, _preload_content=False, _request_timeout=10).data)
                    for item in listing["items"]:
                        see(item, True)
                    rv = listing["metadata"]["resourceVersion"]
                    self.relists += 1
                response = list_fn(
                    *args,
                    watch=True,
                    resource_version=rv,
                    allow_watch_bookmarks=True,
                    timeout_seconds=2,
                    _preload_content=False,
                    _request_timeout=(3, 10),
                )
                try:
                    for line in iter_resp_lines(response):
                        event = json.loads(line)
                        if event["type"] == "ERROR":  # 410 Gone and the like: start over from a list
                            rv = None
                            break
                        rv = event["object"]["metadata"]["resourceVersion"]
                        if event["type"] in ("ADDED", "MODIFIED"):
                            see(event["object"], False)
                finally:
                    response.release_conn()
            except Exception:  # the API server is away (or restarting): list again once it answers
                rv = None
                self._stop.wait(0.2)


# -- the checks (pure) ----------------------------------------------------------------------------------------------


def history_problems(history: Mapping[str, Sequence[Seen]]) -> list[str]:
    """Condition, phase and observedGeneration regressions between consecutive versions of each object."""
    problems = []
    for versions in history.values():
        for before, after in itertools.pairwise(versions):
            at = f"{after.name} at resourceVersion {after.resource_version}"
            for type_, (status, _, ltt) in before.conditions.items():
                if type_ not in after.conditions:
                    problems.append(f"{at}: condition {type_} disappeared")
                    continue
                new_status, _, new_ltt = after.conditions[type_]
                if new_ltt < ltt:
                    problems.append(f"{at}: {type_} lastTransitionTime went back from {ltt} to {new_ltt}")
                elif new_ltt != ltt and new_status == status and not after.after_gap:
                    problems.append(f"{at}: {type_} lastTransitionTime moved {ltt} -> {new_ltt} with status {status}")
            if before.phase is not None and PHASE_RANK.get(after.phase or "", -1) < PHASE_RANK.get(before.phase, -1):
                problems.append(f"{at}: phase went back from {before.phase} to {after.phase}")
            if (after.observed_generation or 0) < (before.observed_generation or 0):
                problems.append(f"{at}: observedGeneration went back to {after.observed_generation}")
    return problems


def duplicate_events(events: Sequence[Obj]) -> list[str]:
    """Transition Events posted more than once: same object, reason, type and message (the message starts with the
    condition's type and status: "Ready=False: ...")."""
    counts = Counter(
        (e["involvedObject"].get("name"), e["involvedObject"].get("uid"), e.get("reason"), e.get("type"), e["message"])
        for e in events
        if e.get("reportingComponent") == OUR_EVENTS
    )
    return [f"{key[0]}: {key[2]} {key[3]} {key[4]!r} posted {n} times" for key, n in sorted(counts.items()) if n > 1]


# A FineTuneJob owns two ConfigMaps (its trainer config and the progress its trainer posts), one of other kinds.
MAX_PER_KIND = {"ConfigMap": 2}


def child_problems(ftjs: Sequence[Obj], children: Mapping[str, Sequence[Obj]]) -> list[str]:
    """Each FineTuneJob owns exactly one Job, at most MAX_PER_KIND (else one) child of every other kind, all
    FineTuneJobs the same kinds (they have the same spec), each child controlled by its labelled owner, and no child
    without a live owner."""
    problems = []
    owners = {f["metadata"]["name"]: f["metadata"]["uid"] for f in ftjs}
    kinds_of: dict[str, tuple[str, ...]] = {}
    for name, uid in owners.items():
        have = []
        for kind, items in sorted(children.items()):
            mine = [c for c in items if (c["metadata"].get("labels") or {}).get(FTJ_LABEL) == name]
            if len(mine) > MAX_PER_KIND.get(kind, 1):
                problems.append(f"{name}: {len(mine)} {kind}s: {sorted(c['metadata']['name'] for c in mine)}")
            if kind == "Job" and len(mine) != 1:
                problems.append(f"{name}: {len(mine)} Jobs, expected exactly one")
            for child in mine:
                refs = [r for r in child["metadata"].get("ownerReferences") or [] if r.get("controller")]
                if [r.get("uid") for r in refs] != [uid]:
                    problems.append(f"{name}: {kind} {child['metadata']['name']} is controlled by {refs}")
            if mine:
                have.append(kind)
        kinds_of[name] = tuple(have)
    if len(set(kinds_of.values())) > 1:
        problems.append(f"FineTuneJobs with the same spec own different kinds: {sorted(Counter(kinds_of.values()))}")
    for kind, items in children.items():
        for child in items:
            if (child["metadata"].get("labels") or {}).get(FTJ_LABEL) not in owners:
                problems.append(f"{kind} {child['metadata']['name']} has no FineTuneJob")
    return problems


def status_problems(ftj: Obj) -> list[str]:
    """A current, consistent status: observedGeneration == generation, Running with its Job, each condition once,
    with the expected status and reason, a lastTransitionTime and the current observedGeneration."""
    name, generation = ftj["metadata"]["name"], ftj["metadata"]["generation"]
    status = ftj.get("status") or {}
    problems = []
    if status.get("observedGeneration") != generation:
        problems.append(f"{name}: observedGeneration {status.get('observedGeneration')} != generation {generation}")
    if status.get("phase") != "Running":
        problems.append(f"{name}: phase {status.get('phase')}")
    if status.get("jobName") != ftj_builders.names(name).job:
        problems.append(f"{name}: jobName {status.get('jobName')}")
    conditions = status.get("conditions") or []
    if sorted(c.get("type") for c in conditions) != sorted(EXPECTED):
        problems.append(f"{name}: condition types {[c.get('type') for c in conditions]}")
    for c in conditions:
        if (c.get("status"), c.get("reason")) != EXPECTED.get(c.get("type", "")):
            problems.append(f"{name}: {c.get('type')}={c.get('status')} ({c.get('reason')}): {c.get('message')}")
        if c.get("observedGeneration") != generation or not c.get("lastTransitionTime"):
            problems.append(f"{name}: {c.get('type')} not current: {c}")
    return problems


# -- one scenario -----------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one disturbed burst left behind (everything the tests judge)."""

    scenario: str
    jobs_at_disturbance: int
    disturbance: str  # what happened, with timings
    converged_after: float | None  # seconds from the disturbance to convergence; None: not by the deadline
    not_converged: list[str]  # what was still wrong at the deadline
    ftjs: list[Obj]
    children: dict[str, list[Obj]]
    events: list[Obj]
    all_jobs: list[str]  # every Job in the namespace, labelled or not
    history: dict[str, list[Seen]]
    job_uids: dict[str, set[str]]
    relists: int
    alive: dict[str, bool]  # operator processes that must have survived
    logs: dict[str, str] = field(default_factory=dict)

    def report(self) -> str:
        tails = "\n".join(f"--- {name} ---\n" + "\n".join(log.splitlines()[-60:]) for name, log in self.logs.items())
        return f"{self.scenario}: {self.disturbance}\n{tails}"


def _base_model(namespace: str) -> Obj:
    bm = objects.base_model()
    bm["metadata"] = {"name": "tiny-llama", "namespace": namespace}
    bm["spec"] = {**bm["spec"], "source": {"uri": MODEL_URI}}
    return bm


def _fine_tune_job(namespace: str, name: str) -> Obj:
    ftj = objects.fine_tune_job(name=name)
    ftj["metadata"] = {"name": name, "namespace": namespace}
    ftj["spec"]["output"]["adapterName"] = name
    ftj["spec"]["resources"] = {
        "gpusPerNode": 0,
        "cpu": "50m",
        "memory": "64Mi",
        "nodeSelector": {"type": "kwok"},
        "podAnnotations": {"lorafleet.io/kwok-duration": "600s"},  # the pods stay Running
    }
    return ftj


def _json_items(list_fn: Callable[..., Any], namespace: str, **kwargs: Any) -> list[Obj]:
    return list(json.loads(list_fn(namespace, _preload_content=False, **kwargs).data)["items"])


def _child_listers(api: client.ApiClient) -> dict[str, Callable[..., Any]]:
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    listers = {
        "ConfigMap": core.list_namespaced_config_map,
        "ServiceAccount": core.list_namespaced_service_account,
        "Service": core.list_namespaced_service,
        "Role": rbac.list_namespaced_role,
        "RoleBinding": rbac.list_namespaced_role_binding,
        "Job": client.BatchV1Api(api).list_namespaced_job,
        "NetworkPolicy": client.NetworkingV1Api(api).list_namespaced_network_policy,
    }
    assert set(listers) == {kind for _, kind in ftj_builders.CHILD_KINDS}, "a FineTuneJob child kind is not checked"
    return listers


def _ftjs(api: client.ApiClient, namespace: str) -> list[Obj]:
    custom = client.CustomObjectsApi(api)
    return list(custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "finetunejobs")["items"])


def _all_problems(api: client.ApiClient, namespace: str) -> list[str]:
    ftjs = _ftjs(api, namespace)
    problems = [p for ftj in ftjs for p in status_problems(ftj)]
    return problems if len(ftjs) == N else [f"{len(ftjs)} FineTuneJobs", *problems]


def run_burst(
    scenario: str,
    handle: ClusterHandle,
    namespace: str,
    disturb: Callable[[], str],
    processes: Mapping[str, OperatorProcess],
) -> Outcome:
    """Create a BaseModel and N FineTuneJobs, disturb once DISTURB_AT Jobs exist, wait for convergence, let the
    resync and late events run a while longer, then take the record."""
    api = handle.api_client
    custom = Custom(handle, namespace)
    with Recorder(handle.kubeconfig, namespace) as recorder:
        custom.create(_base_model(namespace))
        for i in range(N):
            custom.create(_fine_tune_job(namespace, f"burst-{i:02d}"))
        wait_until(recorder.jobs, timeout=60, interval=0.02, what="the first Job")  # also waits for the recorder
        wait_until(lambda: recorder.jobs() >= DISTURB_AT, timeout=60, interval=0.02, what=f"{DISTURB_AT} Jobs")
        jobs_at_disturbance = recorder.jobs()
        disturbance = disturb()
        after = time.monotonic()
        converged_after: float | None = None
        problems: list[str] = []
        while time.monotonic() - after < CONVERGE_TIMEOUT:
            try:
                problems = _all_problems(api, namespace)
            except Exception as exc:  # urllib3 errors while the API server is away
                problems = [repr(exc)]
            if not problems:
                converged_after = time.monotonic() - after
                break
            time.sleep(1)
        took = "NOT" if converged_after is None else f"{converged_after:.1f} s after it"
        print(f"{scenario}: {disturbance}; {jobs_at_disturbance} Jobs at the disturbance; converged {took}")
        if converged_after is not None:
            time.sleep(SETTLE)  # not an assertion: more resync passes and child events to record
    listers = _child_listers(api)
    selector = f"{MANAGED_BY_LABEL}={MANAGED_BY},{FTJ_LABEL}"  # owner_selector(kind, name) without the name
    assert owner_selector("FineTuneJob", "x").startswith(selector)
    core = client.CoreV1Api(api)
    return Outcome(
        scenario=scenario,
        jobs_at_disturbance=jobs_at_disturbance,
        disturbance=disturbance,
        converged_after=converged_after,
        not_converged=problems[:20],
        ftjs=_ftjs(api, namespace),
        children={kind: _json_items(fn, namespace, label_selector=selector) for kind, fn in listers.items()},
        events=_json_items(core.list_namespaced_event, namespace),
        all_jobs=[j["metadata"]["name"] for j in _json_items(listers["Job"], namespace)],
        history=recorder.history(),
        job_uids=dict(recorder.job_uids),
        relists=recorder.relists,
        alive={name: p.alive() for name, p in processes.items()},
        logs={name: p.log_path.read_text(errors="replace") for name, p in processes.items() if p.log_path.exists()},
    )


def _operator_env(s3_server: S3Server, namespace: str) -> dict[str, str]:
    return {
        **s3_server.env(),
        "LORAFLEET_STORE_URI": ADAPTER_ROOT,
        "LORAFLEET_RESYNC_SECONDS": str(RESYNC_SECONDS),
        "LORAFLEET_NAMESPACES": json.dumps([namespace]),
    }


# -- the scenarios (once per module) ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def apiserver_restart(s3_server: S3Server, stored_model: str, tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    """A private cluster, one operator, a burst; its API server is killed and started again in the middle."""
    if EXTERNAL:
        pytest.skip("restarts an API server it started: needs the local cluster harness (lorafleet_dev.cluster)")
    from lorafleet_dev.cluster import LocalCluster

    workdir = tmp_path_factory.mktemp("apiserver-restart")
    local = LocalCluster(f"{SESSION_PREFIX}-restart", state_dir=workdir / "cluster")
    local.up(persistent=False)
    try:
        api = config.new_client_from_config(config_file=str(local.kubeconfig))
        handle = ClusterHandle(local.kubeconfig, api, local=True)
        install_crds(handle)
        namespace = "reliability"
        handle.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
        operator = OperatorProcess(local.kubeconfig, workdir / "operator.log", _operator_env(s3_server, namespace))
        operator.start()

        def restart() -> str:
            down = local.restart_apiserver(down_for=3)
            return f"kube-apiserver SIGKILLed, unreachable {down:.1f} s, ready again"

        try:
            return run_burst("API server restart", handle, namespace, restart, {"operator": operator})
        finally:
            operator.stop()
            api.close()
    finally:
        local.down()  # this private cluster only


class Replica:
    """One operator process with leader election on, named like a pod (as test_leader_election.Candidate)."""

    def __init__(self, cluster: ClusterHandle, namespace: str, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        env = {**env, **election_env(name, namespace)}
        self.process = OperatorProcess(cluster.kubeconfig, log_dir / f"{name}.log", env)

    def log(self) -> str:
        return self.process.log_path.read_text(errors="replace") if self.process.log_path.exists() else ""


@pytest.fixture(scope="module")
def leader_killed(
    cluster: ClusterHandle,
    crds: None,
    s3_server: S3Server,
    stored_model: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Outcome]:
    """Two replicas with leader election on, a burst; the leader is SIGKILLed in the middle of it. The namespace
    stays outside the session operator's glob (<prefix>-*): only these two replicas see it."""
    namespace = f"{SESSION_PREFIX}l-reliability-{uuid.uuid4().hex[:6]}"
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    logs = tmp_path_factory.mktemp("leader-killed")
    env = _operator_env(s3_server, namespace)
    a = Replica(cluster, namespace, "operator-a", env, logs)
    b = Replica(cluster, namespace, "operator-b", env, logs)
    try:
        a.process.start()
        wait_until(lambda: lease_holder(cluster, namespace) == a.name, timeout=30, what="operator-a leading")
        wait_until(lambda: "starting lorafleet operator" in a.log(), timeout=30, what="operator-a running kopf")
        b.process.start()
        wait_until(lambda: "standby until" in b.log(), timeout=30, what="operator-b standing by")

        def kill_the_leader() -> str:
            assert a.process.proc is not None and a.process.alive(), a.process.log_tail()
            a.process.proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            a.process.proc.wait()
            taken = lambda: lease_holder(cluster, namespace) == b.name  # noqa: E731
            wait_until(taken, timeout=30, interval=0.1, what="operator-b taking the Lease")
            return f"the leader SIGKILLed, operator-b took the Lease {time.monotonic() - killed:.1f} s later"

        outcome = run_burst("leader killed", cluster, namespace, kill_the_leader, {"operator-b": b.process})
        outcome.logs["operator-a"] = a.log()
        yield outcome
    finally:
        a.process.stop(kill=True)
        b.process.stop()
        try:
            cluster.core.delete_namespace(namespace, propagation_policy="Background")
        except ApiException as e:
            if e.status != 404:
                raise
        _release_pods(cluster, namespace)


def _release_pods(cluster: ClusterHandle, namespace: str) -> None:
    """Let the namespace go: kwok deletes a Running pod without clearing the Job controller's tracking finalizer,
    so its N pods (and the namespace) would otherwise stay Terminating and fill the fake nodes' pod capacity."""
    for pod in cluster.core.list_namespaced_pod(namespace).items:
        if pod.metadata.finalizers:
            try:
                cluster.core.patch_namespaced_pod(pod.metadata.name, namespace, {"metadata": {"finalizers": None}})
            except ApiException as e:
                if e.status != 404:
                    raise


# -- the tests --------------------------------------------------------------------------------------------------


def _assert_converged_without_duplicates(outcome: Outcome) -> None:
    report = outcome.report()
    assert 0 < outcome.jobs_at_disturbance < N, f"the disturbance did not come mid-burst\n{report}"
    assert outcome.converged_after is not None, f"not converged: {outcome.not_converged}\n{report}"
    # The checks catch what they look for, on this outcome's own objects: a second Job, a stale status.
    extra_job = copy.deepcopy(outcome.children["Job"][0])
    extra_job["metadata"]["name"] += "-2"
    jobs = [*outcome.children["Job"], extra_job]
    assert any("2 Jobs" in p for p in child_problems(outcome.ftjs, {**outcome.children, "Job": jobs}))
    stale = copy.deepcopy(outcome.ftjs[0])
    stale["status"]["observedGeneration"] = 0
    assert status_problems(stale)

    assert all(outcome.alive.values()), f"an operator died: {outcome.alive}\n{report}"
    assert len(outcome.ftjs) == N
    assert [p for ftj in outcome.ftjs for p in status_problems(ftj)] == []
    problems = child_problems(outcome.ftjs, outcome.children)
    assert problems == [], f"{len(problems)} problems with children: {problems[:10]}\n{report}"
    assert sorted(outcome.all_jobs) == sorted(ftj_builders.names(f"burst-{i:02d}").job for i in range(N))
    recreated = {name: uids for name, uids in outcome.job_uids.items() if len(uids) > 1}
    assert recreated == {}, f"Jobs deleted and created again: {recreated}\n{report}"


def test_an_apiserver_restart_in_the_middle_of_a_burst(apiserver_restart: Outcome) -> None:
    outcome = apiserver_restart
    _assert_converged_without_duplicates(outcome)
    assert outcome.relists > 2, "the recorder's watches never broke: was the API server restarted?"


def test_the_standby_finishes_a_burst_when_the_leader_is_killed(leader_killed: Outcome) -> None:
    outcome = leader_killed
    _assert_converged_without_duplicates(outcome)
    assert "starting lorafleet operator" in outcome.logs["operator-b"], outcome.report()
    ours = [e for e in outcome.events if e.get("reportingComponent") == OUR_EVENTS]
    instances = Counter(e.get("reportingInstance") for e in ours)
    strangers = [e for e in ours if e.get("reportingInstance") not in ("operator-a", "operator-b")]
    # Another operator writing here (one whose namespace scoping leaks) would make every other check meaningless.
    sample = [(e.get("reportingInstance"), e["involvedObject"]["name"], e.get("message")) for e in strangers[:5]]
    assert strangers == [], f"Events posted by other processes: {dict(instances)}, e.g. {sample}"
    assert instances["operator-b"] > 0, "the new leader posted no transition Event"


@pytest.mark.parametrize("scenario", ["apiserver_restart", "leader_killed"])
def test_concurrent_triggers_never_regress_a_condition_nor_repeat_an_event(
    scenario: str, request: pytest.FixtureRequest
) -> None:
    outcome: Outcome = request.getfixturevalue(scenario)
    assert outcome.converged_after is not None, f"not converged: {outcome.not_converged}\n{outcome.report()}"
    history = outcome.history
    ours = [e for e in outcome.events if e.get("reportingComponent") == OUR_EVENTS]

    # The checks catch what they look for, on this outcome's own record: a lastTransitionTime set back, a
    # condition's time moved without a flip, an Event posted twice.
    last = next(iter(history.values()))[-1]
    status, reason, _ = last.conditions["Ready"]
    for when, problem in (("2000-01-01T00:00:00Z", "went back"), ("2999-01-01T00:00:00Z", "moved")):
        later = dataclasses.replace(
            last, conditions={**last.conditions, "Ready": (status, reason, when)}, after_gap=False
        )
        assert any(problem in p for p in history_problems({"x": [last, later]})), when
    assert duplicate_events([*ours, {**ours[0], "metadata": {"name": "copy"}}])

    versions = sum(len(v) for v in history.values())
    recorded = f"{versions} versions of {len(history)} FineTuneJobs recorded ({outcome.relists} lists)"
    print(f"{scenario}: {recorded}, {len(ours)} transition Events")
    assert len(history) == N and versions >= 3 * N, "the recorder missed the burst"
    regressions = history_problems(history)
    assert regressions == [], f"{len(regressions)} regressions: {regressions[:10]}\n{outcome.report()}"
    duplicates = duplicate_events(ours)
    assert duplicates == [], f"{len(duplicates)} Events posted twice: {duplicates[:10]}\n{outcome.report()}"
    # Events are best effort (one whose poster died, or whose API server went away, after the status write is
    # lost, never posted twice): most objects still tell the whole story.
    running = {e["involvedObject"]["name"] for e in ours if e.get("reason") == "JobRunning"}
    assert len(running) >= N // 2, f"only {len(running)} FineTuneJobs have a JobRunning Event"
