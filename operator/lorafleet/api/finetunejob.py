"""FineTuneJob: a LoRA or QLoRA fine-tune of a BaseModel on a private dataset."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import ConfigDict, Field

from lorafleet.api.common import (
    ADAPTER_NAME,
    DATA_URI,
    S3_URI,
    VERSION_NAME,
    ApiModel,
    ConditionList,
    LocalObjectReference,
    ObjectStore,
    PodSettings,
    StatusModel,
)

DatasetFormat = Literal["chat", "instruction", "completion", "text"]


class FieldMapping(ApiModel):
    """Names of the JSON fields in each dataset line, where they differ from the format's defaults."""

    messages: str = Field(default="messages", description="chat: field holding the list of messages.")
    role: str = Field(default="role", description="chat: field of a message holding its role.")
    content: str = Field(default="content", description="chat: field of a message holding its text.")
    instruction: str = Field(default="instruction", description="instruction: field with the instruction.")
    input: str = Field(default="input", description="instruction: field with the optional input.")
    output: str = Field(default="output", description="instruction: field with the expected output.")
    prompt: str = Field(default="prompt", description="completion: field with the prompt.")
    completion: str = Field(default="completion", description="completion: field with the completion.")
    text: str = Field(default="text", description="text: field with the raw text.")


class Dataset(ApiModel):
    """Training data: JSON Lines, one sample per line."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!(has(self.evalUri) && has(self.evalSplit))",
                    "message": "set either dataset.evalUri or dataset.evalSplit, not both",
                }
            ]
        }
    )

    uri: str = Field(
        description="JSONL file: s3://bucket/key.jsonl in the artifact store, or pvc://claim/path.jsonl.",
        pattern=DATA_URI,
        max_length=1024,
    )
    format: DatasetFormat = Field(description="Sample format: chat, instruction, completion or text.")
    fields: FieldMapping = Field(
        default_factory=FieldMapping, description="JSON field names, where they differ from the defaults."
    )
    eval_uri: str | None = Field(
        default=None, description="Separate JSONL file for evaluation.", pattern=DATA_URI, max_length=1024
    )
    eval_split: float | None = Field(
        default=None, description="Fraction of the dataset held out for evaluation.", gt=0, le=0.5
    )
    overlong: Literal["truncate", "drop"] = Field(
        default="truncate", description="What to do with samples longer than training.maxSequenceLength."
    )


class LoraSettings(ApiModel):
    """LoRA hyperparameters."""

    r: int = Field(default=16, description="Rank of the LoRA matrices.", ge=1, le=512)
    alpha: int = Field(default=32, description="LoRA scaling numerator (scale = alpha / r).", ge=1, le=4096)
    dropout: float = Field(default=0.05, description="Dropout on the LoRA input.", ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        description="Module names to adapt, or [all-linear] for every linear layer but the output head.",
        min_length=1,
        max_length=64,
    )


class TrainingSettings(ApiModel):
    """Optimisation settings."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!(has(self.epochs) && has(self.maxSteps))",
                    "message": "set either training.epochs or training.maxSteps, not both",
                }
            ]
        }
    )

    epochs: float | None = Field(
        default=None, description="Passes over the dataset (default 1 when maxSteps is unset).", gt=0, le=1000
    )
    max_steps: int | None = Field(default=None, description="Optimizer steps to run.", ge=1, le=10_000_000)
    learning_rate: float = Field(default=2e-4, description="Peak learning rate.", gt=0, le=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(default="cosine", description="Decay after warmup.")
    warmup_ratio: float = Field(default=0.03, description="Fraction of steps used for warmup.", ge=0, le=0.5)
    batch_size: int = Field(default=4, description="Samples per device per step.", ge=1, le=4096)
    gradient_accumulation_steps: int = Field(
        default=1, description="Micro-batches accumulated per optimizer step.", ge=1, le=1024
    )
    max_sequence_length: int = Field(default=2048, description="Longest sample in tokens.", ge=16, le=1048576)
    packing: bool = Field(default=False, description="Pack several samples into each sequence.")
    completion_only_loss: bool = Field(
        default=True, description="Train only on the answer: prompts and non-assistant turns are masked."
    )
    gradient_checkpointing: bool = Field(default=False, description="Trade compute for activation memory.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto", description="Compute precision; auto picks bf16 on GPUs that support it, else fp32."
    )
    seed: int = Field(default=42, description="Random seed, for reproducibility.", ge=0, le=2**31 - 1)
    checkpoint_interval: int = Field(
        default=100, description="Optimizer steps between checkpoints saved to the artifact store.", ge=1
    )
    logging_steps: int = Field(default=10, description="Optimizer steps between progress reports.", ge=1)


class TrainingResources(PodSettings):
    """Compute for the training Job."""

    nodes: int = Field(default=1, description="Number of training pods (one per node).", ge=1, le=128)
    gpus_per_node: int = Field(default=1, description="GPUs per pod; 0 trains on CPU (tiny models only).", ge=0, le=16)
    priority_class_name: str | None = Field(default=None, description="PriorityClass of the training pods.")
    strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="ddp replicates the model on every GPU; fsdp shards it, for models that do not fit one GPU.",
    )


class AdapterOutput(ApiModel):
    """Where the adapter goes: <uri>/adapters/<adapterName>/<version>/ in the artifact store."""

    adapter_name: str = Field(
        description="Name of the adapter (also its served name).", pattern=ADAPTER_NAME, max_length=63
    )
    version: str = Field(
        default="v1",
        description="Version of the adapter; an existing version is never overwritten.",
        pattern=VERSION_NAME,
        max_length=63,
    )
    uri: str | None = Field(
        default=None,
        description="s3://bucket/prefix of the artifact store; left out, the operator's default.",
        pattern=S3_URI,
        max_length=1024,
    )
    store: ObjectStore | None = Field(
        default=None, description="Object store to write to; left out, the operator's default store."
    )
    deletion_policy: Literal["Retain", "Delete"] = Field(
        default="Retain", description="Retain keeps the adapter when the FineTuneJob is deleted; Delete removes it."
    )


class FineTuneJobSpec(ApiModel):
    """Desired state of a FineTuneJob. Immutable once created."""

    base_model_ref: LocalObjectReference = Field(description="The BaseModel to fine-tune.")
    dataset: Dataset = Field(description="Training data.")
    method: Literal["lora", "qlora"] = Field(
        default="lora", description="lora, or qlora (4-bit NF4 base weights; GPU only)."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA hyperparameters.")
    training: TrainingSettings = Field(default_factory=TrainingSettings, description="Optimisation settings.")
    resources: TrainingResources = Field(default_factory=TrainingResources, description="Compute for training.")
    output: AdapterOutput = Field(description="Where the trained adapter is stored.")
    image: str | None = Field(default=None, description="Trainer image; left out, the operator's default.")
    backoff_limit: int = Field(default=3, description="Retries of the training Job.", ge=0, le=100)
    active_deadline_seconds: int | None = Field(
        default=None, description="Time limit of the training Job in seconds.", ge=1
    )


FineTuneJobPhase = Literal["Pending", "Running", "Succeeded", "Failed"]


class TrainingProgress(StatusModel):
    """Progress reported by the trainer."""

    step: int = Field(default=0, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, description="Optimizer steps planned.")
    epoch: float | None = Field(default=None, description="Epochs done.")
    loss: float | None = Field(default=None, description="Latest training loss.")


class ArtifactStatus(StatusModel):
    """The stored adapter, taken from its verified manifest."""

    uri: str = Field(description="s3:// URI of the adapter version.")
    digest: str = Field(description="sha256 digest of the adapter's manifest.")
    size_bytes: int = Field(description="Total size of the adapter files in bytes.")


class FineTuneJobStatus(StatusModel):
    """Observed state of a FineTuneJob."""

    phase: FineTuneJobPhase = Field(default="Pending", description="Pending, Running, Succeeded or Failed.")
    job_name: str | None = Field(default=None, description="Name of the training Job.")
    start_time: datetime | None = Field(default=None, description="When training started.")
    completion_time: datetime | None = Field(default=None, description="When training finished.")
    progress: TrainingProgress | None = Field(default=None, description="Training progress.")
    artifact: ArtifactStatus | None = Field(default=None, description="The stored adapter.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Final training metrics.")
    observed_generation: int | None = Field(
        default=None, description="metadata.generation this status was computed from."
    )
    conditions: ConditionList


FINE_TUNE_JOB_VALIDATIONS = [
    {"rule": "self == oldSelf", "message": "spec is immutable; create a new FineTuneJob to train again"},
    {
        # resources has no schema default: absent means the defaults (one GPU per node, ddp).
        "rule": "!has(self.resources) || self.resources.strategy != 'fsdp' || self.resources.gpusPerNode >= 1",
        "message": "resources.strategy fsdp shards the model over GPUs: set resources.gpusPerNode >= 1 or use ddp",
        "fieldPath": ".resources.strategy",
    },
    {
        "rule": "self.method != 'qlora' || !has(self.resources) || self.resources.gpusPerNode >= 1",
        "message": "method qlora needs a GPU (bitsandbytes 4-bit): set resources.gpusPerNode >= 1 or use method lora",
        "fieldPath": ".method",
    },
]
