"""status.usage of a FineTuneJob (pure): what its training Job used, for chargeback.

Wall time runs from the Job's startTime to its completion (completionTime, or when it was marked Failed); every
pod of the Job counts for that whole time, with what it requested: GPU-seconds = gpusPerNode x nodes x wall for a
GPU job, CPU-seconds = resources.cpu x nodes x wall for a CPU job (none when resources.cpu is unset: nothing was
requested to count). Retries and pods that queued are inside the wall time; that is what the Job held.
The price comes from the operator's settings (config.Pricing), never from the FineTuneJob or its pod.
"""

from __future__ import annotations

from datetime import UTC, datetime

from kubernetes.utils.quantity import parse_quantity

from lorafleet.api.evaluation import UsageStatus
from lorafleet.api.finetunejob import TrainingResources
from lorafleet.config import Pricing


def as_datetime(value: datetime | str | None) -> datetime | None:
    """A Kubernetes time (RFC 3339 string, or a datetime already) as an aware datetime; None if unreadable."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return None


def cpus(resources: TrainingResources) -> float | None:
    """CPUs each pod requested (resources.cpu: 8, '500m'), or None when unset."""
    if resources.cpu is None:
        return None
    return float(parse_quantity(resources.cpu))  # type: ignore[no-untyped-call]  # the client's, untyped


def format_cost(amount: float, currency: str) -> str:
    """'12.40 USD'; below one unit four decimals, so a short CPU run does not read as free."""
    return f"{amount:.2f} {currency}" if amount >= 1 else f"{amount:.4f} {currency}"


def usage_status(
    resources: TrainingResources,
    start: datetime | str | None,
    end: datetime | str | None,
    tokens_trained: int | None,
    pricing: Pricing | None,
) -> UsageStatus | None:
    """The usage of a finished Job that ran from `start` to `end`; None while either time is unknown."""
    begun, ended = as_datetime(start), as_datetime(end)
    if begun is None or ended is None:
        return None
    wall = max((ended - begun).total_seconds(), 0.0)
    pods = resources.nodes
    gpu_seconds = cpu_seconds = cost = None
    if resources.gpus_per_node:
        gpu_seconds = resources.gpus_per_node * pods * wall
        price = pricing.gpu_price(resources.node_selector) if pricing is not None else None
        cost = None if price is None else gpu_seconds / 3600 * price
    else:
        per_pod = cpus(resources)
        cpu_seconds = None if per_pod is None else per_pod * pods * wall
        price = pricing.cpu_hour if pricing is not None else None
        cost = None if price is None or cpu_seconds is None else cpu_seconds / 3600 * price
    return UsageStatus(
        wall_seconds=wall,
        gpu_seconds=gpu_seconds,
        cpu_seconds=cpu_seconds,
        tokens_trained=tokens_trained if tokens_trained is not None and tokens_trained >= 0 else None,
        estimated_cost=None if cost is None or pricing is None else format_cost(cost, pricing.currency),
    )
