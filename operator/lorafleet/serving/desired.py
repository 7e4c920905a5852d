"""The desired adapter set: written by the operator into a ConfigMap, read by the sync sidecar.

Torch-free so the operator can import it.
"""

from __future__ import annotations

from pydantic import ConfigDict, Field

from lorafleet.api.common import ApiModel, ObjectStore

DESIRED_FILE = "adapters.json"


class DesiredAdapter(ApiModel):
    """One adapter the replicas must serve."""

    # A sidecar older than the operator ignores fields it does not know instead of refusing the whole set.
    model_config = ConfigDict(extra="ignore")

    name: str = Field(description="Served name of the adapter.")
    uri: str = Field(description="s3:// URI of the adapter version folder.")
    digest: str | None = Field(default=None, description="Expected sha256 digest of its manifest.")
    store: ObjectStore | None = Field(default=None, description="Object store; None uses the environment.")


class DesiredAdapterSet(ApiModel):
    """All adapters of one AdapterDeployment."""

    model_config = ConfigDict(extra="ignore")

    base_model: str = Field(description="Served name of the base model.")
    base_model_digest: str | None = Field(default=None, description="Digest of the base model's manifest.")
    max_lora_rank: int = Field(description="--max-lora-rank of the engine; larger adapters are refused.")
    adapters: list[DesiredAdapter] = Field(default_factory=list, description="Adapters to serve.")
    target_modules: list[str] | None = Field(
        default=None,
        description="Module names adapters may target (lorafleet.serving.checks.supported_target_modules of the "
        "BaseModel's family); None leaves the check to vLLM at load time.",
        exclude_if=lambda v: v is None,  # absent, not null, in the ConfigMap: unchanged for older sets
    )
