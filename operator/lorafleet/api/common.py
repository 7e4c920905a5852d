"""Types shared by the three lorafleet kinds.

Every field carries a description: the CRDs are generated from these models and `kubectl explain` shows them.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr
from pydantic.alias_generators import to_camel

from lorafleet.uris import pvc_subpath

# Kubernetes object names (RFC 1123 DNS labels) and the adapter/version names we put into paths and vLLM.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# A Service's name (DNS-1035 label, less its 63-character limit: lorafleet shortens longer names with a hash).
DNS_1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
ADAPTER_NAME = r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$"
VERSION_NAME = r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$"
SHA256_DIGEST = r"^sha256:[a-f0-9]{64}$"
S3_URI = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?$"
PVC_URI = r"^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^\s]*)?$"
DATA_URI = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?)(/[^\s]*)?$"

# A pvc:// URI whose path could leave its claim or mean two things (lorafleet.uris.pvc_subpath is the same rule):
# a '.', '..' or empty segment, a backslash, a percent-encoded '.', '/' or '\', a control character. RE2 and
# Python's re read it alike, and CEL's matches() searches, like re.search.
PVC_UNSAFE = r"^pvc://[^/]*(/.*)?(//|/\.\.?(/|$))|\\|%(2[eEfF]|5[cC])|[\x00-\x1f\x7f]"
PVC_PATH_RULE = {
    "rule": f"!self.startsWith('pvc://') || !self.matches(r'{PVC_UNSAFE}')",
    "message": "a pvc:// path must stay inside its claim: no '.', '..' or empty segments, backslashes, control "
    "characters or %2e/%2f/%5c; write the plain path, e.g. pvc://claim/data/train.jsonl",
}


def pvc_inside_claim(uri: str) -> str:
    """A pydantic validator: a pvc:// URI must stay inside its claim (other schemes pass)."""
    if uri.startswith("pvc://"):
        pvc_subpath(uri[len("pvc://") :].partition("/")[2], uri)
    return uri


# A URI that may be pvc://, checked by the API server (pattern and CEL) and again by the operator when it parses.
# The pattern comes before the validator: after it, pydantic leaves the pattern out of the JSON schema.
DataUri = Annotated[
    str,
    Field(pattern=DATA_URI, max_length=1024),
    AfterValidator(pvc_inside_claim),
    Field(json_schema_extra={"x-kubernetes-validations": [PVC_PATH_RULE]}),
]

DatasetFormat = Literal["chat", "instruction", "completion", "text"]
DatasetFileFormat = Literal["auto", "jsonl", "json", "csv", "parquet", "datasets"]

# Kubernetes' quantity grammar (k8s.io/apimachinery resource.Quantity), without a sign: requests are never negative.
QUANTITY = (
    r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY = re.compile(QUANTITY)


def kubernetes_quantity(value: int | str) -> int | str:
    """A pydantic validator: what the apiserver's quantity parser accepts (non-negative), else a clear error."""
    if (isinstance(value, int) and value >= 0) or (isinstance(value, str) and _QUANTITY.match(value)):
        return value
    raise ValueError(f"{value!r} is not a Kubernetes quantity: write for example 4, 500m, 1.5 or 64Gi")


# The schema says the same to the API server: int-or-string, strings matching the grammar, integers >= 0.
Quantity = Annotated[
    StrictInt | Annotated[StrictStr, Field(max_length=64)],  # strict: YAML true is no quantity
    AfterValidator(kubernetes_quantity),
    Field(
        description="A Kubernetes quantity, for example 4, 500m or 16Gi.",
        json_schema_extra={"pattern": QUANTITY, "maxLength": 64, "minimum": 0},
    ),
]


class ApiModel(BaseModel):
    """Base of every API type: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class StatusModel(BaseModel):
    """Base of status types: camelCase on the wire; tolerant of fields added by newer operators."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class LocalObjectReference(ApiModel):
    """A reference to an object of a known kind in the same namespace."""

    name: str = Field(
        description="Name of the referenced object in the same namespace.",
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
    )


class SecretKeySelector(ApiModel):
    """A key of a Secret in the same namespace."""

    name: str = Field(description="Name of the Secret.", min_length=1, max_length=253, pattern=DNS_LABEL)
    key: str = Field(description="Key within the Secret.", min_length=1, max_length=253)


class S3CredentialsRef(ApiModel):
    """A Secret holding S3 credentials. Credentials are only ever referenced, never written into a spec."""

    name: str = Field(
        description="Name of the Secret in the same namespace.", min_length=1, max_length=253, pattern=DNS_LABEL
    )
    access_key_id_key: str = Field(
        default="AWS_ACCESS_KEY_ID", description="Key of the Secret that holds the access key id."
    )
    secret_access_key_key: str = Field(
        default="AWS_SECRET_ACCESS_KEY", description="Key of the Secret that holds the secret access key."
    )


class ObjectStore(ApiModel):
    """How to reach an S3-compatible object store (MinIO, Ceph RGW, AWS S3).

    Left out, the operator's default artifact store (Helm value `artifactStore`) is used.
    """

    endpoint: str = Field(
        description="Endpoint URL of the S3 API, for example https://minio.storage.svc:9000.",
        pattern=r"^https?://[^\s/]+(:[0-9]+)?/?$",
        max_length=512,
    )
    region: str = Field(default="us-east-1", description="Region name sent to the store.", max_length=64)
    credentials_secret_ref: S3CredentialsRef | None = Field(
        default=None, description="Secret with the access key id and secret access key."
    )
    ca_bundle_secret_ref: SecretKeySelector | None = Field(
        default=None, description="Secret key holding a PEM CA bundle to verify the store's TLS certificate."
    )
    insecure_skip_tls_verify: bool = Field(
        default=False, description="Skip TLS verification. Only for tests; never the default."
    )
    server_side_encryption: Literal["AES256", "aws:kms"] | None = Field(
        default=None, description="Server-side encryption to request on upload."
    )
    checksum_headers: bool = Field(
        default=True,
        description="Send each uploaded body's sha256 as x-amz-checksum-sha256, checked by the store (AWS, MinIO, "
        "Ceph RGW since Reef). Set false for stores that reject S3 checksum headers.",
    )


class Toleration(ApiModel):
    """A pod toleration, as in core/v1."""

    key: str | None = Field(default=None, description="Taint key the toleration applies to.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal.")
    value: str | None = Field(default=None, description="Taint value to match when operator is Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(default=None, description="How long a NoExecute taint is tolerated.", ge=0)


class PodSettings(ApiModel):
    """Placement and size of a workload's pods, shared by training and serving."""

    cpu: Quantity | None = Field(default=None, description="CPU request and limit per pod, e.g. 8 or 500m.")
    memory: Quantity | None = Field(default=None, description="Memory request and limit per pod, e.g. 64Gi.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pods must match.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations of the pods.")
    pod_labels: dict[str, str] = Field(
        default_factory=dict, description="Extra labels on the pods (cost centre, mesh settings)."
    )
    pod_annotations: dict[str, str] = Field(
        default_factory=dict, description="Extra annotations on the pods (for example sidecar.istio.io/inject)."
    )


class Condition(StatusModel):
    """A condition following the Kubernetes API conventions."""

    type: str = Field(description="Condition type: Ready, Progressing or Degraded (and kind-specific ones).")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason for the last transition.")
    message: str = Field(default="", description="Human-readable detail.")
    last_transition_time: datetime | None = Field(default=None, description="When the status last changed.")
    observed_generation: int | None = Field(
        default=None, description="metadata.generation the condition was computed from."
    )


ConditionList = Annotated[
    list[Condition],
    Field(
        default_factory=list,
        description="Conditions following the Kubernetes API conventions.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    ),
]
