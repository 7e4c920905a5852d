"""The trainer's failures (exit codes and reasons are the contract in lorafleet.contracts.exits). Free of torch.

Every failure the trainer understands is a TrainerError: a CamelCase reason (it becomes the FineTuneJob's
condition reason), a message for people, and an exit code that tells the Job whether a retry can help.
"""

from __future__ import annotations

from lorafleet.contracts.exits import (
    ADAPTER_VERSION_EXISTS,
    BASE_MODEL_INVALID,
    CHAT_TEMPLATE_UNSUPPORTED,
    CONFIG_INVALID,
    DATASET_EMPTY,
    DATASET_INVALID,
    DATASET_NOT_FOUND,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_INVALID_INPUT,
    EXIT_OK,
    FSDP_NEEDS_GPU,
    INTERRUPTED,
    INVALID_INPUT_REASONS,
    LORA_TARGETS_INVALID,
    OUT_OF_MEMORY,
    PRECISION_UNSUPPORTED,
    QLORA_NEEDS_GPU,
    STORE_UNAVAILABLE,
    TRAINING_FAILED,
    UPLOAD_FAILED,
    exit_code_for,
)

# Re-exported for the trainer's modules (data, train, sink) that import them from here.
__all__ = [
    "ADAPTER_VERSION_EXISTS",
    "BASE_MODEL_INVALID",
    "CHAT_TEMPLATE_UNSUPPORTED",
    "CONFIG_INVALID",
    "DATASET_EMPTY",
    "DATASET_INVALID",
    "DATASET_NOT_FOUND",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_INVALID_INPUT",
    "EXIT_OK",
    "FSDP_NEEDS_GPU",
    "INTERRUPTED",
    "INVALID_INPUT_REASONS",
    "LORA_TARGETS_INVALID",
    "OUT_OF_MEMORY",
    "PRECISION_UNSUPPORTED",
    "QLORA_NEEDS_GPU",
    "STORE_UNAVAILABLE",
    "TRAINING_FAILED",
    "UPLOAD_FAILED",
    "Interrupted",
    "TrainerError",
    "exit_code_for",
]


class TrainerError(Exception):
    """A failure with a reason for the FineTuneJob's status and a documented exit code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.reason)

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class Interrupted(TrainerError):
    """SIGTERM: raised when it arrives outside the training loop, or after the loop saved its checkpoint."""

    def __init__(self, message: str) -> None:
        super().__init__(INTERRUPTED, message)
