"""Answers and reference losses from a model, for the base model and the adapter.

A backend answers prompts and measures the loss of references; `TransformersBackend` does both with the trained
peft model in memory: the base model is the same model with its adapter disabled (peft's ``disable_adapter()``), so
the base weights are loaded once. vLLM's offline engine would be faster for large evaluations, but the trainer
images do not contain vLLM; a `VllmBackend` implementing the same two methods (the adapter saved first and loaded
as a LoRARequest) is where it would go.

Generation is batched (BATCH_SIZE prompts of similar length, padded on the left), greedy unless
generation.temperature > 0 (then sampled, seeded with training.seed for both models alike), stops at the model's
end-of-sequence tokens, at max_new_tokens, or at a stop string (the answer is cut before it). A prompt longer than
the training's maxSequenceLength keeps its last tokens. Special tokens are left out of the decoded answers.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from lorafleet.api.evaluation import GenerationSettings
from lorafleet.evaluation.prompts import EvalExample
from lorafleet.trainer.data import IGNORE_INDEX, Rendered, tokenize

BATCH_SIZE = 16
# The loss batch is sized so that its logits (rows x tokens x vocabulary, float32) stay under this many elements.
LOGITS_BUDGET = 1 << 27


class Backend(Protocol):
    """What an evaluation needs from a model: answers and the loss of references, with or without the adapter."""

    def generate(self, examples: Sequence[EvalExample], settings: GenerationSettings, *, adapter: bool) -> list[str]:
        """One answer per example, in order."""
        ...

    def reference_loss(self, examples: Sequence[EvalExample], *, adapter: bool) -> float | None:
        """Mean cross-entropy per reference token (None: no reference token)."""
        ...


@dataclass
class TransformersBackend:
    """A peft model in memory (the adapter enabled, or disabled for the base model) and its tokenizer."""

    model: Any
    tokenizer: Any
    max_length: int
    seed: int = 0
    batch_size: int = BATCH_SIZE

    @contextlib.contextmanager
    def _mode(self, adapter: bool) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), contextlib.ExitStack() as stack:
                if not adapter:
                    stack.enter_context(self.model.disable_adapter())
                yield
        finally:
            self.model.train(was_training)

    @property
    def _device(self) -> torch.device:
        device: torch.device = next(self.model.parameters()).device
        return device

    def _prompt_ids(self, example: EvalExample) -> list[int]:
        ids = list(self.tokenizer(example.prompt, add_special_tokens=example.add_special_tokens)["input_ids"])
        return ids[-self.max_length :]

    def generate(self, examples: Sequence[EvalExample], settings: GenerationSettings, *, adapter: bool) -> list[str]:
        prompts = [self._prompt_ids(e) for e in examples]
        answers = [""] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        config = self._generation_config(settings)
        pad = self._pad_id()
        with self._mode(adapter):
            if settings.temperature > 0:
                torch.manual_seed(self.seed)
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                input_ids, attention = _left_padded([prompts[i] for i in batch], pad, self._device)
                extra = {"stop_strings": settings.stop, "tokenizer": self.tokenizer} if settings.stop else {}
                output = self.model.generate(
                    input_ids=input_ids, attention_mask=attention, generation_config=config, **extra
                )
                new = output[:, input_ids.shape[1] :]
                for i, text in zip(batch, self.tokenizer.batch_decode(new, skip_special_tokens=True), strict=True):
                    answers[i] = cut_at_stop(text, settings.stop)
        return answers

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id or 0)

    def _generation_config(self, settings: GenerationSettings) -> Any:
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = settings.max_new_tokens
        config.max_length = None
        config.use_cache = True
        config.pad_token_id = self._pad_id()
        config.num_beams = 1
        if settings.temperature > 0:
            config.do_sample, config.temperature = True, settings.temperature
        else:  # greedy: the sampling knobs of the model's own config would only warn
            config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
        return config

    def reference_loss(self, examples: Sequence[EvalExample], *, adapter: bool) -> float | None:
        rows = [r for r in (self._loss_row(e) for e in examples) if r is not None]
        if not rows:
            return None
        rows.sort(key=lambda r: len(r[0]))
        total, count = 0.0, 0
        vocabulary = int(self.model.get_output_embeddings().weight.shape[0])
        with self._mode(adapter):
            start = 0
            while start < len(rows):
                longest = len(rows[min(start + self.batch_size, len(rows)) - 1][0])
                size = max(1, min(self.batch_size, LOGITS_BUDGET // max(1, longest * vocabulary)))
                batch = rows[start : start + size]
                start += size
                loss_sum, tokens = self._loss_batch(batch)
                total, count = total + loss_sum, count + tokens
        return total / count if count else None

    def _loss_row(self, example: EvalExample) -> tuple[list[int], list[int]] | None:
        """Input ids and labels (the reference's tokens only), cut on the left to max_length."""
        text = example.prompt + example.reference
        rendered = Rendered(text, ((len(example.prompt), len(text)),), example.add_special_tokens, append_eos=False)
        tokenized = tokenize(rendered, self.tokenizer)
        ids, labels = tokenized.input_ids[-self.max_length :], tokenized.labels[-self.max_length :]
        return (ids, labels) if any(label != IGNORE_INDEX for label in labels[1:]) else None

    def _loss_batch(self, rows: list[tuple[list[int], list[int]]]) -> tuple[float, int]:
        width = max(len(ids) for ids, _ in rows)
        pad = self._pad_id()
        ids = torch.tensor([r[0] + [pad] * (width - len(r[0])) for r in rows], device=self._device)
        labels = torch.tensor([r[1] + [IGNORE_INDEX] * (width - len(r[1])) for r in rows], device=self._device)
        attention = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows], device=self._device)
        logits = self.model(input_ids=ids, attention_mask=attention).logits
        shifted = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return float(loss), int((shifted != IGNORE_INDEX).sum())


def _left_padded(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, attention


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first stop string (all of it when none occurs)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]
