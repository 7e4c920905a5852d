"""BaseModel: an open model whose weights sit in on-prem object storage or on a volume."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from lorafleet.api.common import (
    PVC_PATH_RULE,
    SHA256_DIGEST,
    ApiModel,
    ConditionList,
    ObjectStore,
    StatusModel,
    pvc_inside_claim,
)
from lorafleet.api.stores import StoreRef, check_store_ref

MODEL_URI = (
    r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?"
    r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^\s]*)?"
    r"|hf://[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+(@[A-Za-z0-9_./-]+)?)$"
)
# The pattern comes before the validator: after it, pydantic leaves the pattern out of the JSON schema.
ModelUri = Annotated[
    str,
    Field(pattern=MODEL_URI, max_length=1024),
    AfterValidator(pvc_inside_claim),
    Field(json_schema_extra={"x-kubernetes-validations": [PVC_PATH_RULE]}),
]

# transformers' model_type of the architecture; lorafleet.serving.families says which vLLM serves with LoRA.
ModelFamily = Literal[
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "gemma",
    "phi",
    "phi3",
    "gpt_neox",
    "falcon",
    "gptj",
    "gpt2",
    "mpt",
    "other",
]
ModelDtype = Literal["auto", "float32", "float16", "bfloat16"]


class ModelSource(ApiModel):
    """Where the weights are."""

    uri: ModelUri = Field(
        description=(
            "Location of the weights: s3://bucket/prefix (on-prem object store), pvc://claim/path "
            "(a PersistentVolumeClaim in this namespace) or hf://org/name@revision (public hub, only with "
            "allowPublicDownload: true)."
        )
    )
    store: ObjectStore | None = Field(
        default=None,
        description="Object store holding an s3:// source; left out, the operator's default store is used.",
    )
    store_ref: StoreRef | None = Field(
        default=None,
        description="A ClusterArtifactStore or ArtifactStore holding an s3:// source, instead of store: the uri must "
        "lie under the store's bucket and prefix (a ClusterArtifactStore's: under <prefix>/<this namespace>/).",
    )
    digest: str | None = Field(
        default=None,
        description="Expected sha256 digest of the model's manifest (sha256:<hex>); the weights are refused "
        "on a mismatch.",
        pattern=SHA256_DIGEST,
    )
    allow_public_download: bool = Field(
        default=False,
        description="Allow fetching from a public hub at run time. Off by default: data stays on premises.",
    )

    @model_validator(mode="after")
    def _store_ref(self) -> ModelSource:
        check_store_ref(self, "source", "store")
        return self


class ServingDefaults(ApiModel):
    """Defaults used by AdapterDeployments of this model unless they set their own."""

    max_model_len: int | None = Field(
        default=None, description="Context length vLLM serves; defaults to the model's.", ge=16, le=1048576
    )
    dtype: ModelDtype = Field(default="auto", description="Weight dtype for serving.")
    gpu_memory_utilization: float | None = Field(
        default=None, description="Fraction of GPU memory vLLM may use.", gt=0, le=1
    )


class BaseModelSpec(ApiModel):
    """Desired state of a BaseModel."""

    source: ModelSource = Field(description="Where the weights are.")
    family: ModelFamily = Field(default="other", description="Architecture family of the model.")
    parameter_count: int | None = Field(default=None, description="Number of parameters (for capacity planning).", ge=1)
    max_context_length: int | None = Field(
        default=None, description="Longest context the model supports, in tokens.", ge=16, le=10485760
    )
    dtype: ModelDtype = Field(default="auto", description="Dtype the weights are stored in.")
    serving: ServingDefaults = Field(
        default_factory=ServingDefaults, description="Defaults for AdapterDeployments of this model."
    )


BaseModelPhase = Literal["Pending", "Ready", "Failed"]


class BaseModelStatus(StatusModel):
    """Observed state of a BaseModel."""

    phase: BaseModelPhase = Field(default="Pending", description="Pending, Ready or Failed.")
    resolved_revision: str | None = Field(default=None, description="Revision the source resolved to.")
    digest: str | None = Field(default=None, description="Verified sha256 digest of the model's manifest.")
    size_bytes: int | None = Field(default=None, description="Total size of the weights in bytes.")
    observed_generation: int | None = Field(
        default=None, description="metadata.generation this status was computed from."
    )
    conditions: ConditionList


BASE_MODEL_VALIDATIONS = [
    {
        "rule": "!self.source.uri.startsWith('hf://') || self.source.allowPublicDownload",
        "message": "source.uri: hf:// sources download from a public hub; set source.allowPublicDownload: true "
        "to allow it, or mirror the model into on-prem storage (s3:// or pvc://)",
        "fieldPath": ".source.uri",
        "reason": "FieldValueForbidden",
    },
    {
        "rule": "!has(self.source.storeRef) || !has(self.source.store)",
        "message": "source.storeRef names the store: remove source.store",
        "fieldPath": ".source.storeRef",
    },
    {
        "rule": "!has(self.source.storeRef) || self.source.uri.startsWith('s3://')",
        "message": "source.storeRef applies to s3:// sources only; remove it or use an s3:// uri",
        "fieldPath": ".source.storeRef",
    },
    {
        "rule": "!has(self.source.store) || self.source.uri.startsWith('s3://')",
        "message": "source.store applies to s3:// sources only; remove it or use an s3:// uri",
        "fieldPath": ".source.store",
    },
]
