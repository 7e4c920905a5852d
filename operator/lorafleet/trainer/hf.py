"""Glue to transformers' Trainer: the arguments a config becomes, a Trainer subclass with the length-grouped sampler
and less fixed work per step, and the callback that reports progress, stores checkpoints and stops on SIGTERM.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from lorafleet.contracts.trainer import TrainerConfig
from lorafleet.trainer.batches import Datasets, LengthGroupedSampler
from lorafleet.trainer.errors import OUT_OF_MEMORY, TrainerError
from lorafleet.trainer.model import decoder_layer_classes
from lorafleet.trainer.progress import ProgressReporter
from lorafleet.trainer.runtime import Ranks, StopSignal
from lorafleet.trainer.sink import ArtifactSink

# Complete checkpoints kept in the store (and locally): the newest is resumed from, one more in case it is bad.
KEEP_CHECKPOINTS = 2


# -- arguments -----------------------------------------------------------------------------------------------------


def training_arguments(
    config: TrainerConfig, precision: str, output_dir: Path, has_eval: bool, model: Any | None = None
) -> TrainingArguments:
    t = config.training
    steps: dict[str, Any] = {"max_steps": t.max_steps} if t.max_steps else {"num_train_epochs": t.epochs or 1.0}
    fsdp: dict[str, Any] = {}
    if config.distributed.strategy == "fsdp":
        layers = decoder_layer_classes(model) if model is not None else []
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


# -- the Trainer ---------------------------------------------------------------------------------------------------


def make_trainer(
    model: Any, args: TrainingArguments, datasets: Datasets, collator: Any, packing: str, callback: LorafleetCallback
) -> LorafleetTrainer:
    """Our Trainer over the run's examples, with our callback in place of the library's console output."""
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
    return trainer


def train(trainer: Trainer, resume_dir: Path | None, stop: StopSignal) -> Any:
    """The training loop (resumed from resume_dir); CUDA out of memory becomes OutOfMemory, naming what to lower.
    Returns the library's TrainOutput."""
    try:
        return trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    except torch.OutOfMemoryError as e:
        raise TrainerError(
            OUT_OF_MEMORY,
            f"out of memory: {str(e).splitlines()[0]}; lower training.batchSize or "
            "training.maxSequenceLength, enable gradientCheckpointing, or use qlora",
        ) from e
    finally:
        stop.in_loop = False  # a signal from now on interrupts at once: no loop is left to checkpoint


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
