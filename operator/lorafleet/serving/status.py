"""Aggregation of the pods' adapter states into the AdapterDeployment's per-adapter status. Pure; torch-free.

The operator fetches ``GET /lorafleet/state`` from each pod of the deployment and calls ``aggregate`` with the
answers; the result is what ``lorafleet.resources.status.adapterdeployment_status(adapter_reports=...)`` consumes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

STATES = ("Pending", "Loading", "Loaded", "Failed")
_MAX_MESSAGE = 1024


def _clip(message: str) -> str:
    return message if len(message) <= _MAX_MESSAGE else message[: _MAX_MESSAGE - 3] + "..."


def _pod_name(pod: Mapping[str, Any], index: int) -> str:
    name = pod.get("pod")
    return name if isinstance(name, str) and name else f"replica {index}"


def _entries(pod: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    adapters = pod.get("adapters")
    if not isinstance(adapters, list):
        return {}
    return {
        a["name"]: a for a in adapters if isinstance(a, Mapping) and isinstance(a.get("name"), str) and a["name"]
    }


def _engine_down(pod: Mapping[str, Any]) -> bool:
    engine = pod.get("engine")
    return isinstance(engine, Mapping) and engine.get("healthy") is False


_PodState = tuple[str, str, str | None, str | None]  # (pod, state, reason, message)


def _summarize(states: list[_PodState], total: int) -> dict[str, Any]:
    loaded = sum(1 for _, state, _, _ in states if state == "Loaded")
    failed = [s for s in states if s[1] == "Failed"]
    busy = [s for s in states if s[1] == "Loading"]
    waiting = [s for s in states if s[1] == "Pending"]
    of = f"{loaded}/{total} replicas"
    state: str
    if failed:
        reason = Counter(s[2] or "LoadFailed" for s in failed).most_common(1)[0][0]
        culprit = next(s for s in failed if (s[2] or "LoadFailed") == reason)
        where = "every replica" if len(failed) == total else f"{len(failed)}/{total} replicas"
        state, message = "Failed", f"failed on {where} ({of} loaded); {culprit[0]}: {culprit[3] or reason}"
    elif total and loaded == total:
        state, reason, message = "Loaded", "Loaded", f"loaded on {of}"
    elif busy or waiting:
        first = (busy or waiting)[0]
        state = "Loading" if busy or loaded else "Pending"
        reason = first[2] or ("AdapterLoading" if state == "Loading" else "AdapterPending")
        message = f"loaded on {of}; {first[3] or reason}"
    else:
        state, reason, message = "Pending", "NoReplicas", "no replica has reported yet"
    return {"loadedReplicas": loaded, "state": state, "reason": reason, "message": _clip(message)}


def aggregate(
    pod_states: list[dict[str, Any]], expected_digests: Mapping[str, str | None] | None = None
) -> dict[str, dict[str, Any]]:
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
    pods = [p if isinstance(p, Mapping) else {} for p in pod_states]
    per_pod = [_entries(p) for p in pods]
    names: list[str] = []
    for entries in per_pod:
        names.extend(n for n in entries if n not in names)
    for name in expected_digests or {}:
        if name not in names:
            names.append(name)
    total = len(pods)

    result: dict[str, dict[str, Any]] = {}
    for name in names:
        expected = (expected_digests or {}).get(name)
        states: list[_PodState] = []
        for i, (pod, entries) in enumerate(zip(pods, per_pod, strict=True)):
            who = _pod_name(pod, i)
            report = entries.get(name)
            if report is None:
                if "adapters" not in pod:
                    error = pod.get("error")
                    detail = f": {error}" if isinstance(error, str) and error else ""
                    states.append((who, "Pending", "ReplicaUnreachable", f"{who} could not be asked{detail}"))
                else:
                    states.append((who, "Pending", "NotSynced", f"{who} has not seen the adapter yet"))
                continue
            state = report.get("state") if report.get("state") in STATES else "Pending"
            reason = report.get("reason") if isinstance(report.get("reason"), str) else None
            message = report.get("message") if isinstance(report.get("message"), str) else None
            if state == "Loaded" and _engine_down(pod):
                state, reason, message = "Pending", "WaitingForEngine", f"{who}: vLLM is not healthy"
            if state == "Loaded" and expected and report.get("digest") != expected:
                state, reason = "Loading", "OldVersion"
                message = f"{who} still serves {report.get('digest')}, not {expected}"
            states.append((who, str(state), reason, message))

        result[name] = _summarize(states, total)
    return result
