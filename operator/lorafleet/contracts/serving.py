"""The serving contracts: the desired adapter set (operator -> adapter-sync sidecar) and each replica's account of
its adapters (sidecar -> operator), plus the sidecar's routes and port.

* `DesiredAdapterSet`: the ConfigMap key `DESIRED_FILE`, mounted into every replica.
* `ReplicaState`: what the sidecar serves at `STATE_PATH`; the operator aggregates it into the
  AdapterDeployment's per-adapter status.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, StrictBool, StrictInt, field_validator

from lorafleet.contracts.base import Contract, Lenient
from lorafleet.contracts.states import ADAPTER_STATES as ADAPTER_STATES
from lorafleet.contracts.states import FAILED as FAILED
from lorafleet.contracts.states import LOADED as LOADED
from lorafleet.contracts.states import LOADING as LOADING
from lorafleet.contracts.states import PENDING as PENDING
from lorafleet.contracts.states import AdapterState as AdapterState
from lorafleet.contracts.stores import ObjectStore

DESIRED_FILE = "adapters.json"
DESIRED_VERSION = 1
STATE_VERSION = 1

GATEWAY_PORT = 8000  # the sidecar's serving port, behind the Service: inference routes, /health, readiness
STATE_PORT = 8002  # the sidecar's status port, for the operator only: adapter state (not behind the Service)
HEALTH_PATH = "/health"  # the sidecar's liveness: asks vLLM
READY_PATH = "/lorafleet/ready"  # the sidecar's readiness: vLLM healthy and every desired adapter loaded
STATE_PATH = "/lorafleet/state"  # the sidecar's per-adapter account, read by the operator on STATE_PORT
# vLLM's --model in serving pods (the base model's files). vLLM's LoRA resolver plugins load an adapter only when its
# adapter_config.json's base_model_name_or_path equals it: the trainer writes this value there (the base model's URI
# and digest, the lineage, are in the manifest).
ENGINE_MODEL_DIR = "/models/base"


class AdapterReason:
    """Reasons of an adapter's state, CamelCase as in Kubernetes conditions: the sidecar's (ReplicaAdapter.reason)
    and those the operator adds when it aggregates the replicas (lorafleet.serving.status)."""

    RANK_EXCEEDS_MAX = "RankExceedsMax"
    BASE_MODEL_MISMATCH = "BaseModelMismatch"
    UNSAFE_FORMAT = "UnsafeFormat"
    CHECKSUM_MISMATCH = "ChecksumMismatch"
    NOT_FOUND = "NotFound"
    UNSUPPORTED_TARGET_MODULES = "UnsupportedTargetModules"
    UNSUPPORTED_ADAPTER = "UnsupportedAdapter"  # DoRA, LoRA bias, not a LoRA at all, unreadable config
    LOAD_FAILED = "LoadFailed"  # vLLM refused it for another reason
    STORE_UNAVAILABLE = "StoreUnavailable"  # transient: retried
    DOWNLOAD_FAILED = "DownloadFailed"  # transient: retried
    # Not failures
    DOWNLOADING = "Downloading"
    LOADING = "Loading"
    LOADED = "Loaded"
    WAITING_FOR_ENGINE = "WaitingForEngine"
    RETRYING = "Retrying"
    # Added by the operator's aggregation over the replicas
    ADAPTER_LOADING = "AdapterLoading"
    ADAPTER_PENDING = "AdapterPending"
    NO_REPLICAS = "NoReplicas"
    REPLICA_UNREACHABLE = "ReplicaUnreachable"
    NOT_SYNCED = "NotSynced"
    OLD_VERSION = "OldVersion"


# A version of a canary is a desired adapter of its own, named `<served name>:<version>` (neither public names nor
# version names may hold ':'); clients send the served name and the gateway picks a version by weight.
VERSION_SEP = ":"


def version_key(served_name: str, version: str) -> str:
    return f"{served_name}{VERSION_SEP}{version}"


# -- desired set -----------------------------------------------------------------------------------------------


class DesiredAdapter(Contract):
    """One adapter the replicas must serve: a served name, or one version of a canary."""

    name: str = Field(description="Served name of the adapter; for a version of a canary, version_key's name.")
    uri: str = Field(description="s3:// URI of the adapter version folder.")
    digest: str | None = Field(default=None, description="Expected sha256 digest of its manifest.")
    store: ObjectStore | None = Field(default=None, description="Object store; None uses the environment.")
    # A canary's versions only (absent otherwise, so a set without canaries renders as before):
    served_name: str | None = Field(
        default=None, description="The name clients send, answered by this version.", exclude_if=lambda v: v is None
    )
    version: str | None = Field(
        default=None, description="Version label of the metrics.", exclude_if=lambda v: v is None
    )
    weight: int | None = Field(
        default=None,
        ge=0,
        le=100,
        description="Percent of served_name's requests this version answers.",
        exclude_if=lambda v: v is None,
    )

    @property
    def public_name(self) -> str:
        return self.served_name or self.name


class DesiredAdapterSet(Contract):
    """All adapters of one AdapterDeployment."""

    version: int = Field(
        default=DESIRED_VERSION,
        description="Contract version of the set.",
    )
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

    def render(self) -> dict[str, Any]:
        """The JSON object the operator writes into the ConfigMap."""
        return self.model_dump(mode="json", by_alias=True)


# -- a replica's state -----------------------------------------------------------------------------------------

Text = Annotated[str | None, Lenient]


class ReplicaAdapter(Contract):
    """One adapter as one replica sees it."""

    name: str = Field(min_length=1)
    state: AdapterState = PENDING
    reason: Text = None
    message: Text = None
    uri: Text = None
    digest: Text = Field(default=None, description="The digest being served (or prepared); the pin before that.")
    desired_digest: Text = None
    path: Text = None
    since: Text = None
    loaded_at: Text = None
    download_seconds: Annotated[float | None, Lenient] = None
    load_seconds: Annotated[float | None, Lenient] = None

    @field_validator("state", mode="before")
    @classmethod
    def _known_state(cls, value: Any) -> Any:
        # A state this operator does not know (from a newer sidecar) reads as Pending: status never runs ahead.
        return value if value in ADAPTER_STATES else PENDING


class EngineState(Contract):
    """vLLM, as the sidecar sees it."""

    url: Text = None
    healthy: Annotated[StrictBool | None, Lenient] = None
    base_model: Text = None
    restarts: Annotated[StrictInt | None, Lenient] = None
    lost_adapters: Annotated[StrictInt | None, Lenient] = None
    message: Text = None


class DesiredFileState(Contract):
    """The desired set as the sidecar last read it."""

    file: Text = None
    sha256: Text = None
    read_at: Text = None
    error: Text = None
    adapters: Annotated[StrictInt | None, Lenient] = None


def _entries(value: Any) -> Any:
    # Entries that are not adapters (no name, not an object) are dropped; the others are kept.
    if not isinstance(value, list):
        return value
    return [
        e
        for e in value
        if isinstance(e, ReplicaAdapter) or (isinstance(e, dict) and isinstance(e.get("name"), str) and e["name"])
    ]


class ReplicaState(Contract):
    """GET STATE_PATH on one replica's sidecar."""

    version: Annotated[int | None, Lenient] = STATE_VERSION
    pod: Text = None
    base_model: Text = None
    engine: Annotated[EngineState | None, Lenient] = None
    desired: Annotated[DesiredFileState | None, Lenient] = None
    ready: Annotated[StrictBool | None, Lenient] = None
    passes: Annotated[StrictInt | None, Lenient] = None
    last_pass: Text = None
    adapters: Annotated[list[ReplicaAdapter] | None, Lenient] = None

    @field_validator("adapters", mode="before")
    @classmethod
    def _drop_invalid_entries(cls, value: Any) -> Any:
        return _entries(value)

    def state_json(self) -> dict[str, Any]:
        """The JSON the sidecar serves: every key, null where unknown (the adapters without theirs)."""
        body = self.model_dump(mode="json", by_alias=True, exclude={"adapters"})
        body["adapters"] = [a.wire() for a in self.adapters or []]
        return body
