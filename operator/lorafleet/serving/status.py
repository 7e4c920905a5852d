"""Aggregation of the pods' adapter states into the AdapterDeployment's per-adapter status. Pure; torch-free.

The operator fetches ``GET /lorafleet/state`` from each pod of the deployment (the contract
lorafleet.contracts.serving.ReplicaState) and calls ``aggregate`` with the answers; the result is what
``lorafleet.resources.status.adapterdeployment`` consumes as the adapters' evidence.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any, TypedDict

from lorafleet.contracts.base import clip
from lorafleet.contracts.serving import (
    FAILED,
    LOADED,
    LOADING,
    PENDING,
    AdapterReason,
    AdapterState,
    ReplicaAdapter,
    ReplicaState,
)


class AdapterSummary(TypedDict):
    """One adapter over all replicas."""

    loadedReplicas: int
    state: AdapterState
    reason: str
    message: str


_PodState = tuple[str, AdapterState, str | None, str | None]  # (pod, state, reason, message)


def _summarize(states: list[_PodState], total: int) -> AdapterSummary:
    loaded = sum(1 for _, state, _, _ in states if state == LOADED)
    failed = [s for s in states if s[1] == FAILED]
    busy = [s for s in states if s[1] == LOADING]
    waiting = [s for s in states if s[1] == PENDING]
    of = f"{loaded}/{total} replicas"
    state: AdapterState
    if failed:
        reason = Counter(s[2] or AdapterReason.LOAD_FAILED for s in failed).most_common(1)[0][0]
        culprit = next(s for s in failed if (s[2] or AdapterReason.LOAD_FAILED) == reason)
        where = "every replica" if len(failed) == total else f"{len(failed)}/{total} replicas"
        state, message = FAILED, f"failed on {where} ({of} loaded); {culprit[0]}: {culprit[3] or reason}"
    elif total and loaded == total:
        state, reason, message = LOADED, AdapterReason.LOADED, f"loaded on {of}"
    elif busy or waiting:
        first = (busy or waiting)[0]
        state = LOADING if busy or loaded else PENDING
        reason = first[2] or (AdapterReason.ADAPTER_LOADING if state == LOADING else AdapterReason.ADAPTER_PENDING)
        message = f"loaded on {of}; {first[3] or reason}"
    else:
        state, reason, message = PENDING, AdapterReason.NO_REPLICAS, "no replica has reported yet"
    return {"loadedReplicas": loaded, "state": state, "reason": reason, "message": clip(message)}


def _read(answer: Any, index: int) -> tuple[str, ReplicaState | None, str | None]:
    """(pod name, its state or None when it could not be asked, why not)."""
    body = answer if isinstance(answer, Mapping) else {}
    state = ReplicaState.model_validate(dict(body))
    who = state.pod or f"replica {index}"
    if "adapters" not in body:
        error = body.get("error")
        return who, None, error if isinstance(error, str) and error else None
    return who, state, None


def aggregate(
    pod_states: list[dict[str, Any]], expected_digests: Mapping[str, str | None] | None = None
) -> dict[str, AdapterSummary]:
    """Per adapter: {"loadedReplicas", "state", "reason", "message"} over the pods' /lorafleet/state answers.

    * ``loadedReplicas``: pods that report the adapter Loaded (with the expected digest, when one is given).
    * ``state``: Failed if any pod failed it; Loaded only if every pod has it loaded; Loading if some pod has
      it loaded or is loading it; else Pending. A pod that does not mention the adapter (it has not seen the new
      desired set yet), could not be asked, or whose vLLM is down counts as not loaded: status never runs ahead.
    * ``expected_digests`` (adapter name -> digest, None: any): a pod still serving another version of the
      adapter counts as Loading, not Loaded. Adapters named here but reported by no pod are Pending.

    A pod that could not be asked is passed as ``{"pod": name, "error": "..."}`` (or any dict without
    ``adapters``); an empty list means no pods.
    """
    pods = [_read(p, i) for i, p in enumerate(pod_states)]
    per_pod: list[dict[str, ReplicaAdapter]] = [
        {a.name: a for a in state.adapters or []} if state is not None else {} for _, state, _ in pods
    ]
    names: list[str] = []
    for entries in per_pod:
        names.extend(n for n in entries if n not in names)
    for name in expected_digests or {}:
        if name not in names:
            names.append(name)
    total = len(pods)

    result: dict[str, AdapterSummary] = {}
    for name in names:
        expected = (expected_digests or {}).get(name)
        states: list[_PodState] = []
        for (who, pod, error), entries in zip(pods, per_pod, strict=True):
            report = entries.get(name)
            if report is None:
                if pod is None:
                    detail = f": {error}" if error else ""
                    states.append(
                        (who, PENDING, AdapterReason.REPLICA_UNREACHABLE, f"{who} could not be asked{detail}")
                    )
                else:
                    states.append((who, PENDING, AdapterReason.NOT_SYNCED, f"{who} has not seen the adapter yet"))
                continue
            state, reason, message = report.state, report.reason, report.message
            engine_down = pod is not None and pod.engine is not None and pod.engine.healthy is False
            if state == LOADED and engine_down:
                state, reason, message = PENDING, AdapterReason.WAITING_FOR_ENGINE, f"{who}: vLLM is not healthy"
            if state == LOADED and expected and report.digest != expected:
                state, reason = LOADING, AdapterReason.OLD_VERSION
                message = f"{who} still serves {report.digest}, not {expected}"
            states.append((who, state, reason, message))

        result[name] = _summarize(states, total)
    return result
