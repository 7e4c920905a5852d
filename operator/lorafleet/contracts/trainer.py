"""The trainer's contracts: its config (operator -> pod), its final report and its live progress (pod -> operator).

* `TrainerConfig`: rendered by the operator from a FineTuneJob into an annotation of the Job's pod template,
  which the downward API mounts as the file `CONFIG_FILE`, read by `lorafleet train`. The CRD's own models refuse
  unknown fields; the config's copies of them ignore them, so a field added to the CRD does not break an older
  trainer image chosen through `spec.image`. The values the trainer uses keep the CRD's validation.
* `TrainerReport`: the trainer's termination message, ONE compact JSON object of at most `MAX_REPORT_BYTES`.
* `TrainerProgress`: the JSON under the key `PROGRESS_KEY` of the job's progress ConfigMap (named in the trainer's
  environment `PROGRESS_CONFIG_MAP_ENV`), updated while it runs. The trainer's Role may patch that one ConfigMap
  and nothing else (no pods); the operator reads it from its cache with `parse_progress`: at most
  `MAX_PROGRESS_BYTES`, anything else reads as no progress (the trainer may run a tenant's own image).

Versions: every writer emits its contract's current version; readers accept any version (a missing one is 1)
and ignore fields they do not know.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StrictFloat, StrictInt, field_validator

from lorafleet.api import common as api_common
from lorafleet.api import evaluation as api_eval
from lorafleet.api import finetunejob as api_ftj
from lorafleet.contracts.base import Contract, Lenient
from lorafleet.contracts.evaluation import EvaluationResult
from lorafleet.contracts.stores import IGNORE_UNKNOWN, ObjectStore

CONFIG_FILE = "trainer.json"
CONFIG_VERSION = 1
REPORT_VERSION = 1
PROGRESS_VERSION = 1
PROGRESS_KEY = "progress.json"
PROGRESS_CONFIG_MAP_ENV = "LORAFLEET_PROGRESS_CONFIGMAP"
# A progress object is about 120 bytes; the cap bounds what the operator caches and parses per job.
MAX_PROGRESS_BYTES = 1024
# Kubernetes keeps at most 4096 bytes of a termination message.
MAX_REPORT_BYTES = 4096


# -- the CRD's types as the trainer reads them: same fields and checks, unknown fields ignored ---------------


class FieldMapping(api_ftj.FieldMapping):
    model_config = IGNORE_UNKNOWN


class Dataset(api_ftj.Dataset):
    model_config = IGNORE_UNKNOWN

    fields: FieldMapping = Field(
        default_factory=FieldMapping, description="JSON field names, where they differ from the defaults."
    )
    # Not dumped while they have their defaults, so rendered configs (and the golden files) stay as they were.
    file_format: api_common.DatasetFileFormat = Field(
        default="auto", description="File format of the dataset.", exclude_if=lambda value: value == "auto"
    )
    roles: dict[str, api_ftj.ChatRole] = Field(
        default_factory=dict, description="chat: role names mapped.", max_length=32, exclude_if=lambda value: not value
    )


class LoraSettings(api_ftj.LoraSettings):
    model_config = IGNORE_UNKNOWN


class TrainingSettings(api_ftj.TrainingSettings):
    model_config = IGNORE_UNKNOWN


class GenerationSettings(api_eval.GenerationSettings):
    model_config = IGNORE_UNKNOWN


class QualityBar(api_eval.QualityBar):
    model_config = IGNORE_UNKNOWN


class Evaluation(api_eval.Evaluation):
    model_config = IGNORE_UNKNOWN

    generation: GenerationSettings = Field(
        default_factory=GenerationSettings, description="Generation settings for both models."
    )
    # The lenient item type narrows the CRD's list (pydantic validates it; mypy sees list invariance).
    require: list[QualityBar] = Field(  # type: ignore[assignment]
        default_factory=list, max_length=8, description="Bars the adapter must reach (judged by the operator)."
    )


# -- the config ------------------------------------------------------------------------------------------------


class ConfigModel(Contract):
    """Parts of the config: as every contract, but infinite numbers are the CRD's business."""

    model_config = ConfigDict(allow_inf_nan=True)


class JobIdentity(ConfigModel):
    """Which FineTuneJob this run belongs to (for lineage and logs)."""

    namespace: str = Field(description="Namespace of the FineTuneJob.")
    name: str = Field(description="Name of the FineTuneJob.")
    uid: str = Field(description="UID of the FineTuneJob.")


class BaseModelLocation(ConfigModel):
    """The base model, resolved from its BaseModel resource."""

    name: str = Field(description="Name of the BaseModel resource.")
    uri: str = Field(description="s3://, pvc:// or hf:// location of the weights.")
    digest: str | None = Field(default=None, description="Expected sha256 digest of the model manifest.")
    store: ObjectStore | None = Field(default=None, description="Object store of an s3:// uri.")
    local_dir: str = Field(default="/work/base-model", description="Where the weights are in the pod.")
    allow_public_download: bool = Field(default=False, description="Whether a hub download is allowed.")


class OutputTarget(ConfigModel):
    """Where the finished adapter and the checkpoints go, fully resolved."""

    adapter_name: str = Field(description="Adapter name.")
    version: str = Field(description="Adapter version.")
    uri: str = Field(description="s3://bucket/prefix of the artifact store.")
    store: ObjectStore | None = Field(default=None, description="Object store; None uses the environment.")
    checkpoint_uri: str = Field(description="s3:// prefix for this job's checkpoints.")

    @property
    def adapter_uri(self) -> str:
        """The version folder the adapter is published to; the operator records and deletes only this one."""
        return f"{self.uri.rstrip('/')}/adapters/{self.adapter_name}/{self.version}"


class DistributedSettings(ConfigModel):
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


class TrainerConfig(ConfigModel):
    """Everything one training run needs."""

    version: int = Field(
        default=CONFIG_VERSION,
        description="Contract version of the config.",
    )
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
    # Not dumped while absent, so rendered configs (and the golden files) stay as they were.
    evaluation: Evaluation | None = Field(
        default=None,
        description="Task evaluation after training (base model vs adapter); None skips it.",
        exclude_if=lambda value: value is None,
    )

    def render(self) -> dict[str, Any]:
        """The JSON object the operator writes into the ConfigMap."""
        return self.model_dump(mode="json", by_alias=True)


# -- what the trainer reports --------------------------------------------------------------------------------

# Numbers from a pod: a bool, a string or a non-finite number reads as absent.
Count = Annotated[StrictInt | None, Lenient]
Number = Annotated[StrictInt | StrictFloat | None, Lenient]


class TrainerProgress(Contract):
    """Live progress of rank 0, under PROGRESS_KEY in the job's progress ConfigMap."""

    version: Annotated[int | None, Lenient] = PROGRESS_VERSION
    step: Count = Field(default=None, description="Optimizer steps done.")
    total_steps: Count = Field(default=None, description="Optimizer steps planned.")
    epoch: Number = Field(default=None, description="Epochs done.")
    loss: Number = Field(default=None, description="Latest training loss.")
    tokens_per_second: Number = Field(default=None, description="Training throughput since the last report.")


def parse_progress(text: object) -> TrainerProgress | None:
    """The progress a ConfigMap holds, or None when it is absent, over MAX_PROGRESS_BYTES or not a JSON object."""
    if not isinstance(text, str) or len(text.encode()) > MAX_PROGRESS_BYTES:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return TrainerProgress.model_validate(value) if isinstance(value, dict) else None


class ReportProgress(Contract):
    """Progress at the end of the run, in the report."""

    step: Count = Field(default=None, description="Optimizer steps done.")
    total_steps: Count = Field(default=None, description="Optimizer steps planned.")
    epoch: Number = Field(default=None, description="Epochs done.")
    loss: Number = Field(default=None, description="Latest training loss.")


class ReportArtifact(Contract):
    """The stored adapter: all three or nothing (AdapterDeployments pin the digest)."""

    uri: str
    digest: str
    size_bytes: StrictInt


class ReportError(Contract):
    """Why the run failed: a CamelCase reason (lorafleet.contracts.exits) and a message for people."""

    reason: Annotated[str | None, Lenient] = None
    message: Annotated[str | None, Lenient] = None


class TrainerReport(Contract):
    """The trainer's final report: its pod's termination message."""

    version: Annotated[int | None, Lenient] = REPORT_VERSION
    progress: Annotated[ReportProgress | None, Lenient] = None
    metrics: dict[str, float] | None = None
    artifact: Annotated[ReportArtifact | None, Lenient] = None  # on success
    error: Annotated[ReportError | None, Lenient] = None  # on failure
    tokens_trained: Count = None  # tokens the optimizer saw on all ranks (for usage/chargeback)
    evaluation: Annotated[EvaluationResult | None, Lenient] = None  # when config.evaluation was set

    @field_validator("metrics", mode="before")
    @classmethod
    def _finite_numbers(cls, value: Any) -> Any:
        # One odd metric (NaN, a string) is left out; the others stay.
        if not isinstance(value, dict):
            return None
        return {
            str(k): v
            for k, v in value.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
        }
