"""Public adapter names and the names vLLM serves them under: the gateway's half of a version switch.

A new version of a loaded adapter is loaded beside the old one under another engine name (``<name>`` when free,
else ``<name>@<12 hex of its digest>``; public names cannot hold '@'), the route is switched here, and the old
name is unloaded once no request routed before the switch is still in flight. vLLM's ``load_inplace`` is not
used: in vLLM 0.32 the flag stays on the stored request and the adapter is re-read from disk at every engine step
(vllm issue 33791).

A canary (one served name, several versions with weights) is a second level above that: each version is a desired
adapter of its own (``<served name>:<version>``, lorafleet.contracts.serving.version_key) with its own engine name,
and ``pick`` chooses one version per request by weight, among the versions vLLM serves now.

The gateway rewrites the request's ``model`` to the engine name, and the engine name back to the name the client
sent in the response (streamed or not) and in /v1/models; a request whose engine name is the name it sent passes
with its body untouched.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lorafleet.contracts.serving import VERSION_SEP

ALIAS_SEP = "@"


def version_alias(name: str, digest: str) -> str:
    return f"{name}{ALIAS_SEP}{digest.removeprefix('sha256:')[:12]}"


def public_name(engine_name: str) -> str:
    return engine_name.split(ALIAS_SEP, 1)[0]


def internal_name(model: str) -> bool:
    """A name only the sidecar gives vLLM (a version being switched to, a canary's version): never one a client
    may send, since public names cannot hold either separator."""
    return ALIAS_SEP in model or VERSION_SEP in model


@dataclass(frozen=True)
class Version:
    """One version answering a served name: `key` is its desired adapter's name (whose engine name the alias table
    gives), `label` the metrics' version label, `weight` its percent of the served name's requests (None: the only
    version)."""

    key: str
    label: str
    weight: int | None = None


@dataclass(frozen=True)
class Target:
    """Where one request goes: the served name the client sent, the version picked, and vLLM's name for it."""

    served: str
    version: str
    engine_name: str


def pick_version(
    versions: Sequence[Version], live: Iterable[str] = (), draw: Callable[[], float] = random.random
) -> Version:
    """A version by weight among those vLLM serves now (all of them when none is): a version of weight 0 is
    never picked, unless every weight is 0 or None (then the first)."""
    weighted = [v for v in versions if v.weight is None or v.weight > 0]
    if not weighted:
        return versions[0]
    live_set = set(live)
    candidates = [v for v in weighted if v.key in live_set] or weighted
    if len(candidates) == 1:
        return candidates[0]
    total = sum(v.weight or 0 for v in candidates)
    if total <= 0:
        return candidates[0]
    point = draw() * total
    for version in candidates:
        point -= version.weight or 0
        if point < 0:
            return version
    return candidates[-1]


class Routes:
    """The route table and the requests in flight per generation (the table's version when they were routed)."""

    def __init__(self) -> None:
        self._aliases: dict[str, str] = {}  # public -> engine name, only where they differ
        self._public: dict[str, str] = {}  # engine name -> public, the reverse
        self.generation = 0
        self._inflight: dict[int, int] = {}
        self._retired: dict[str, int] = {}  # engine name -> generation from which nothing is routed to it
        # Served name -> the versions answering it (one, named as the served name, unless a canary).
        self._served: dict[str, tuple[Version, ...]] = {}
        self._served_of: dict[str, str] = {}  # a canary version's key -> its served name
        self._live: frozenset[str] = frozenset()  # keys whose current engine name vLLM lists
        self.base_model: str | None = None

    # -- the served names (from the desired set) ----------------------------------------------------------

    def set_served(self, served: Mapping[str, Sequence[Version]], base_model: str | None) -> None:
        """The served names and their versions, as the desired set lists them (replaced whole)."""
        self._served = {name: tuple(versions) for name, versions in served.items() if versions}
        self._served_of = {v.key: name for name, versions in self._served.items() for v in versions if v.key != name}
        self.base_model = base_model

    def set_live(self, keys: Iterable[str]) -> None:
        """The versions vLLM serves now: a canary's requests go to these (a version still loading gets none)."""
        self._live = frozenset(keys)

    def is_served(self, model: str) -> bool:
        return model in self._served

    def target(self, model: str, draw: Callable[[], float] = random.random) -> Target | None:
        """Where a request for `model` goes: a version by weight for a served name; None for anything else (the
        base model, or a name vLLM will answer with its own 404)."""
        versions = self._served.get(model)
        if not versions:
            return None
        version = pick_version(versions, self._live, draw)
        return Target(model, version.label, self.engine_name(version.key))

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

    def rewrite_request(
        self, body: bytes | None, data: Any, target: Target | None
    ) -> tuple[bytes | None, StreamRewriter | None]:
        """The body (`data` parsed) with its model renamed to the target's engine name, and the rewriter of the
        response; the body unchanged when the engine name is the name the client sent."""
        if target is None or target.engine_name == target.served or not isinstance(data, dict):
            return body, None
        data = {**data, "model": target.engine_name}
        return json.dumps(data).encode(), StreamRewriter(target.engine_name, target.served)

    def rewrite_models(self, raw: bytes) -> bytes:
        """/v1/models as clients should see it: each adapter once, under its served name (a canary's versions
        as one)."""
        try:
            data: Any = json.loads(raw)
            cards = data["data"]
        except (ValueError, KeyError, TypeError):
            return raw
        if not isinstance(cards, list):
            return raw
        kept = []
        listed: set[str] = set()
        for card in cards:
            engine_name = card.get("id") if isinstance(card, dict) else None
            if not isinstance(engine_name, str) or card.get("parent") is None:
                kept.append(card)
                continue
            public = self._public.get(engine_name, public_name(engine_name))
            if self.engine_name(public) != engine_name:
                continue  # an old version still draining, or a new one not switched to yet
            served = self._served_of.get(public, public)
            if served in listed:
                continue  # another version of the same canary
            listed.add(served)
            kept.append({**card, "id": served})
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
