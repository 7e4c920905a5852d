"""The trainer's configuration: rendered by the operator from a FineTuneJob, read by `lorafleet train`.

This module must stay free of torch so the operator can import it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lorafleet.api.common import ApiModel, ObjectStore
from lorafleet.api.finetunejob import Dataset, LoraSettings, TrainingSettings

CONFIG_FILE = "trainer.json"


class JobIdentity(ApiModel):
    """Which FineTuneJob this run belongs to (for lineage and logs)."""

    namespace: str = Field(description="Namespace of the FineTuneJob.")
    name: str = Field(description="Name of the FineTuneJob.")
    uid: str = Field(description="UID of the FineTuneJob.")


class BaseModelLocation(ApiModel):
    """The base model, resolved from its BaseModel resource."""

    name: str = Field(description="Name of the BaseModel resource.")
    uri: str = Field(description="s3://, pvc:// or hf:// location of the weights.")
    digest: str | None = Field(default=None, description="Expected sha256 digest of the model manifest.")
    store: ObjectStore | None = Field(default=None, description="Object store of an s3:// uri.")
    local_dir: str = Field(default="/work/base-model", description="Where the weights are in the pod.")
    allow_public_download: bool = Field(default=False, description="Whether a hub download is allowed.")


class OutputTarget(ApiModel):
    """Where the finished adapter and the checkpoints go, fully resolved."""

    adapter_name: str = Field(description="Adapter name.")
    version: str = Field(description="Adapter version.")
    uri: str = Field(description="s3://bucket/prefix of the artifact store.")
    store: ObjectStore | None = Field(default=None, description="Object store; None uses the environment.")
    checkpoint_uri: str = Field(description="s3:// prefix for this job's checkpoints.")


class DistributedSettings(ApiModel):
    """torchrun rendezvous, when the Job has several pods or GPUs."""

    nodes: int = Field(default=1, description="Pods in the Indexed Job.")
    processes_per_node: int = Field(default=1, description="Processes per pod (GPUs, or 1 on CPU).")
    backend: Literal["nccl", "gloo"] = Field(default="nccl", description="torch.distributed backend.")
    master_addr: str | None = Field(default=None, description="Rendezvous host (pod 0 via the headless Service).")
    master_port: int = Field(default=29500, description="Rendezvous port.")
    # Not dumped while it has its default, so rendered configs (and the golden files) stay as they were.
    strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="ddp replicates the model on every process; fsdp shards it (models that do not fit one GPU).",
        exclude_if=lambda value: value == "ddp",
    )


class TrainerConfig(ApiModel):
    """Everything one training run needs."""

    job: JobIdentity = Field(description="The FineTuneJob.")
    base_model: BaseModelLocation = Field(description="The base model.")
    dataset: Dataset = Field(description="Training data.")
    method: Literal["lora", "qlora"] = Field(description="lora or qlora.")
    lora: LoraSettings = Field(description="LoRA hyperparameters.")
    training: TrainingSettings = Field(description="Optimisation settings.")
    output: OutputTarget = Field(description="Where results go.")
    distributed: DistributedSettings = Field(default_factory=DistributedSettings, description="Multi-process settings.")
    image: str = Field(description="Trainer image (recorded in the lineage manifest).")
    work_dir: str = Field(default="/work", description="Writable scratch folder in the pod.")
    status_file: str = Field(
        default="/dev/termination-log", description="Final status (JSON) for the operator to read."
    )
