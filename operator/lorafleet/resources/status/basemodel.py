"""Status of a BaseModel: the checks the API server cannot make (operator configuration, referenced Secrets, the
stored manifest)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from lorafleet.api.basemodel import BaseModelStatus
from lorafleet.api.objects import BaseModelObject
from lorafleet.contracts.base import clip
from lorafleet.resources.conditions import ConditionType, Reason
from lorafleet.resources.status.common import ArtifactCheck, Cond, merge_conditions
from lorafleet.resources.store_refs import MintingStore


@dataclass(frozen=True)
class BaseModelObserved:
    """What the controller found for a BaseModel."""

    default_store_configured: bool  # the operator has a default artifact store
    missing_secret: str | None = None  # the first referenced Secret that does not exist
    source_check: ArtifactCheck | None = None  # the s3:// source's manifest, when it was read


def basemodel_secret_names(bm: BaseModelObject) -> list[str]:
    """Secrets a BaseModel references in its own namespace, for the controller to look up before calling
    basemodel_status. None for a ClusterArtifactStore with spec.sts (bound as MintingStore): its keys and CA bundle
    are read from the operator's namespace, and no copy of them is expected in the tenant's."""
    store = bm.spec.source.store
    if store is None or isinstance(store, MintingStore):
        return []
    names = [
        store.credentials_secret_ref.name if store.credentials_secret_ref else None,
        store.ca_bundle_secret_ref.name if store.ca_bundle_secret_ref else None,
    ]
    return [n for n in dict.fromkeys(names) if n]


def basemodel_status(bm: BaseModelObject, observed: BaseModelObserved, now: datetime) -> BaseModelStatus:
    """A missing Secret or manifest leaves the BaseModel Pending (fixing them needs no spec change); a missing
    store or a digest other than the pinned one is Failed: only a spec edit or the operator's configuration
    can fix it. An s3:// model is Ready only once its manifest was read and its digest recorded.
    """
    source = bm.spec.source
    uri = source.uri
    old = bm.status or BaseModelStatus()
    digest, size, revision = old.digest, old.size_bytes, old.resolved_revision
    check = observed.source_check
    phase: Literal["Pending", "Ready", "Failed"]
    if uri.startswith("s3://") and source.store is None and not observed.default_store_configured:
        phase, ready = (
            "Failed",
            Cond(
                "False",
                Reason.STORE_NOT_CONFIGURED,
                f"source {uri} is in an object store, but spec.source.store is not set and the operator has no "
                "default artifact store (Helm value artifactStore); set one of them",
            ),
        )
    elif observed.missing_secret:
        phase, ready = (
            "Pending",
            Cond(
                "False",
                Reason.SECRET_NOT_FOUND,
                f'Secret "{observed.missing_secret}" referenced by spec.source.store not found; the model is checked '
                "again once it exists",
            ),
        )
    elif check is not None and check.problem is not None:
        reason, message = check.problem
        phase = "Failed" if reason == Reason.DIGEST_MISMATCH else "Pending"
        ready = Cond("False", reason, clip(message))
    elif check is not None:
        phase, ready = "Ready", Cond("True", Reason.VERIFIED, f"manifest of {uri} read; digest {check.digest}")
        digest, size, revision = check.digest, check.size_bytes, check.revision
    else:
        phase, ready = "Ready", Cond("True", Reason.SOURCE_VALID, f"source {uri} is valid")
    return BaseModelStatus(
        phase=phase,
        resolved_revision=revision,
        digest=digest,
        size_bytes=size,
        observed_generation=bm.generation,
        conditions=merge_conditions(old.conditions, {ConditionType.READY: ready}, bm.generation, now),
    )
