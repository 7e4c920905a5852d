"""Which adapter version a FineTuneJob may record and delete, and when its deletion waits or gives up (pure).

The trainer's report is untrusted input: `spec.image` lets a tenant run its own trainer, and any pod labelled
with the Job's name can post one. So the operator records an artifact only at the version folder the spec
determines (`expected`), and only when that manifest's lineage names this FineTuneJob's UID (the trainer writes
its config's `job.uid` into `hyperparameters.job.uid`). Deletion (deletionPolicy: Delete) applies the same two
checks to what it removes, waits while an AdapterDeployment still references the adapter, and gives up after a
bounded time, or at once when it can never succeed (the store's Secret is gone, as in a namespace deletion), so
a FineTuneJob never holds its namespace in Terminating.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from lorafleet.resources.conditions import Reason

Problem = tuple[str, str]  # (reason, message), for a condition or an Event

ARTIFACT_REJECTED = Reason.ARTIFACT_REJECTED
ADAPTER_IN_USE = Reason.ADAPTER_IN_USE
DELETION_BLOCKED = "DeletionBlocked"  # condition type on a FineTuneJob whose deletion waits


def same_uri(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def lineage_uid(hyperparameters: Mapping[str, Any]) -> str | None:
    """The FineTuneJob UID a manifest's lineage names (`hyperparameters.job.uid`), or None."""
    job = hyperparameters.get("job")
    uid = job.get("uid") if isinstance(job, Mapping) else None
    return uid if isinstance(uid, str) and uid else None


def uri_problem(claimed: str, expected: str) -> Problem | None:
    """Why a reported artifact URI is refused: it is not the version folder this FineTuneJob's spec names."""
    if same_uri(claimed, expected):
        return None
    return (
        ARTIFACT_REJECTED,
        f"the trainer reported the adapter at {claimed}, but this FineTuneJob writes only to {expected} "
        "(spec.output): not recorded",
    )


def lineage_problem(uri: str, uid: str, manifest_uid: str | None) -> Problem | None:
    """Why a stored version is not this FineTuneJob's: its manifest's lineage names another (or no) UID."""
    if manifest_uid is not None and manifest_uid == uid:
        return None
    named = f"FineTuneJob UID {manifest_uid}" if manifest_uid else "no FineTuneJob UID"
    return (
        ARTIFACT_REJECTED,
        f"the manifest at {uri} names {named} in its lineage (hyperparameters.job.uid), not this FineTuneJob's "
        f"({uid}): another job wrote that version; set a new spec.output.version",
    )


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def adapter_sources(adapter: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A spec.adapters entry (as JSON) and the versions of its canary: each may name a fineTuneJobRef or artifact."""
    versions = adapter.get("versions")
    if not isinstance(versions, list):
        return [adapter]
    return [adapter, *(v for v in versions if isinstance(v, Mapping))]


def referencing_deployments(
    namespace: str, name: str, uris: Iterable[str], deployments: Iterable[Mapping[str, Any]]
) -> list[str]:
    """AdapterDeployments (not being deleted) that serve this FineTuneJob's adapter: by `fineTuneJobRef` (same
    namespace) or by `artifact.uri` (any namespace given). Sorted; `name`, or `namespace/name` for another
    namespace's."""
    wanted = [u.rstrip("/") for u in uris]
    found: set[str] = set()
    for obj in deployments:
        meta = _meta(obj)
        if meta.get("deletionTimestamp"):
            continue  # going away with its references
        ns = str(meta.get("namespace") or "")
        entries = [a for a in (obj.get("spec") or {}).get("adapters") or [] if isinstance(a, Mapping)]
        for adapter in (source for entry in entries for source in adapter_sources(entry)):
            ref = adapter.get("fineTuneJobRef")
            by_ref = ns == namespace and isinstance(ref, Mapping) and ref.get("name") == name
            artifact = adapter.get("artifact")
            uri = artifact.get("uri") if isinstance(artifact, Mapping) else None
            by_uri = isinstance(uri, str) and uri.rstrip("/") in wanted
            if by_ref or by_uri:
                found.add(str(meta.get("name")) if ns == namespace else f"{ns}/{meta.get('name')}")
    return sorted(found)


def in_use_problem(uri: str, users: list[str], deadline: datetime) -> Problem:
    names = ", ".join(users)
    return (
        ADAPTER_IN_USE,
        f"deletion of {uri} waits: AdapterDeployment{'s' * (len(users) != 1)} {names} reference it; remove the "
        f"references (or delete them); the operator gives up at {deadline.strftime('%Y-%m-%dT%H:%M:%SZ')} and "
        "leaves the adapter in the store",
    )


def store_problem(uri: str, error: str, deadline: datetime) -> Problem:
    return (
        Reason.STORE_UNAVAILABLE,
        f"could not delete {uri}: {error}; retrying until {deadline.strftime('%Y-%m-%dT%H:%M:%SZ')}, then the "
        "operator gives up and leaves the adapter in the store",
    )


def deletion_deadline(deletion_timestamp: str | None, now: datetime, timeout_seconds: float) -> datetime:
    """When the finalizer gives up: `timeout_seconds` after the deletion was asked for (now, if unknown)."""
    started = now
    if deletion_timestamp:
        with contextlib.suppress(ValueError):
            started = datetime.fromisoformat(deletion_timestamp)
    if started.tzinfo is None:
        started = started.replace(tzinfo=now.tzinfo)
    return started + timedelta(seconds=timeout_seconds)


def gives_up(now: datetime, deadline: datetime) -> bool:
    return now >= deadline
