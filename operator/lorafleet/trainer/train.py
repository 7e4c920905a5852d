"""One training run: transformers' Trainer over a peft LoRA (or QLoRA) model, with our data pipeline, progress,
checkpoints in the artifact store, resume, and the final adapter published with its lineage.

Heavy imports (torch, transformers, peft) live here and nowhere else in the package.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers import logging as hf_logging
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from lorafleet.trainer import data
from lorafleet.trainer.config import TrainerConfig
from lorafleet.trainer.errors import (
    ADAPTER_VERSION_EXISTS,
    BASE_MODEL_INVALID,
    FSDP_NEEDS_GPU,
    LORA_TARGETS_INVALID,
    OUT_OF_MEMORY,
    PRECISION_UNSUPPORTED,
    QLORA_NEEDS_GPU,
    Interrupted,
    TrainerError,
)
from lorafleet.trainer.progress import ProgressReporter
from lorafleet.trainer.sink import ArtifactSink, DatasetFile, PublishedArtifact, sink_for

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Complete checkpoints kept in the store (and locally): the newest is resumed from, one more in case it is bad.
KEEP_CHECKPOINTS = 2


# -- signals -------------------------------------------------------------------------------------------------------


class StopSignal:
    """SIGTERM (and SIGINT): outside the training loop it interrupts at once; inside, it asks the loop to save a
    checkpoint and stop at the end of the current optimizer step."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self.in_loop = False

    def install(self) -> None:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def uninstall(self) -> None:
        for sig, handler in getattr(self, "_previous", {}).items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.requested is None
        self.requested = signum
        if not self.in_loop and first:
            raise Interrupted(f"{signal.Signals(signum).name} before training started; nothing to checkpoint")


# -- distributed ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranks:
    rank: int
    local_rank: int
    world_size: int

    @classmethod
    def from_environment(cls) -> Ranks:
        env = os.environ
        return cls(int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env.get("WORLD_SIZE", "1")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _broadcast(value: Any) -> Any:
    """Rank 0's value on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def _local_main_first(ranks: Ranks) -> Iterator[None]:
    """The node's first process runs the block first (downloads), the others after it (and find the files)."""
    if not ranks.is_local_main:
        _barrier()
    try:
        yield
    finally:
        if ranks.is_local_main:
            _barrier()


# -- CPU threads ---------------------------------------------------------------------------------------------------


def cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs this container may use by its cgroup quota (v2 cpu.max or v1 cfs quota), None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def cpu_threads() -> int:
    """Threads for torch on CPU: the CPUs we may run on, capped by the cgroup quota. torch's default counts the
    node's cores, and more threads than the quota allows stall each other at every parallel region."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota()
    return max(1, min(available, int(quota) if quota else available))


# -- result --------------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What the final status reports."""

    progress: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    artifact: PublishedArtifact | None = None
    skipped: bool = False  # the adapter version was already published by an earlier attempt of this job


# -- checks ------------------------------------------------------------------------------------------------------


def _precision(config: TrainerConfig) -> str:
    """fp32, bf16 or fp16; PrecisionUnsupported or QLoRANeedsGPU when the hardware cannot."""
    cuda = torch.cuda.is_available()
    if config.method == "qlora" and not cuda:
        raise TrainerError(
            QLORA_NEEDS_GPU,
            "method qlora quantizes the base model to 4 bits with bitsandbytes, which needs a CUDA GPU, and none "
            "is visible; set resources.gpusPerNode >= 1 or use method lora",
        )
    if config.distributed.strategy == "fsdp" and not cuda:
        raise TrainerError(
            FSDP_NEEDS_GPU,
            "distributed strategy fsdp needs GPUs (accelerate's FSDP has no CPU backend); use ddp on CPU",
        )
    wanted = config.training.precision
    if wanted == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else ("fp16" if config.method == "qlora" else "fp32")
    if wanted == "fp16" and not cuda:
        raise TrainerError(PRECISION_UNSUPPORTED, "precision fp16 needs a GPU; use bf16, fp32 or auto on CPU")
    if wanted == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise TrainerError(PRECISION_UNSUPPORTED, "precision bf16 is not supported by this GPU; use fp16 or auto")
    return wanted


def _model_source(config: TrainerConfig) -> tuple[str, dict[str, Any]]:
    """Where from_pretrained loads the base model: the local folder, or the hub when the BaseModel allows it."""
    base = config.base_model
    local = Path(base.local_dir)
    if (local / "config.json").is_file():
        return str(local), {"local_files_only": not base.allow_public_download}
    if base.uri.startswith("hf://") and base.allow_public_download:
        from lorafleet.uris import parse

        location = parse(base.uri)
        return location.authority, {"revision": location.revision} if location.revision else {}
    raise TrainerError(
        BASE_MODEL_INVALID,
        f"no model in {local} (config.json missing) for base model {base.name} ({base.uri})",
    )


def _check_qlora_dependencies() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise TrainerError(
            QLORA_NEEDS_GPU, "method qlora needs the bitsandbytes package, which this trainer image lacks"
        ) from e


# -- packing -------------------------------------------------------------------------------------------------------


def packing_mode(config: TrainerConfig) -> str:
    """How training.packing avoids computing on padding:

    * "flatten": the samples of a batch in one row, no padding at all (DataCollatorWithFlattening); attention
      kept inside each sample by varlen kernels. Used where flash-attention is installed (GPU).
    * "group": batches of samples of similar length (LengthGroupedSampler below), padded to the longest of each
      batch, so almost no padding. Used elsewhere: with SDPA or eager attention a flattened row would need a
      dense mask over the whole row and cost attention quadratic in the row (2.6x slower than padding on CPU for
      the tiny model, see docs/benchmarks.md).
    * "off": plain padded batches in random order.
    """
    if not config.training.packing:
        return "off"
    from transformers.utils.import_utils import is_flash_attn_2_available

    return "flatten" if torch.cuda.is_available() and is_flash_attn_2_available() else "group"


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Batches of samples of similar length, in random order, the same on every process and after a resume.

    Each epoch (seeded with seed + epoch): shuffle, cut into chunks of `megabatch` batches, sort each chunk by
    length and cut it into batches, then shuffle the batches, the one holding the longest sample first (an
    out-of-memory shows at once). Like transformers' LengthGroupedSampler, but that one leaves the batches of a
    chunk in descending order, uses chunks of a few batches only on small datasets, and draws from the global RNG.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, megabatch: int = 50) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.megabatch = megabatch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.megabatch * self.batch_size
        batches: list[list[int]] = []
        for start in range(0, len(order), size):
            chunk = sorted(order[start : start + size], key=lambda i: self.lengths[i], reverse=True)
            batches += [chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        # Only the very last batch may be short: it stays last so the loader's batches stay aligned.
        tail = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        if shuffled:
            longest = max(range(len(shuffled)), key=lambda i: max(self.lengths[j] for j in shuffled[i]))
            shuffled[0], shuffled[longest] = shuffled[longest], shuffled[0]
        return shuffled + tail

    def __iter__(self) -> Iterator[int]:
        return iter([i for batch in self.batches() for i in batch])


@contextlib.contextmanager
def _lean_mode_and_zero_grad(model: torch.nn.Module) -> Iterator[None]:
    """While training, make the Trainer's per-step module calls cheap (measured on the tiny model, one thread):

    * `model.train()`, which the Trainer calls on every micro-batch, walks every module (0.3 to 0.5 ms); it returns
      at once when the model is already in training mode. Modes are only switched through the whole model here
      (train, and `model.eval()` for evaluation, which still walks and is then undone by a full walk).
    * `model.zero_grad()` after every optimizer step walks every module for every parameter, frozen base weights
      included (0.15 ms); only the trainable parameters can hold gradients, so only theirs are dropped.

    Instance attributes, removed again on exit: the model's class and its behaviour otherwise stay the library's.
    """
    cls = type(model)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def train(mode: bool = True) -> torch.nn.Module:
        if mode and model.training:
            return model
        return cls.train(model, mode)

    def zero_grad(set_to_none: bool = True) -> None:
        if not set_to_none:
            cls.zero_grad(model, set_to_none)
            return
        for p in trainable:
            p.grad = None

    vars(model).update(train=train, zero_grad=zero_grad)
    try:
        yield
    finally:
        vars(model).pop("train", None)
        vars(model).pop("zero_grad", None)


@functools.cache
def _lomo_available() -> bool:
    from accelerate.utils.imports import is_lomo_available

    return bool(is_lomo_available())


def _cache_accelerate_lomo_check() -> None:
    """accelerate's optimizer wrapper asks importlib whether the lomo_optim package is installed twice per step
    (0.2 ms of path lookups per step here); the installed packages do not change during a run."""
    import accelerate.optimizer

    if getattr(accelerate.optimizer, "is_lomo_available", None) is not None:
        accelerate.optimizer.is_lomo_available = _lomo_available


class LorafleetTrainer(Trainer):
    """Trainer with the length-grouped sampler of packing mode "group", and less fixed work per step where the
    library repeats, on every step, lookups whose answer cannot change during a run (one process or DDP)."""

    def __init__(self, *args: Any, group_lengths: list[int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group_lengths = group_lengths

    def _simple_distribution(self) -> bool:
        """One process or DDP without an fp16 loss scaler: no FSDP, DeepSpeed, tensor or context parallelism."""
        from accelerate.utils import DistributedType

        simple = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
        return (
            self.accelerator.distributed_type in simple
            and self.accelerator.scaler is None
            and getattr(self.accelerator, "parallelism_config", None) is None
        )

    def train(self, *args: Any, **kwargs: Any) -> Any:
        if self.model is None or not self._simple_distribution():
            return super().train(*args, **kwargs)
        _cache_accelerate_lomo_check()
        with _lean_mode_and_zero_grad(self.model):
            return super().train(*args, **kwargs)

    def get_tp_size(self) -> int:
        """The library looks the model's tensor-parallel size up twice per micro-batch, through peft's attribute
        forwarding (a chain of failed lookups, 0.1 ms per step); it is fixed once the model is loaded."""
        if not hasattr(self, "_tp_size_cached"):
            self._tp_size_cached = int(super().get_tp_size())
        return self._tp_size_cached

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        """Non-padding tokens seen: in one process the mask's sum, without the library's gather across processes
        (a no-op there, 0.1 ms per step); otherwise the library's count."""
        mask = inputs.get("attention_mask")
        if (
            self.args.world_size == 1
            and self.args.include_num_input_tokens_seen == "non_padding"
            and isinstance(mask, torch.Tensor)
        ):
            self.state.num_input_tokens_seen += int(mask.sum())
            return
        super()._track_num_input_tokens(inputs)  # type: ignore[no-untyped-call]

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's estimate (6 x tokens x parameters), with the parameter count computed once: the library
        walks every module on every micro-batch for it, a visible cost per step on small models."""
        if not hasattr(self, "_parameters_for_flops"):
            count = getattr(self.model, "num_parameters", None)
            self._parameters_for_flops = int(count(exclude_embeddings=True)) if count else 0
        ids = inputs.get("input_ids")
        return 6 * int(ids.numel()) * self._parameters_for_flops if ids is not None else 0

    def _clip_grad_norm(self, model: Any) -> Any:
        """Clip the trainable parameters' gradients with torch directly where accelerate's wrapper only adds
        per-step checks (one process or DDP, no fp16 loss scaler); FSDP, DeepSpeed and fp16 go through it."""
        if self._simple_distribution():
            if not hasattr(self, "_trainable_parameters"):
                self._trainable_parameters = [p for p in model.parameters() if p.requires_grad]
            return torch.nn.utils.clip_grad_norm_(self._trainable_parameters, self.args.max_grad_norm)
        return super()._clip_grad_norm(model)  # type: ignore[no-untyped-call]

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if self.group_lengths is not None:
            batch = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(self.group_lengths, batch, self.args.seed)
        return super()._get_train_sampler(train_dataset)


# -- loading -------------------------------------------------------------------------------------------------------


def load_tokenizer(config: TrainerConfig) -> Any:
    source, kwargs = _model_source(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise TrainerError(BASE_MODEL_INVALID, f"cannot load the tokenizer of {config.base_model.name}: {e}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class Datasets:
    train: list[data.Example]
    eval: list[data.Example]
    train_file: DatasetFile
    eval_file: DatasetFile | None
    report: data.LoadReport
    eval_report: data.LoadReport | None


def load_datasets(config: TrainerConfig, tokenizer: Any, sink: ArtifactSink, work_dir: Path) -> Datasets:
    ds, training = config.dataset, config.training
    max_length, completion_only = training.max_sequence_length, training.completion_only_loss
    train_file = sink.fetch_dataset(ds.uri, work_dir / "data")
    examples, report = data.load_examples(
        train_file.path, ds, tokenizer, max_length=max_length, completion_only=completion_only, uri=ds.uri
    )
    eval_file: DatasetFile | None = None
    eval_examples: list[data.Example] = []
    eval_report: data.LoadReport | None = None
    if ds.eval_uri:
        eval_file = sink.fetch_dataset(ds.eval_uri, work_dir / "data-eval")
        eval_examples, eval_report = data.load_examples(
            eval_file.path, ds, tokenizer, max_length=max_length, completion_only=completion_only, uri=ds.eval_uri
        )
    elif ds.eval_split:
        examples, eval_examples = data.split_eval(examples, ds.eval_split, training.seed)
    return Datasets(examples, eval_examples, train_file, eval_file, report, eval_report)


def load_model(config: TrainerConfig, precision: str) -> Any:
    """The base model with LoRA adapters (peft), ready for the Trainer."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    source, kwargs = _model_source(config)
    kwargs["attn_implementation"] = "flash_attention_2" if packing_mode(config) == "flatten" else "sdpa"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if config.method == "qlora":
        _check_qlora_dependencies()
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,  # FSDP shards uniform storage
        )
        if config.distributed.nodes * config.distributed.processes_per_node == 1:
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise TrainerError(BASE_MODEL_INVALID, f"cannot load base model {config.base_model.name}: {e}") from e
    # No KV cache in training; also, transformers detects packed rows (flatten) only without one.
    model.config.use_cache = False
    if config.method == "qlora":
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model,
            use_gradient_checkpointing=config.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    lora = config.lora
    targets: str | list[str] = "all-linear" if lora.target_modules == ["all-linear"] else list(lora.target_modules)
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, peft_config)
    except ValueError as e:
        raise TrainerError(LORA_TARGETS_INVALID, f"lora.targetModules {lora.target_modules}: {e}") from e
    return peft_model


def _decoder_layer_classes(model: Any) -> list[str]:
    names = getattr(model, "_no_split_modules", None) or getattr(
        getattr(model, "base_model", None) and model.get_base_model(), "_no_split_modules", None
    )
    return list(names or [])


def training_arguments(
    config: TrainerConfig, precision: str, output_dir: Path, has_eval: bool, model: Any | None = None
) -> TrainingArguments:
    t = config.training
    steps: dict[str, Any] = {"max_steps": t.max_steps} if t.max_steps else {"num_train_epochs": t.epochs or 1.0}
    fsdp: dict[str, Any] = {}
    if config.distributed.strategy == "fsdp":
        layers = _decoder_layer_classes(model) if model is not None else []
        # FSDP2 (per-parameter sharding, fine with frozen base weights and LoRA parameters side by side).
        fsdp = {
            "fsdp": "full_shard auto_wrap",
            "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": layers, "reshard_after_forward": True},
        }
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        seed=t.seed,
        data_seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.checkpoint_interval,
        save_total_limit=KEEP_CHECKPOINTS,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.checkpoint_interval if has_eval else None,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        label_names=["labels"],
        include_num_input_tokens_seen="non_padding",
        ddp_backend=config.distributed.backend if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,
        use_cpu=not cuda,
        dataloader_pin_memory=cuda,
        log_level="warning",
        **steps,
        **fsdp,
    )


# -- callbacks -----------------------------------------------------------------------------------------------------


class LorafleetCallback(TrainerCallback):
    """Progress lines and annotation; checkpoints to the store; SIGTERM -> checkpoint and stop; a checkpoint at the
    last step so a retry after a failed upload of the adapter does not train again."""

    def __init__(
        self, reporter: ProgressReporter, sink: ArtifactSink, stop: StopSignal, ranks: Ranks, report: bool
    ) -> None:
        self.reporter = reporter
        self.sink = sink
        self.stop = stop
        self.ranks = ranks
        self.report = report
        self.interrupted_at: int | None = None
        self.checkpoint_uris: dict[int, str] = {}
        self.last_loss: float | None = None
        self.eval_loss: float | None = None
        self.eval_step: int | None = None

    def _stop_requested(self, args: TrainingArguments) -> bool:
        flag = self.stop.requested is not None
        if self.ranks.world_size > 1 and dist.is_initialized():
            # Every rank must stop at the same step, or the next collective hangs.
            box = torch.tensor([int(flag)], device=args.device)
            dist.all_reduce(box, op=dist.ReduceOp.MAX)
            flag = bool(box.item())
        return flag

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.reporter.start(state.global_step)
        self.stop.in_loop = True

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._stop_requested(args):
            self.interrupted_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        elif state.global_step >= state.max_steps:
            control.should_save = True

    def on_log(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        logs: dict[str, Any] = kwargs.get("logs") or {}
        if "eval_loss" in logs:
            self.eval_loss, self.eval_step = logs["eval_loss"], state.global_step
            if self.report:
                self.reporter.event("eval", step=state.global_step, evalLoss=logs["eval_loss"])
            return
        if "loss" not in logs:
            return
        self.last_loss = logs["loss"]
        if self.report:
            self.reporter.progress(
                step=state.global_step,
                total_steps=state.max_steps,
                epoch=state.epoch,
                loss=logs.get("loss"),
                learning_rate=logs.get("learning_rate"),
                tokens_seen=state.num_input_tokens_seen,
                grad_norm=logs.get("grad_norm"),
            )

    def on_save(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not self.ranks.is_main:
            return
        step = state.global_step
        folder = Path(args.output_dir) / f"checkpoint-{step}"
        started = time.monotonic()
        uri = self.sink.save_checkpoint(step, folder)
        self.sink.prune_checkpoints(KEEP_CHECKPOINTS)
        self.checkpoint_uris[step] = uri
        self.reporter.event("checkpoint", step=step, uri=uri, seconds=round(time.monotonic() - started, 2))


# -- the run -------------------------------------------------------------------------------------------------------


def _lineage(
    config: TrainerConfig, datasets: Datasets, metrics: dict[str, float], state: TrainerState
) -> dict[str, Any]:
    """The manifest's lineage: base model, dataset, hyperparameters (and the job), metrics with the loss curves."""
    import peft
    import transformers

    curve = [[e["step"], round(e["loss"], 6)] for e in state.log_history if "loss" in e]
    eval_curve = [[e["step"], round(e["eval_loss"], 6)] for e in state.log_history if "eval_loss" in e]
    train_file = datasets.train_file
    dataset: dict[str, Any] = {
        "uri": train_file.uri,
        "sha256": train_file.sha256,
        "etag": train_file.etag,
        "versionId": train_file.version_id,
        "format": config.dataset.format,
        "fields": config.dataset.fields.model_dump(by_alias=True),
        "train": datasets.report.summary(),
    }
    if datasets.eval_file is not None and datasets.eval_report is not None:
        dataset["eval"] = {
            "uri": datasets.eval_file.uri,
            "sha256": datasets.eval_file.sha256,
            **datasets.eval_report.summary(),
        }
    elif config.dataset.eval_split:
        dataset["eval"] = {"split": config.dataset.eval_split, "samples": len(datasets.eval)}
    base = config.base_model
    return {
        "baseModel": {k: v for k, v in {"name": base.name, "uri": base.uri, "digest": base.digest}.items() if v},
        "dataset": {k: v for k, v in dataset.items() if v is not None},
        "hyperparameters": {
            "method": config.method,
            "lora": config.lora.model_dump(by_alias=True),
            "training": config.training.model_dump(by_alias=True, exclude_none=True),
            "distributed": {
                "nodes": config.distributed.nodes,
                "processesPerNode": config.distributed.processes_per_node,
                "strategy": config.distributed.strategy,
            },
            "job": config.job.model_dump(by_alias=True),
            "frameworks": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
            },
        },
        "metrics": {**metrics, "lossCurve": curve, "evalLossCurve": eval_curve},
        "trainerImage": config.image,
    }


def _adapter_folder(trainer: Trainer, config: TrainerConfig, target: Path) -> Path:
    """The final adapter in peft's format, safetensors only: adapter_config.json + adapter_model.safetensors."""
    staging = target.with_name(target.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    trainer.save_model(str(staging))  # handles DDP/FSDP gathering; writes on the main process only
    if not trainer.args.should_save:
        return target
    target.mkdir(parents=True)
    for name in ADAPTER_FILES:
        if not (staging / name).is_file():
            raise TrainerError("TrainingFailed", f"peft did not write {name}")
        shutil.copy2(staging / name, target / name)
    shutil.rmtree(staging, ignore_errors=True)
    adapter_config = json.loads((target / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = config.base_model.uri
    (target / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    return target


def validate(config: TrainerConfig, *, sink: ArtifactSink | None = None) -> Datasets:
    """The checks that need no model weights: hardware, base model folder, tokenizer, the whole dataset."""
    sink = sink or sink_for(config)
    _precision(config)
    if config.method == "qlora":
        _check_qlora_dependencies()
    tokenizer = load_tokenizer(config)
    return load_datasets(config, tokenizer, sink, Path(config.work_dir))


def run(
    config: TrainerConfig,
    *,
    reporter: ProgressReporter,
    stop: StopSignal,
    sink: ArtifactSink | None = None,
) -> RunResult:
    """Train, checkpoint, resume and publish. Raises TrainerError (Interrupted on SIGTERM)."""
    started = time.monotonic()
    hf_logging.set_verbosity_warning()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    ranks = Ranks.from_environment()
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cpu_threads())
    sink = sink or sink_for(config)
    work_dir = Path(config.work_dir)
    precision = _precision(config)
    report = ranks.is_main

    output_dir = work_dir / "checkpoints"
    # TrainingArguments sets up torch.distributed under torchrun: before anything collective.
    has_eval = bool(config.dataset.eval_uri or config.dataset.eval_split)
    args = training_arguments(config, precision, output_dir, has_eval=has_eval)
    _ = args.device  # process group initialized here

    existing = _broadcast(sink.existing_adapter() if ranks.is_main else None)
    if existing is not None:
        if existing.lineage.get("hyperparameters", {}).get("job", {}).get("uid") == config.job.uid:
            reporter.event("published", uri=existing.uri, digest=existing.digest, note="by an earlier attempt")
            stored = existing.lineage.get("metrics", {})
            scalars = {k: float(v) for k, v in stored.items() if isinstance(v, int | float)}
            steps = int(scalars.get("steps", 0))
            return RunResult(
                progress={"step": steps, "totalSteps": steps}, metrics=scalars, artifact=existing, skipped=True
            )
        raise TrainerError(
            ADAPTER_VERSION_EXISTS,
            f"adapter version {existing.uri} already exists (made by another job); versions are never "
            "overwritten: set a new output.version",
        )

    tokenizer = load_tokenizer(config)
    with _local_main_first(ranks):
        datasets = load_datasets(config, tokenizer, sink, work_dir)
    if report:
        summary: dict[str, Any] = dict(datasets.report.summary())
        reporter.event(
            "dataset",
            uri=config.dataset.uri,
            format=config.dataset.format,
            evalSamples=len(datasets.eval) or None,
            **summary,
        )
        if datasets.report.truncated or datasets.report.dropped_overlong or datasets.report.dropped_untrained:
            reporter.event(
                "dataset",
                level="warning",
                message=f"samples over {config.training.max_sequence_length} tokens",
                truncatedLines=datasets.report.truncated[:20] or None,
                droppedLines=(datasets.report.dropped_overlong + datasets.report.dropped_untrained)[:20] or None,
            )

    from transformers import set_seed

    set_seed(config.training.seed)
    model = load_model(config, precision)
    if config.distributed.strategy == "fsdp":
        args = training_arguments(config, precision, output_dir, has_eval=bool(datasets.eval), model=model)
    collator: Any
    packing = packing_mode(config)
    if packing == "flatten":
        collator = DataCollatorWithFlattening(  # type: ignore[no-untyped-call]
            return_position_ids=True, separator_id=data.IGNORE_INDEX
        )
    else:
        multiple = 8 if precision != "fp32" else None  # tensor cores like multiples of 8
        collator = DataCollatorForSeq2Seq(
            tokenizer, padding=True, label_pad_token_id=data.IGNORE_INDEX, pad_to_multiple_of=multiple
        )
    callback = LorafleetCallback(reporter, sink, stop, ranks, report)
    trainer = LorafleetTrainer(
        group_lengths=[len(e) for e in datasets.train] if packing == "group" else None,
        model=model,
        args=args,
        train_dataset=[e.features() for e in datasets.train],
        eval_dataset=[e.features() for e in datasets.eval] or None,
        data_collator=collator,
        callbacks=[callback],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)

    resume_step = _broadcast(sink.latest_checkpoint() if ranks.is_main else None)
    resume_dir: Path | None = None
    if resume_step is not None:
        with _local_main_first(ranks):
            resume_dir = sink.download_checkpoint(resume_step, output_dir)
        if report:
            reporter.event("resume", step=resume_step)
    if report:
        trainable, total = model.get_nb_trainable_parameters()
        reporter.event(
            "start",
            method=config.method,
            precision=precision,
            device=f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "cpu",
            distributedType=str(trainer.accelerator.distributed_type.value),
            packing=packing,
            worldSize=ranks.world_size,
            trainableParameters=trainable,
            totalParameters=total,
            resumeStep=resume_step,
        )
    try:
        output = trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    except torch.OutOfMemoryError as e:
        raise TrainerError(
            OUT_OF_MEMORY,
            f"out of memory: {str(e).splitlines()[0]}; lower training.batchSize or "
            "training.maxSequenceLength, enable gradientCheckpointing, or use qlora",
        ) from e
    finally:
        stop.in_loop = False
    state = trainer.state
    # A retry that resumed at the last step trained nothing: the losses come from the restored history.
    last_loss = callback.last_loss
    if last_loss is None:
        last_loss = next((e["loss"] for e in reversed(state.log_history) if "loss" in e), None)
    progress = {"step": state.global_step, "totalSteps": state.max_steps, "epoch": state.epoch, "loss": last_loss}
    if callback.interrupted_at is not None:
        uri = callback.checkpoint_uris.get(callback.interrupted_at, "")
        raise Interrupted(
            f"stopped by a signal at step {callback.interrupted_at}/{state.max_steps}; checkpoint stored "
            f"{'at ' + uri if uri else 'by rank 0'}; the next attempt resumes from it"
        )

    metrics: dict[str, float] = {}
    if last_loss is not None:
        metrics["trainLoss"] = last_loss
    if datasets.eval:
        if callback.eval_step != state.global_step or callback.eval_loss is None:
            trainer.evaluate()  # reported through on_log
        if callback.eval_loss is not None:
            metrics["evalLoss"] = callback.eval_loss
    runtime = output.metrics.get("train_runtime") or 0.0
    session_tokens = state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)
    metrics.update(
        {
            "tokensPerSecond": session_tokens / runtime if runtime else 0.0,
            "trainSeconds": runtime,
            "wallSeconds": time.monotonic() - started,
            "trainTokens": float(state.num_input_tokens_seen),
            "steps": float(state.global_step),
            "samples": float(len(datasets.train)),
        }
    )
    adapter_dir = _adapter_folder(trainer, config, work_dir / "adapter")
    artifact = None
    if ranks.is_main:
        lineage = _lineage(config, datasets, metrics, state)
        artifact = sink.publish_adapter(adapter_dir, lineage)
        reporter.event("published", uri=artifact.uri, digest=artifact.digest, sizeBytes=artifact.size_bytes)
    artifact = _broadcast(artifact)
    _barrier()
    return RunResult(progress=progress, metrics=metrics, artifact=artifact)
