"""FineTuneJob: a LoRA or QLoRA fine-tune of a BaseModel on a private dataset."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from lorafleet.api.common import (
    ADAPTER_NAME,
    DNS_1035,
    S3_URI,
    VERSION_NAME,
    ApiModel,
    ConditionList,
    DatasetFileFormat,
    DatasetFormat,
    DataUri,
    LocalObjectReference,
    ObjectStore,
    PodSettings,
    StatusModel,
)
from lorafleet.api.evaluation import Evaluation, EvaluationStatus, UsageStatus
from lorafleet.api.stores import StoreRef, check_store_ref, store_ref_rule

ChatRole = Literal["system", "user", "assistant"]


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
    """Training data: a file of samples (JSON Lines, a JSON array, CSV, Parquet) or a saved Hugging Face dataset."""

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

    uri: DataUri = Field(
        description="Dataset file: s3://bucket/key.jsonl in the artifact store, or pvc://claim/path.jsonl; a folder "
        "written by Hugging Face datasets' save_to_disk for fileFormat datasets."
    )
    format: DatasetFormat = Field(description="Sample format: chat, instruction, completion or text.")
    file_format: DatasetFileFormat = Field(
        default="auto",
        description="File format: jsonl (one object per line), json (one array of objects), csv (a header row), "
        "parquet, or datasets (a save_to_disk folder); auto tells them by name and first character.",
    )
    fields: FieldMapping = Field(
        default_factory=FieldMapping, description="JSON field names, where they differ from the defaults."
    )
    roles: dict[str, ChatRole] = Field(
        default_factory=dict,
        description="chat: role names of the data mapped to system, user or assistant, e.g. {bot: assistant} "
        "(human and gpt, ShareGPT's, are mapped by default).",
        max_length=32,
    )
    eval_uri: DataUri | None = Field(default=None, description="Separate file for evaluation, in the same format.")
    eval_split: float | None = Field(
        default=None, description="Fraction of the dataset held out for evaluation.", gt=0, le=0.5
    )
    overlong: Literal["truncate", "drop"] = Field(
        default="truncate", description="What to do with samples longer than training.maxSequenceLength."
    )


class LoraSettings(ApiModel):
    """LoRA hyperparameters."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.targetExperts) || !self.targetExperts || self.dropout == 0.0",
                    "message": "lora.targetExperts: expert weights are adapted as parameters (peft's ParamWrapper), "
                    "which allows no LoRA dropout; set lora.dropout: 0",
                    "fieldPath": ".dropout",
                }
            ]
        }
    )

    r: int = Field(default=16, description="Rank of the LoRA matrices.", ge=1, le=512)
    alpha: int = Field(default=32, description="LoRA scaling numerator (scale = alpha / r).", ge=1, le=4096)
    dropout: float = Field(default=0.05, description="Dropout on the LoRA input.", ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        description="Module names to adapt, or [all-linear] for every linear layer but the output head and, in "
        "mixture-of-experts models, the experts and their router (see targetExperts).",
        min_length=1,
        max_length=64,
    )
    target_experts: bool = Field(
        default=False,
        description="Mixture-of-experts models: with all-linear, adapt the expert weights too (every expert, many "
        "more trainable parameters); needs dropout 0.",
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
    """Where the adapter goes: <uri>/adapters/<adapterName>/<version>/ in the artifact store (uri left out:
    <the operator's default uri>/<namespace>)."""

    model_config = ConfigDict(
        json_schema_extra={"x-kubernetes-validations": [store_ref_rule("output", "store", "uri")]}
    )

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
        description="s3://bucket/prefix of the artifact store; left out, the operator's default uri followed by "
        "this namespace. Without store (the default store) it must lie under that namespace root.",
        pattern=S3_URI,
        max_length=1024,
    )
    store: ObjectStore | None = Field(
        default=None, description="Object store to write to; left out, the operator's default store."
    )
    store_ref: StoreRef | None = Field(
        default=None,
        description="A ClusterArtifactStore or ArtifactStore to write to, instead of store and uri: the adapter "
        "goes to <bucket>/<prefix>/<namespace>/adapters/... of a ClusterArtifactStore, <bucket>/<prefix>/adapters/... "
        "of an ArtifactStore.",
    )
    deletion_policy: Literal["Retain", "Delete"] = Field(
        default="Retain",
        description="Retain keeps the adapter when the FineTuneJob is deleted; Delete removes it: only the version "
        "folder this spec names, only when its manifest's lineage names this FineTuneJob's UID, and not while an "
        "AdapterDeployment references it (condition DeletionBlocked; the operator gives up after a bounded time).",
    )

    @model_validator(mode="after")
    def _store_ref(self) -> AdapterOutput:
        check_store_ref(self, "output", "store", "uri")
        return self


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
    evaluation: Evaluation | None = Field(
        default=None,
        description="Task evaluation after training: the base model and the adapter answer the same held-out "
        "prompts; with require, a missed bar ends the job Failed (BelowQualityBar), the adapter kept.",
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
    evaluation: EvaluationStatus | None = Field(
        default=None, description="The task evaluation, from the adapter's verified manifest."
    )
    usage: UsageStatus | None = Field(default=None, description="What the fine-tune used, for chargeback.")
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

# Rules on the whole object (metadata.name is the only metadata CEL can see). A distributed job (nodes or
# gpusPerNode above 1) gets a rendezvous Service named after it; a single-pod job accepts any object name.
FINE_TUNE_JOB_NAME_VALIDATIONS = [
    {
        "rule": f"self.metadata.name.matches('{DNS_1035}') || !has(self.spec.resources) || "
        "((!has(self.spec.resources.nodes) || self.spec.resources.nodes <= 1) && "
        "(!has(self.spec.resources.gpusPerNode) || self.spec.resources.gpusPerNode <= 1))",
        "message": "metadata.name of a distributed FineTuneJob (resources.nodes or gpusPerNode above 1) must start "
        "with a letter and hold only lowercase letters, digits and '-' (its rendezvous Service is named after it): "
        "e.g. 'support-v1', not '1-support' or 'support.v1'",
    }
]
