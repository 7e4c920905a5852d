"""Resolving which object store and location a workload uses: the resource's own, else the operator default."""

from __future__ import annotations

from lorafleet.api.common import ObjectStore, S3CredentialsRef
from lorafleet.config import OperatorSettings
from lorafleet.resources.conditions import Reason


class RenderError(Exception):
    """The desired objects cannot be rendered yet; becomes a condition, never a crash loop."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def default_store(settings: OperatorSettings) -> ObjectStore | None:
    if not settings.store_endpoint:
        return None
    creds = S3CredentialsRef(name=settings.store_credentials_secret) if settings.store_credentials_secret else None
    return ObjectStore(
        endpoint=settings.store_endpoint,
        region=settings.store_region,
        credentials_secret_ref=creds,
        insecure_skip_tls_verify=settings.store_insecure_skip_tls_verify,
        checksum_headers=settings.store_checksum_headers,
    )


def allowed_endpoints(settings: OperatorSettings) -> list[str]:
    endpoints = [*settings.store_allowed_endpoints, *([settings.store_endpoint] if settings.store_endpoint else [])]
    return list(dict.fromkeys(e.rstrip("/") for e in endpoints))


def credentials_refusal(store: ObjectStore, settings: OperatorSettings, field: str) -> str | None:
    """Why a spec's store may not use its Secret (None: it may). A Secret's value goes only to an endpoint the
    platform team allows: otherwise whoever may write a spec could send any Secret of the namespace anywhere."""
    if store.credentials_secret_ref is None:
        return None
    allowed = allowed_endpoints(settings)
    if store.endpoint.rstrip("/") in allowed:
        return None
    return (
        f"{field}.endpoint {store.endpoint} is not an endpoint where the platform allows a store's own credentials "
        f"(allowed: {', '.join(allowed) or 'none'}): use an allowed endpoint, leave {field} out to use the "
        "platform's store, or ask the platform team to add it (Helm value artifactStore.allowedEndpoints)"
    )


def resolve_store(own: ObjectStore | None, settings: OperatorSettings, field: str) -> ObjectStore:
    refusal = credentials_refusal(own, settings, field) if own is not None else None
    if refusal is not None:
        raise RenderError(Reason.STORE_NOT_ALLOWED, refusal)
    store = own or default_store(settings)
    if store is None:
        raise RenderError(
            Reason.STORE_NOT_CONFIGURED,
            f"{field} is not set and the operator has no default artifact store: set {field}, or the Helm "
            "value artifactStore.endpoint",
        )
    return store


def resolve_store_uri(own: str | None, settings: OperatorSettings, field: str, namespace: str) -> str:
    """`own`, else this namespace's root of the default location (`<artifactStore.uri>/<namespace>`): two teams'
    adapters of the same name never share a key."""
    uri = own or (f"{settings.store_uri.rstrip('/')}/{namespace}" if settings.store_uri else None)
    if not uri:
        raise RenderError(
            Reason.STORE_NOT_CONFIGURED,
            f"{field} is not set and the operator has no default artifact location: set {field}, or the Helm "
            "value artifactStore.uri",
        )
    return uri.rstrip("/")
