"""AdapterDeployment controller: renders vLLM with its adapter set and reports what is really served."""

from __future__ import annotations

import functools
import json
import logging
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from lorafleet import GROUP, VERSION, k8s
from lorafleet.api.adapterdeployment import ArtifactRef
from lorafleet.config import OperatorSettings
from lorafleet.controllers import artifacts
from lorafleet.controllers.base import (
    MANAGED_CHILDREN,
    SETTINGS,
    Obj,
    apply_all,
    get_custom,
    now,
    reconcile_by_name,
    reconcile_owner,
    register_reconciler,
    with_render_error,
)
from lorafleet.resources import adapterdeployment as builders
from lorafleet.resources.status import adapterdeployment_status, resolve_adapters
from lorafleet.resources.stores import RenderError
from lorafleet.serving.desired import DesiredAdapter
from lorafleet.serving.status import aggregate

KIND = "AdapterDeployment"


def _fine_tune_job_names(body: Obj) -> list[str]:
    return [a["fineTuneJobRef"]["name"] for a in body["spec"].get("adapters") or [] if a.get("fineTuneJobRef")]


def adapter_ranks(body: Obj, fine_tune_jobs: dict[str, Obj | None]) -> dict[str, int | None]:
    """LoRA ranks per adapter: from its FineTuneJob's spec, or the lineage in a stored artifact's manifest."""
    ranks: dict[str, int | None] = {}
    namespace = body["metadata"]["namespace"]
    for adapter in body["spec"].get("adapters") or []:
        ref = adapter.get("fineTuneJobRef")
        if ref:
            job = fine_tune_jobs.get(ref["name"])
            # LoraSettings' default rank applies when the FineTuneJob left lora.r out.
            ranks[adapter["name"]] = job["spec"].get("lora", {}).get("r", 16) if job else None
        else:
            artifact = ArtifactRef.model_validate(adapter["artifact"])
            ranks[adapter["name"]] = _stored_rank(artifact, namespace)
    return ranks


class _Unverified(Exception):
    pass


def _stored_rank(artifact: ArtifactRef, namespace: str) -> int | None:
    # A pinned version never changes: its manifest is read once. An unpinned one is read every pass.
    try:
        if artifact.digest:
            return _pinned_rank(artifact.model_dump_json(), namespace)
        return _read_rank(artifact, namespace)
    except _Unverified:
        return None  # the sidecar reports what is wrong with it


def _read_rank(artifact: ArtifactRef, namespace: str) -> int | None:
    check = artifacts.check_version(artifact.store, namespace, artifact.uri, artifact.digest)
    if check.problem is not None:
        raise _Unverified(check.problem[1])
    return check.rank


@functools.lru_cache(maxsize=1024)
def _pinned_rank(artifact_json: str, namespace: str) -> int | None:
    # Raising keeps failures out of the cache: a missing or unreachable version may appear later.
    return _read_rank(ArtifactRef.model_validate_json(artifact_json), namespace)


def plan(
    body: Obj, base: Obj | None, jobs: dict[str, Obj | None], settings: OperatorSettings
) -> tuple[list[Obj], RenderError | None]:
    """Children to apply now (pure): nothing while the BaseModel is missing or not Ready; otherwise the
    whole set, with only the adapters that can be served now in the desired-adapter ConfigMap."""
    if not base or (base.get("status") or {}).get("phase") != "Ready":
        return [], None
    resolved, _ = resolve_adapters(body, jobs)
    adapters = [
        DesiredAdapter.model_validate({"name": a.name, "uri": a.uri, "digest": a.digest, "store": a.store})
        for a in resolved
    ]
    try:
        return builders.desired_children(body, base, adapters, adapter_ranks(body, jobs), settings), None
    except RenderError as exc:
        return [], exc


POD_STATE_TIMEOUT = 2.0
log = logging.getLogger("lorafleet.controller")


def _fetch_state(pod: Obj) -> Obj:
    name = pod["metadata"]["name"]
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return {"pod": name, "error": "no pod IP yet"}
    url = f"http://{ip}:{builders.GATEWAY_PORT}{builders.STATE_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=POD_STATE_TIMEOUT) as response:
            state = json.loads(response.read())
    except (OSError, ValueError) as exc:
        return {"pod": name, "error": f"GET {url}: {exc}"}
    return {**state, "pod": name} if isinstance(state, dict) else {"pod": name, "error": "not a JSON object"}


def running_pods(namespace: str, name: str) -> list[Obj]:
    return [
        p
        for p in k8s.list_("v1", "Pod", namespace, f"lorafleet.io/adapterdeployment={name}")
        if not p["metadata"].get("deletionTimestamp") and (p.get("status") or {}).get("phase") == "Running"
    ]


def pod_states(pods: list[Obj]) -> list[Obj]:
    """Each live replica's own account of its adapters (the sidecar's /lorafleet/state), asked in parallel."""
    if not pods:
        return []
    with ThreadPoolExecutor(max_workers=min(len(pods), 16)) as pool:
        return list(pool.map(_fetch_state, pods))


def nudge_pods(children: list[Obj], pods: list[Obj], ad_name: str) -> None:
    """Tell the kubelet to refresh the desired set in each replica now (builders.pod_nudges). Best effort: a
    failure (a pod deleted meanwhile) only leaves that replica to the kubelet's periodic sync."""
    digest = builders.desired_set_digest(children, ad_name)
    if digest is None:
        return
    for body in builders.pod_nudges(pods, digest):
        try:
            k8s.apply(body, field_manager=SETTINGS.field_manager)
        except ApiException as exc:
            log.info("could not annotate pod %s: %s", body["metadata"]["name"], exc.reason)


def reconcile(body: Obj) -> Obj:
    meta = body["metadata"]
    namespace = meta["namespace"]
    base = get_custom("BaseModel", body["spec"]["baseModelRef"]["name"], namespace)
    jobs = {name: get_custom("FineTuneJob", name, namespace) for name in _fine_tune_job_names(body)}
    children, error = plan(body, base, jobs, SETTINGS)
    apply_all(children)
    names = builders.names(meta["name"])
    deployment = k8s.get("apps/v1", "Deployment", names.deployment, namespace)
    service = k8s.get("v1", "Service", names.service, namespace)
    pods = running_pods(namespace, meta["name"])
    nudge_pods(children, pods, meta["name"])
    resolved, _ = resolve_adapters(body, jobs)
    reports = aggregate(pod_states(pods), {a.name: a.digest for a in resolved}) if resolved else None
    status = adapterdeployment_status(
        body,
        base_model=base,
        fine_tune_jobs=jobs,
        deployment=deployment,
        adapter_reports=reports,
        service_host=builders.service_host(body) if service else None,
        now=now(),
    )
    return with_render_error(status, error, meta.get("generation"), now())


@kopf.index(GROUP, VERSION, "adapterdeployments")
def adapterdeployments_by_base_model(body: kopf.Body, **_: Any) -> dict[Any, str]:
    return {(body.metadata.namespace, body.spec["baseModelRef"]["name"]): body.metadata.name}


@kopf.index(GROUP, VERSION, "adapterdeployments")
def adapterdeployments_by_fine_tune_job(body: kopf.Body, **_: Any) -> dict[Any, str]:
    meta = body.metadata
    return {(meta.namespace, job): str(meta.name) for job in _fine_tune_job_names(dict(body))}


register_reconciler("adapterdeployments", reconcile)


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED_CHILDREN, id="owner")
def deployment_changed(body: kopf.Body, **_: Any) -> None:
    reconcile_owner(reconcile, KIND, body)


@kopf.on.event(GROUP, VERSION, "finetunejobs", id="adapter-source")
def fine_tune_job_changed(body: kopf.Body, **kwargs: Any) -> None:
    """A FineTuneJob succeeding puts its adapter into the deployments that serve it, without a restart."""
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    index: kopf.Index[Any, str] = kwargs["adapterdeployments_by_fine_tune_job"]
    for name in list(index.get(key, ())):  # kopf mutates indexes concurrently
        reconcile_by_name(reconcile, KIND, name, key[0])
