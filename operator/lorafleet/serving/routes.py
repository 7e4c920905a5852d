"""Public adapter names and the names vLLM serves them under: the gateway's half of a version switch.

A new version of a loaded adapter is loaded beside the old one under another engine name (``<name>`` when free,
else ``<name>@<12 hex of its digest>``; public names cannot hold '@'), the route is switched here, and the old
name is unloaded once no request routed before the switch is still in flight. vLLM's ``load_inplace`` is not
used: in vLLM 0.32 the flag stays on the stored request and the adapter is re-read from disk at every engine step
(vllm issue 33791).

The gateway rewrites the request's ``model`` to the engine name, and the engine name back to the public one in
the response (streamed or not) and in /v1/models; with no alias in use, requests pass untouched and unparsed.
"""

from __future__ import annotations

import json
from typing import Any

ALIAS_SEP = "@"


def version_alias(name: str, digest: str) -> str:
    return f"{name}{ALIAS_SEP}{digest.removeprefix('sha256:')[:12]}"


def public_name(engine_name: str) -> str:
    return engine_name.split(ALIAS_SEP, 1)[0]


class Routes:
    """The route table and the requests in flight per generation (the table's version when they were routed)."""

    def __init__(self) -> None:
        self._aliases: dict[str, str] = {}  # public -> engine name, only where they differ
        self._public: dict[str, str] = {}  # engine name -> public, the reverse
        self.generation = 0
        self._inflight: dict[int, int] = {}
        self._retired: dict[str, int] = {}  # engine name -> generation from which nothing is routed to it

    # -- the syncer's side --------------------------------------------------------------------------------

    def engine_name(self, public: str) -> str:
        return self._aliases.get(public, public)

    def route(self, public: str, engine_name: str) -> None:
        """Send new requests for `public` to `engine_name`; the previous target is retired."""
        old = self.engine_name(public)
        if old == engine_name:
            return
        if engine_name == public:
            self._aliases.pop(public, None)
        else:
            self._aliases[public] = engine_name
        self._public = {v: k for k, v in self._aliases.items()}
        self._retired.pop(engine_name, None)
        self.retire(old)

    def forget(self, public: str) -> None:
        """The adapter is no longer served: its requests go to vLLM under their own name (and get its 404)."""
        if self._aliases.pop(public, None) is not None:
            self._public = {v: k for k, v in self._aliases.items()}

    def retire(self, engine_name: str) -> None:
        """No new request goes to engine_name (unless routed there again); requests routed before still may."""
        if engine_name not in self._retired:
            self.generation += 1
            self._retired[engine_name] = self.generation

    def drained(self, engine_name: str) -> bool:
        """True once a retired engine name can be unloaded: every request routed before its retirement is done."""
        since = self._retired.get(engine_name)
        if since is None:
            self.retire(engine_name)
            return False
        return not any(gen < since for gen in self._inflight)

    def unloaded(self, engine_name: str) -> None:
        self._retired.pop(engine_name, None)

    # -- the gateway's side -------------------------------------------------------------------------------

    def enter(self) -> int:
        gen = self.generation
        self._inflight[gen] = self._inflight.get(gen, 0) + 1
        return gen

    def leave(self, gen: int) -> None:
        left = self._inflight.get(gen, 0) - 1
        if left > 0:
            self._inflight[gen] = left
        else:
            self._inflight.pop(gen, None)

    def rewrite_request(self, body: bytes | None) -> tuple[bytes | None, StreamRewriter | None]:
        """The body with its model renamed to the engine name, and the rewriter of the response; unchanged
        (and not parsed) when no alias is in use or the body names no aliased model."""
        if not self._aliases or not body:
            return body, None
        try:
            data: Any = json.loads(body)
        except ValueError:
            return body, None  # vLLM answers it with its own error
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, str) or model not in self._aliases:
            return body, None
        engine_name = self._aliases[model]
        data["model"] = engine_name
        return json.dumps(data).encode(), StreamRewriter(engine_name, model)

    def rewrite_models(self, raw: bytes) -> bytes:
        """/v1/models as clients should see it: each adapter once, under its public name."""
        try:
            data: Any = json.loads(raw)
            cards = data["data"]
        except (ValueError, KeyError, TypeError):
            return raw
        if not isinstance(cards, list):
            return raw
        kept = []
        for card in cards:
            engine_name = card.get("id") if isinstance(card, dict) else None
            if not isinstance(engine_name, str) or card.get("parent") is None:
                kept.append(card)
                continue
            public = self._public.get(engine_name, public_name(engine_name))
            if self.engine_name(public) != engine_name:
                continue  # an old version still draining, or a new one not switched to yet
            kept.append({**card, "id": public})
        data["data"] = kept
        return json.dumps(data).encode()


class StreamRewriter:
    """Replaces the JSON string of the engine name by the public name's in a byte stream cut anywhere."""

    def __init__(self, engine_name: str, public: str) -> None:
        self._old = json.dumps(engine_name).encode()
        self._new = json.dumps(public).encode()
        self._tail = b""

    def feed(self, chunk: bytes) -> bytes:
        data = (self._tail + chunk).replace(self._old, self._new)
        # Keep back what could be the start of a name cut by the chunk boundary.
        keep = len(self._old) - 1
        for n in range(min(keep, len(data)), 0, -1):
            if self._old.startswith(data[-n:]):
                self._tail = data[-n:]
                return data[:-n]
        self._tail = b""
        return data

    def flush(self) -> bytes:
        tail, self._tail = self._tail, b""
        return tail
