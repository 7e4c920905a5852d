"""Process-wide counters of requests outside the Kubernetes API: object stores (S3, STS) and pods' HTTP endpoints.

Every concern that makes such requests counts them here, so the operator's /metrics (and the benchmark, which
reads them) shows whether a steady state costs any external I/O. Pods that use lorafleet's storage client (the
trainer, the serving sidecar) count too, in their own process.
"""

from __future__ import annotations

from typing import Any, Literal

from prometheus_client import Counter

Target = Literal["s3", "sts", "pod"]

EXTERNAL_REQUESTS = Counter(
    "lorafleet_external_requests_total",
    "HTTP requests outside the Kubernetes API, by target: s3 (object store), sts (credential minting), pod "
    "(a serving pod's state endpoint). Retries count each attempt.",
    ["target"],
)


def count(target: Target) -> None:
    EXTERNAL_REQUESTS.labels(target=target).inc()


def count_botocore_sends(client: Any, target: Target) -> None:
    """Count every HTTP request a boto3 client sends (each retry attempt included)."""

    def _before_send(**_: Any) -> None:
        count(target)

    client.meta.events.register("before-send", _before_send)
