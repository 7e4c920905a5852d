"""The final status: ONE compact JSON object in config.status_file (the pod's termination message), the contract
lorafleet.contracts.trainer.TrainerReport:

    {"version": 1,
     "progress": {"step", "totalSteps", "epoch", "loss"},
     "metrics": {name: number},
     "artifact": {"uri", "digest", "sizeBytes"},      # on success
     "tokensTrained": int,
     "evaluation": {"version", "metrics": {name: {"base", "adapter", "examples"}}, "examples", "predictionsFile"},
     "error": {"reason": CamelCase, "message"}}       # on failure

Kubernetes keeps at most 4096 bytes of a termination message, so the object is kept under MAX_BYTES: metrics are
dropped first, then long messages are cut, then the evaluation is left out (the manifest keeps it). Free of torch.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from lorafleet.contracts.base import MAX_MESSAGE, clip
from lorafleet.contracts.evaluation import EvaluationResult
from lorafleet.contracts.trainer import MAX_REPORT_BYTES as MAX_BYTES
from lorafleet.contracts.trainer import ReportArtifact, ReportError, ReportProgress, TrainerReport
from lorafleet.storage.scrub import scrub


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _round(value: float | int) -> float | int:
    return value if isinstance(value, int) else float(f"{value:.6g}")


def build_status(
    *,
    progress: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    artifact: dict[str, Any] | None = None,
    error: tuple[str, str] | None = None,
    evaluation: EvaluationResult | None = None,
    tokens_trained: int | None = None,
) -> dict[str, Any]:
    """The report (TrainerReport) as JSON, with non-finite numbers left out and numbers rounded to 6 significant
    digits."""
    report = TrainerReport()
    if progress:
        clean = {k: _number(v) for k, v in progress.items()}
        report.progress = ReportProgress.model_validate({k: _round(v) for k, v in clean.items() if v is not None})
    if metrics:
        clean = {k: _number(v) for k, v in metrics.items()}
        report.metrics = {k: _round(v) for k, v in sorted(clean.items()) if v is not None}
    if artifact:
        report.artifact = ReportArtifact.model_validate(artifact)
    if evaluation is not None:
        report.evaluation = evaluation
    if tokens_trained is not None:
        report.tokens_trained = tokens_trained
    if error:
        reason, message = error
        report.error = ReportError(reason=reason, message=clip(scrub(message), MAX_MESSAGE))
    return report.wire()


def encode(status: dict[str, Any]) -> str:
    """Compact JSON of at most MAX_BYTES bytes: metrics are dropped (largest last) until it fits."""
    status = json.loads(json.dumps(status))  # a copy we may trim
    text = json.dumps(status, separators=(",", ":"), ensure_ascii=False)
    while len(text.encode()) > MAX_BYTES and status.get("metrics"):
        status["metrics"].popitem()
        text = json.dumps(status, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode()) > MAX_BYTES and "error" in status:
        status["error"]["message"] = status["error"]["message"][:256]
        text = json.dumps(status, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode()) > MAX_BYTES and "evaluation" in status:
        del status["evaluation"]
        text = json.dumps(status, separators=(",", ":"), ensure_ascii=False)
    return text


def read_status(path: str | Path) -> dict[str, Any] | None:
    """The status in path, or None when it is missing, empty or not a JSON object."""
    try:
        value = json.loads(Path(path).read_text() or "null")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_status(path: str | Path, status: dict[str, Any], *, keep_error: bool = False) -> bool:
    """Write the status (replacing the file's content). With keep_error, an error already in the file wins:
    in a distributed run the first process to fail knows the cause, the others only see its absence.
    Returns whether it was written; never raises (a status that cannot be written must not hide the cause)."""
    target = Path(path)
    try:
        if keep_error and "error" in status:
            old = read_status(target)
            if old is not None and "error" in old:
                return False
        text = encode(status)
        if target.is_char_device() or str(target).startswith("/dev/"):
            # /dev/termination-log is a regular file bind-mounted by the kubelet; write it in place.
            with open(target, "w") as f:
                f.write(text)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, target)
        return True
    except (OSError, ValueError):
        return False
