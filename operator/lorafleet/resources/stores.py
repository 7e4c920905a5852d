"""Resolving which object store and location a workload uses: the resource's own, else the operator default."""

from __future__ import annotations

from lorafleet.api.common import ObjectStore, S3CredentialsRef
from lorafleet.config import OperatorSettings


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


def resolve_store(own: ObjectStore | None, settings: OperatorSettings, field: str) -> ObjectStore:
    store = own or default_store(settings)
    if store is None:
        raise RenderError(
            "StoreNotConfigured",
            f"{field} is not set and the operator has no default artifact store: set {field}, or the Helm "
            "value artifactStore.endpoint",
        )
    return store


def resolve_store_uri(own: str | None, settings: OperatorSettings, field: str) -> str:
    uri = own or settings.store_uri
    if not uri:
        raise RenderError(
            "StoreNotConfigured",
            f"{field} is not set and the operator has no default artifact location: set {field}, or the Helm "
            "value artifactStore.uri",
        )
    return uri.rstrip("/")
