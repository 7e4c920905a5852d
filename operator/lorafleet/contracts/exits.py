"""Exit codes and error reasons of the trainer (documented in docs/trainer.md).

The exit code tells the Job whether a retry can help (the operator's podFailurePolicy matches on them); the
CamelCase reason becomes the FineTuneJob's condition reason (through the trainer's report).
"""

from __future__ import annotations

EXIT_OK = 0
# Anything else: a crash, the store unreachable, out of memory. The Job retries (backoffLimit).
EXIT_FAILED = 1
# Bad config, dataset or base model: retrying cannot help; the Job's podFailurePolicy fails it at once.
EXIT_INVALID_INPUT = 2
# SIGTERM (eviction, preemption, node drain): a checkpoint was written, the next pod resumes from it.
EXIT_INTERRUPTED = 3

# Reasons whose exit code is EXIT_INVALID_INPUT.
CONFIG_INVALID = "ConfigInvalid"
DATASET_NOT_FOUND = "DatasetNotFound"
DATASET_INVALID = "DatasetInvalid"
DATASET_EMPTY = "DatasetEmpty"
BASE_MODEL_INVALID = "BaseModelInvalid"
CHAT_TEMPLATE_UNSUPPORTED = "ChatTemplateUnsupported"
QLORA_NEEDS_GPU = "QLoRANeedsGPU"
FSDP_NEEDS_GPU = "FSDPNeedsGPU"
PRECISION_UNSUPPORTED = "PrecisionUnsupported"
LORA_TARGETS_INVALID = "LoRATargetsInvalid"
ADAPTER_VERSION_EXISTS = "AdapterVersionExists"
# Reasons whose exit code is EXIT_FAILED (retried).
STORE_UNAVAILABLE = "StoreUnavailable"
UPLOAD_FAILED = "UploadFailed"
OUT_OF_MEMORY = "OutOfMemory"
TRAINING_FAILED = "TrainingFailed"
# EXIT_INTERRUPTED.
INTERRUPTED = "Interrupted"

INVALID_INPUT_REASONS = frozenset(
    {
        CONFIG_INVALID,
        DATASET_NOT_FOUND,
        DATASET_INVALID,
        DATASET_EMPTY,
        BASE_MODEL_INVALID,
        CHAT_TEMPLATE_UNSUPPORTED,
        QLORA_NEEDS_GPU,
        FSDP_NEEDS_GPU,
        PRECISION_UNSUPPORTED,
        LORA_TARGETS_INVALID,
        ADAPTER_VERSION_EXISTS,
    }
)

REASONS = (
    *sorted(INVALID_INPUT_REASONS),
    STORE_UNAVAILABLE,
    UPLOAD_FAILED,
    OUT_OF_MEMORY,
    TRAINING_FAILED,
    INTERRUPTED,
)


def exit_code_for(reason: str | None) -> int:
    """The documented exit code of a reason (None: success)."""
    if reason is None:
        return EXIT_OK
    if reason in INVALID_INPUT_REASONS:
        return EXIT_INVALID_INPUT
    if reason == INTERRUPTED:
        return EXIT_INTERRUPTED
    return EXIT_FAILED
