"""Per-adapter request and token counters of one replica, for canaries and chargeback, served as Prometheus text on
the sidecar's status port (/metrics: not behind the Service, so tenants cannot read each other's usage).

* ``lorafleet_adapter_requests_total{adapter,version,code}``: inference requests by the name the client sent, the
  version that answered (a canary's version name, else the adapter version's folder name) and the HTTP status.
* ``lorafleet_adapter_tokens_total{adapter,version,kind}``: ``kind`` is ``prompt`` or ``completion``, from the
  ``usage`` vLLM returns: the JSON body's, or a stream's last chunk that carries one (a stream carries usage only
  when the client asks with ``stream_options.include_usage``, or vLLM runs with ``--enable-force-include-usage``).

Labels are bounded: ``adapter`` is a served name of the desired set or the base model, anything else is
``OTHER``; a client cannot create series by sending made-up names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

METRICS_PATH = "/metrics"
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
OTHER = "_other"  # public names start with a letter or digit: no adapter is called this
# A non-streamed response larger than this is passed on without reading its usage (completions with logprobs of
# thousands of tokens stay far below it).
MAX_USAGE_BODY = 8 * 1024 * 1024
# A server-sent event line longer than this is skipped: usage chunks are a few hundred bytes.
MAX_EVENT_LINE = 1024 * 1024


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53 else 0


def usage_of(obj: Any) -> Usage | None:
    """The `usage` of an OpenAI response object, or None when it has none."""
    usage = obj.get("usage") if isinstance(obj, dict) else None
    if not isinstance(usage, dict):
        return None
    return Usage(_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")))


class UsageTap:
    """Reads the token usage out of a response body as it streams past, without holding a stream in memory: a
    JSON body is kept (up to MAX_USAGE_BODY) and parsed at the end; a server-sent event stream is split into lines
    and only the `data:` lines that mention usage are parsed, the last such usage wins (it is cumulative)."""

    def __init__(self, content_type: str | None) -> None:
        kind = (content_type or "").split(";", 1)[0].strip().lower()
        self._stream = kind == "text/event-stream"
        self._json = kind == "application/json"
        self._buffer = bytearray()
        self._skipping = False  # inside an event line too long to parse
        self._usage: Usage | None = None

    def feed(self, chunk: bytes) -> None:
        if self._json:
            if len(self._buffer) + len(chunk) > MAX_USAGE_BODY:
                self._json = False  # too large to parse: its tokens are not counted
                self._buffer.clear()
            else:
                self._buffer += chunk
        elif self._stream:
            self._buffer += chunk
            *lines, rest = bytes(self._buffer).split(b"\n")
            for line in lines:
                if self._skipping:
                    self._skipping = False
                    continue
                self._line(line)
            self._buffer = bytearray(rest)
            if len(self._buffer) > MAX_EVENT_LINE:
                self._buffer.clear()
                self._skipping = True

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:") or b'"usage"' not in line:
            return
        try:
            usage = usage_of(json.loads(line[5:]))
        except ValueError:
            return
        if usage is not None:
            self._usage = usage

    def usage(self) -> Usage | None:
        if self._json and self._buffer:
            try:
                self._usage = usage_of(json.loads(self._buffer))
            except ValueError:
                self._usage = None
            self._buffer.clear()
        elif self._stream and self._buffer and not self._skipping:
            self._line(bytes(self._buffer).rstrip(b"\r"))
            self._buffer.clear()
        return self._usage


class ServingMetrics:
    """The counters of one replica, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "lorafleet_adapter_requests",
            "Inference requests by served name, answering version and HTTP status.",
            ["adapter", "version", "code"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "lorafleet_adapter_tokens",
            "Tokens by served name and answering version: kind=prompt or completion, from the responses' usage.",
            ["adapter", "version", "kind"],
            registry=self.registry,
        )

    def observe(self, adapter: str, version: str, code: int, usage: Usage | None) -> None:
        self.requests.labels(adapter, version, str(code)).inc()
        if usage is not None:
            if usage.prompt_tokens:
                self.tokens.labels(adapter, version, "prompt").inc(usage.prompt_tokens)
            if usage.completion_tokens:
                self.tokens.labels(adapter, version, "completion").inc(usage.completion_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
