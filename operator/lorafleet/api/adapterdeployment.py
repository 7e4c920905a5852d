"""AdapterDeployment: one base model served by vLLM with many LoRA adapters loaded at once."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StringConstraints, model_validator

from lorafleet.api.basemodel import ModelDtype
from lorafleet.api.common import (
    ADAPTER_NAME,
    DNS_1035,
    DNS_LABEL,
    S3_URI,
    SHA256_DIGEST,
    ApiModel,
    ConditionList,
    LocalObjectReference,
    ObjectStore,
    PodSettings,
    SecretKeySelector,
    StatusModel,
)
from lorafleet.api.evaluation import QualityBar
from lorafleet.api.stores import StoreRef, check_store_ref, store_ref_rule
from lorafleet.contracts.states import AdapterState  # the states the replicas report

# vLLM accepts only these ranks for --max-lora-rank (vllm/config/lora.py).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class ArtifactRef(ApiModel):
    """A stored adapter version, pinned by digest."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [store_ref_rule("artifact", "store")]})

    uri: str = Field(
        description="s3:// URI of the adapter version folder (the one holding manifest.json).",
        pattern=S3_URI,
        max_length=1024,
    )
    digest: str | None = Field(
        default=None,
        description="sha256 digest of the adapter's manifest; the adapter is refused on a mismatch.",
        pattern=SHA256_DIGEST,
    )
    store: ObjectStore | None = Field(
        default=None,
        description="Object store holding the adapter; left out, the operator's default, where the uri must lie under "
        "<the default uri>/<this namespace>/.",
    )
    store_ref: StoreRef | None = Field(
        default=None,
        description="A ClusterArtifactStore or ArtifactStore holding the adapter, instead of store: the uri must lie "
        "under the store's bucket and prefix (a ClusterArtifactStore's: under <prefix>/<this namespace>/).",
    )

    @model_validator(mode="after")
    def _store_ref(self) -> ArtifactRef:
        check_store_ref(self, "artifact", "store")
        return self


# A canary splits an adapter's requests over a few versions; every version takes a LoRA slot in each replica.
MAX_VERSIONS = 8
MAX_QUALITY_BARS = 8


class AdapterVersion(ApiModel):
    """One version of a served adapter and its share of the adapter's requests (a canary)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.fineTuneJobRef) != has(self.artifact)",
                    "message": "each version needs exactly one of fineTuneJobRef or artifact",
                }
            ]
        }
    )

    name: str = Field(
        description="Version name, e.g. v4: the version label of the metrics and the status (clients still send "
        "the adapter's name).",
        pattern=ADAPTER_NAME,
        max_length=63,
    )
    fine_tune_job_ref: LocalObjectReference | None = Field(
        default=None, description="A FineTuneJob whose adapter is served once it has succeeded."
    )
    artifact: ArtifactRef | None = Field(default=None, description="A stored adapter version.")
    weight: int = Field(
        description="Percent of the adapter's requests this version answers; the weights of an adapter's versions "
        "sum to 100. A version with weight 0 is loaded but gets no requests (ready to be promoted).",
        ge=0,
        le=100,
    )


def _sources(adapter: AdapterSpec) -> int:
    return sum(x is not None for x in (adapter.fine_tune_job_ref, adapter.artifact, adapter.versions))


class AdapterSpec(ApiModel):
    """One adapter to serve: from a FineTuneJob of this namespace, a stored artifact, or several versions that
    share its requests by weight (a canary)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "(has(self.fineTuneJobRef) ? 1 : 0) + (has(self.artifact) ? 1 : 0) "
                    "+ (has(self.versions) ? 1 : 0) == 1",
                    "message": "each adapter needs exactly one of fineTuneJobRef, artifact or versions",
                },
                {
                    "rule": "!has(self.versions) || self.versions.map(v, v.weight).sum() == 100",
                    "message": "the weights of an adapter's versions must sum to 100 (e.g. 90 and 10)",
                    "fieldPath": ".versions",
                },
            ]
        }
    )

    name: str = Field(
        description="Name clients send as the model in OpenAI requests.", pattern=ADAPTER_NAME, max_length=63
    )
    fine_tune_job_ref: LocalObjectReference | None = Field(
        default=None, description="A FineTuneJob whose adapter is served once it has succeeded."
    )
    artifact: ArtifactRef | None = Field(default=None, description="A stored adapter version.")
    versions: list[AdapterVersion] | None = Field(
        default=None,
        description="Instead of fineTuneJobRef or artifact: versions answering this name's requests by weight, "
        "e.g. v3 90 and v4 10. Each version is loaded in every replica; promotion is an edit of the weights.",
        min_length=1,
        max_length=MAX_VERSIONS,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    require_evaluation: list[QualityBar] = Field(
        default_factory=list,
        max_length=MAX_QUALITY_BARS,
        description="Quality bars each version must reach in the evaluation stored in its manifest (the "
        "FineTuneJob's spec.evaluation): a version without one stays Pending (NotEvaluated), one below a bar "
        "stays Pending (BelowQualityBar); neither is loaded. Empty: no gate.",
    )
    api_key_secret_ref: SecretKeySelector | None = Field(
        default=None,
        description="A Secret key holding this adapter's API keys, one per line: requests for it must send one as "
        "'Authorization: Bearer <key>' (else 401). Mounted into the replicas as a volume, so a changed key takes "
        "effect without a restart; adding or removing the reference rolls the replicas. Left out, anyone who "
        "may reach the Service may use the adapter.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> AdapterSpec:
        # The CEL rules' twins: the operator refuses what an older CRD let through.
        if _sources(self) != 1:
            raise ValueError(f"adapter {self.name!r} needs exactly one of fineTuneJobRef, artifact or versions")
        for version in self.versions or []:
            if (version.fine_tune_job_ref is None) == (version.artifact is None):
                raise ValueError(f"version {version.name!r} needs exactly one of fineTuneJobRef or artifact")
        if self.versions is not None:
            names = [v.name for v in self.versions]
            if len(set(names)) != len(names):
                raise ValueError(f"adapter {self.name!r} names a version twice: {names}")
            if sum(v.weight for v in self.versions) != 100:
                raise ValueError(f"the weights of adapter {self.name!r}'s versions must sum to 100")
        return self


class EngineSettings(ApiModel):
    """vLLM settings."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.maxCpuLoras) || !has(self.maxLoras) || self.maxCpuLoras >= self.maxLoras",
                    "message": "engine.maxCpuLoras must be >= engine.maxLoras",
                    "fieldPath": ".maxCpuLoras",
                }
            ]
        }
    )

    image: str | None = Field(default=None, description="vLLM image; left out, the operator's default.")
    max_loras: int | None = Field(
        default=None,
        description="Adapters in one batch (--max-loras); left out, sized from the adapters.",
        ge=1,
        le=256,
    )
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] | None = Field(
        default=None, description="Largest adapter rank (--max-lora-rank); left out, sized from the adapters."
    )
    max_cpu_loras: int | None = Field(
        default=None, description="Adapters cached in CPU memory (--max-cpu-loras).", ge=1, le=4096
    )
    dtype: ModelDtype | None = Field(default=None, description="Serving dtype; left out, the BaseModel's.")
    max_model_len: int | None = Field(
        default=None, description="Context length; left out, the BaseModel's.", ge=16, le=1048576
    )
    gpu_memory_utilization: float | None = Field(
        default=None, description="Fraction of GPU memory vLLM may use.", gt=0, le=1
    )
    extra_args: list[str] = Field(default_factory=list, description="Extra vLLM command-line arguments.", max_length=64)


class ServingResources(PodSettings):
    """Compute per replica."""

    gpus_per_replica: int = Field(
        default=1, description="GPUs per replica (also vLLM's tensor-parallel size); 0 serves on CPU.", ge=0, le=16
    )


class ServiceSettings(ApiModel):
    """The Service in front of the replicas (inference routes only)."""

    port: int = Field(default=8000, description="Service port of the OpenAI-compatible API.", ge=1, le=65535)
    max_request_bytes: int = Field(
        default=8 * 1024 * 1024,
        description="Largest request body a replica accepts, in bytes; a larger one gets 413.",
        ge=1024,
        le=64 * 1024 * 1024,
    )


class AccessSettings(ApiModel):
    """Who may reach the replicas over the network (enforced by a NetworkPolicy where the operator creates them)."""

    allowed_namespaces: list[Annotated[str, StringConstraints(pattern=DNS_LABEL, max_length=63)]] = Field(
        default_factory=list,
        description="Namespaces, besides this one, whose pods may call the Service (e.g. an ingress controller's).",
        max_length=64,
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )


class AdapterDeploymentSpec(ApiModel):
    """Desired state of an AdapterDeployment."""

    base_model_ref: LocalObjectReference = Field(description="The BaseModel to serve.")
    adapters: list[AdapterSpec] = Field(
        default_factory=list,
        description="Adapters to serve; added and removed without restarting the replicas.",
        max_length=512,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    replicas: int = Field(default=1, description="Number of vLLM replicas.", ge=0, le=1000)
    engine: EngineSettings = Field(default_factory=EngineSettings, description="vLLM settings.")
    resources: ServingResources = Field(default_factory=ServingResources, description="Compute per replica.")
    service: ServiceSettings = Field(default_factory=ServiceSettings, description="The Service.")
    access: AccessSettings = Field(default_factory=AccessSettings, description="Network access to the replicas.")


AdapterDeploymentPhase = Literal["Pending", "Progressing", "Ready", "Degraded", "Failed"]


class AdapterVersionStatus(StatusModel):
    """Where one version of a canary stands."""

    name: str = Field(description="Version name.")
    weight: int = Field(default=0, description="Percent of the adapter's requests it answers once loaded.")
    state: AdapterState = Field(description="Pending, Loading, Loaded or Failed.")
    reason: str | None = Field(default=None, description="CamelCase reason for the state.")
    message: str | None = Field(default=None, description="Human-readable detail.")
    uri: str | None = Field(default=None, description="Artifact URI being served.")
    digest: str | None = Field(default=None, description="Artifact digest being served.")
    loaded_replicas: int = Field(default=0, description="Replicas that have the version loaded.")


class AdapterStatus(StatusModel):
    """Where one adapter stands."""

    name: str = Field(description="Adapter name.")
    state: AdapterState = Field(description="Pending, Loading, Loaded or Failed.")
    reason: str | None = Field(default=None, description="CamelCase reason for the state.")
    message: str | None = Field(default=None, description="Human-readable detail.")
    uri: str | None = Field(default=None, description="Artifact URI being served.")
    digest: str | None = Field(default=None, description="Artifact digest being served.")
    loaded_replicas: int = Field(default=0, description="Replicas that have the adapter loaded.")
    versions: list[AdapterVersionStatus] = Field(
        default_factory=list, description="Each version of a canary (spec versions), with its weight."
    )


class AdapterDeploymentStatus(StatusModel):
    """Observed state of an AdapterDeployment."""

    phase: AdapterDeploymentPhase = Field(
        default="Pending", description="Pending, Progressing, Ready, Degraded or Failed."
    )
    replicas: int = Field(default=0, description="Replicas that exist.")
    ready_replicas: int = Field(default=0, description="Replicas that are ready.")
    endpoint: str | None = Field(default=None, description="In-cluster URL of the OpenAI-compatible API.")
    adapters_ready: str | None = Field(default=None, description="Loaded adapters over desired, e.g. 3/4.")
    adapters: list[AdapterStatus] = Field(default_factory=list, description="Per-adapter state.")
    observed_generation: int | None = Field(
        default=None, description="metadata.generation this status was computed from."
    )
    conditions: ConditionList


# Cross-field rules of the whole spec live on the nested models; none span them yet.
ADAPTER_DEPLOYMENT_VALIDATIONS: list[dict[str, str]] = []

# Rules on the whole object (metadata.name is the only metadata CEL can see).
ADAPTER_DEPLOYMENT_NAME_VALIDATIONS = [
    {
        "rule": f"self.metadata.name.matches('{DNS_1035}')",
        "message": "metadata.name must start with a letter and hold only lowercase letters, digits and '-' (the "
        "AdapterDeployment's Service, its endpoint's host, is named after it): e.g. 'chat-v1', not '1-chat' "
        "or 'chat.v1'",
    }
]
