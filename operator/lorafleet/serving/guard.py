"""The gateway's admission checks, pure of HTTP: per-adapter API keys and a memory budget for request bodies.

* API keys: an adapter listed as protected is served only to requests whose ``Authorization: Bearer <key>``
  matches one of its keys. Keys are files of a mounted Secret volume (one file per adapter, one key per line, so a
  key can be rotated by adding the new one before removing the old); they are re-read when the file changes and
  compared in constant time. A protected adapter whose file is missing or empty refuses every request (fail
  closed): a Secret that was deleted never opens the adapter to everyone.
* Bodies: each request's body is capped (413), and the bytes held in memory by all requests at once are capped
  too (503), so many large requests at once cannot exhaust the sidecar's memory.
"""

from __future__ import annotations

import hmac
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Refusal:
    """An HTTP error the gateway answers instead of forwarding, as OpenAI-style JSON."""

    status: int
    type: str
    message: str
    headers: tuple[tuple[str, str], ...] = ()

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.status}}


def body_too_large(limit: int) -> Refusal:
    return Refusal(
        413,
        "RequestTooLarge",
        f"the request body exceeds this endpoint's limit of {limit} bytes "
        "(AdapterDeployment spec.service.maxRequestBytes)",
    )


def parse_body(body: bytes | None) -> tuple[Any, str | None]:
    """The parsed JSON body (None when it is not JSON) and the `model` it names (None when it names none: vLLM
    then refuses it or serves the base model, which is never protected).

    Raises ValueError on a duplicate key: the gateway must see the same model as vLLM, whatever JSON parser it
    uses, for the API key check and the choice of a canary's version alike.
    """
    if not body:
        return None, None

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError("the request body has a duplicate key")
        return dict(pairs)

    try:
        data = json.loads(body, object_pairs_hook=no_duplicates)
    except UnicodeDecodeError:
        return None, None
    except json.JSONDecodeError:
        return None, None
    model = data.get("model") if isinstance(data, dict) else None
    return data, model if isinstance(model, str) else None


def model_of(body: bytes | None) -> str | None:
    """The `model` a JSON request names (parse_body's)."""
    return parse_body(body)[1]


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), else None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


@dataclass
class ApiKeys:
    """The accepted keys of the protected adapters: `<directory>/<adapter name>`, one key per line."""

    directory: Path | None
    protected: frozenset[str] = frozenset()
    _cache: dict[str, tuple[tuple[int, int, int], tuple[bytes, ...]]] = field(default_factory=dict, repr=False)

    def keys(self, model: str) -> tuple[bytes, ...]:
        """The keys of one protected adapter, read again whenever its file changes (a rotated Secret)."""
        if self.directory is None:
            return ()
        path = self.directory / model
        try:
            st = os.stat(path)
        except OSError:
            self._cache.pop(model, None)
            return ()
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._cache.get(model)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            text = path.read_bytes()
        except OSError:
            return ()
        keys = tuple(line.strip() for line in text.splitlines() if line.strip())
        self._cache[model] = (stamp, keys)
        return keys

    def check(self, model: str | None, authorization: str | None) -> Refusal | None:
        """None when the request may go on; else the refusal (401, or 503 when the adapter's keys are missing)."""
        if model is None or model not in self.protected:
            return None
        keys = self.keys(model)
        if not keys:
            return Refusal(
                503,
                "ApiKeysUnavailable",
                f"model {model!r} requires an API key but none is configured in this replica: check the Secret "
                f"named by its apiKeySecretRef in the AdapterDeployment",
            )
        token = bearer_token(authorization)
        if token is None:
            return Refusal(
                401,
                "Unauthorized",
                f"model {model!r} requires an API key: send it as 'Authorization: Bearer <key>'",
                (("WWW-Authenticate", 'Bearer realm="lorafleet"'),),
            )
        given = token.encode()
        # Every key is compared, whether or not an earlier one matched: the time taken does not say which matched.
        matched = False
        for key in keys:
            matched |= hmac.compare_digest(given, key)
        if not matched:
            return Refusal(
                401,
                "Unauthorized",
                f"the API key is not valid for model {model!r}",
                (("WWW-Authenticate", 'Bearer realm="lorafleet", error="invalid_token"'),),
            )
        return None


@dataclass
class BodyBudget:
    """Bytes of request bodies held in memory by all requests at once. Used from one event loop: no lock."""

    limit: int
    held: int = 0

    def reserve(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def release(self, n: int) -> None:
        self.held = max(0, self.held - n)


BUSY = Refusal(
    503,
    "ServerBusy",
    "this replica holds too many request bodies at once; retry shortly",
    (("Retry-After", "1"),),
)
