"""The store kinds: ClusterArtifactStore (cluster-scoped, defined by the platform team) and ArtifactStore
(namespaced, defined by a team with its own credentials). Tenants reference them by name (`storeRef`), the way
cert-manager separates ClusterIssuer and Issuer; the operator resolves a reference in the object's own namespace.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from lorafleet.api.common import (
    DNS_LABEL,
    ApiModel,
    ConditionList,
    S3CredentialsRef,
    SecretKeySelector,
    StatusModel,
)

BUCKET = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
# A key prefix: segments without '.', '..' or empty ones, so `<prefix>/<namespace>/` cannot be escaped.
KEY_PREFIX = r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$"


class StoreRef(ApiModel):
    """A store by name: a ClusterArtifactStore the platform team allows in this namespace, or an ArtifactStore
    of this namespace. `ClusterArtifactStore` `default` is the operator's configured store (Helm artifactStore)."""

    kind: Literal["ClusterArtifactStore", "ArtifactStore"] = Field(description="ClusterArtifactStore or ArtifactStore.")
    name: str = Field(description="Name of the store.", min_length=1, max_length=253, pattern=DNS_LABEL)


def store_ref_rule(field: str, *exclusive: str) -> dict[str, Any]:
    """CEL on the model holding `storeRef`: a referenced store says where and how, so the inline fields go."""
    others = " && ".join(f"!has(self.{name})" for name in exclusive)
    names = " and ".join(f"{field}.{name}" for name in exclusive)
    return {
        "rule": f"!has(self.storeRef) || ({others})",
        "message": f"{field}.storeRef names the store: remove {names}",
    }


def check_store_ref(model: object, field: str, *exclusive: str) -> None:
    """The same rule in the operator (pydantic), with the same message."""
    if getattr(model, "store_ref", None) is not None:
        present = [name for name in exclusive if getattr(model, _snake(name), None) is not None]
        if present:
            raise ValueError(
                f"{field}.storeRef names the store: remove {' and '.join(f'{field}.{n}' for n in present)}"
            )


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


class LabelSelectorRequirement(ApiModel):
    """One requirement of a label selector, as in metav1.LabelSelectorRequirement."""

    key: str = Field(description="Label key.", min_length=1, max_length=317)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(description="In, NotIn, Exists, DoesNotExist.")
    values: list[str] = Field(default_factory=list, description="Values for In and NotIn.")


class LabelSelector(ApiModel):
    """A label selector, as in metav1.LabelSelector; all requirements must hold."""

    match_labels: dict[str, str] = Field(default_factory=dict, description="Labels the namespace must carry.")
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list, description="Requirements on the namespace's labels."
    )


class AllowedNamespaces(ApiModel):
    """Which namespaces may use a ClusterArtifactStore: those named, and those matching the selector. Empty
    allows none."""

    names: list[str] = Field(default_factory=list, description="Namespaces allowed by name.")
    selector: LabelSelector | None = Field(default=None, description="Namespaces allowed by their labels.")


class StoreConnection(ApiModel):
    """How to reach the S3 API (shared by both store kinds)."""

    endpoint: str = Field(
        description="Endpoint URL of the S3 API, for example https://minio.storage.svc:9000. It must be one the "
        "platform allows (the default store's, or Helm artifactStore.allowedEndpoints).",
        pattern=r"^https?://[^\s/]+(:[0-9]+)?/?$",
        max_length=512,
    )
    region: str = Field(default="us-east-1", description="Region name sent to the store.", max_length=64)
    bucket: str = Field(description="Bucket holding the artifacts.", pattern=BUCKET)
    prefix: str | None = Field(
        default=None, description="Key prefix inside the bucket (no leading or trailing '/').", pattern=KEY_PREFIX
    )
    ca_bundle_secret_ref: SecretKeySelector | None = Field(
        default=None, description="Secret key holding a PEM CA bundle to verify the store's TLS certificate."
    )
    insecure_skip_tls_verify: bool = Field(default=False, description="Skip TLS verification. Only for tests.")
    server_side_encryption: Literal["AES256", "aws:kms"] | None = Field(
        default=None, description="Server-side encryption to request on upload."
    )
    checksum_headers: bool = Field(
        default=True, description="Send each upload's sha256 as x-amz-checksum-sha256 (false: stores without it)."
    )


class StoreSts(ApiModel):
    """Short-lived credentials for a ClusterArtifactStore's workloads: STS AssumeRole at the store's endpoint,
    signed with the store's keys, with a session policy limited to the namespace's location."""

    enabled: bool = Field(
        default=False,
        description="Mint each FineTuneJob's trainer credentials (read-write on its namespace's location only) "
        "instead of the workloads reading a copy of the store's keys. The store must implement AssumeRole with a "
        "session policy (MinIO, Ceph RGW, AWS).",
    )
    duration_seconds: int = Field(
        default=3600, ge=900, le=43200, description="Lifetime of minted credentials (900 to 43200 seconds)."
    )
    role_arn: str | None = Field(
        default=None,
        max_length=2048,
        description="RoleArn of AssumeRole (MinIO ignores it; AWS and Ceph RGW need the role to assume). Left out: "
        "the operator's artifactStore.sts.roleArn.",
    )


class ClusterArtifactStoreSpec(StoreConnection):
    """A store the platform team defines once for many namespaces. Each namespace's artifacts live apart, under
    s3://<bucket>/<prefix>/<namespace>/, and an object may only name URIs there."""

    credentials_secret_ref: S3CredentialsRef | None = Field(
        default=None,
        description="Secret with the store's keys, in the operator's namespace; only the declared keys are read. "
        "With sts.enabled the operator mints trainers' credentials with them (read from the operator's namespace); "
        "otherwise workloads use a Secret of the same name and keys in their own namespace (copied there by the "
        "platform team), as for the default store.",
    )
    sts: StoreSts = Field(default_factory=StoreSts, description="Short-lived credentials for workloads.")
    allowed_namespaces: AllowedNamespaces = Field(
        default_factory=AllowedNamespaces, description="Namespaces whose objects may use this store."
    )


class ArtifactStoreSpec(StoreConnection):
    """A team's own store, with its own credentials Secret in the same namespace."""

    credentials_secret_ref: S3CredentialsRef | None = Field(
        default=None, description="Secret of this namespace with the store's keys; left out, requests are unsigned."
    )


class StoreStatus(StatusModel):
    """Observed state of a store (reserved: lorafleet reports a store's problems on the objects that use it)."""

    conditions: ConditionList
