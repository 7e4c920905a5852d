"""A small async client of vLLM's OpenAI server on localhost: health, the model list, runtime LoRA load/unload.

The load and unload endpoints exist only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and are reachable only from
inside the pod (vLLM listens on 127.0.0.1; the gateway does not forward them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp


class EngineUnavailable(Exception):
    """vLLM could not be reached or answered with a server error that says nothing about the adapter."""


@dataclass(frozen=True)
class EngineModel:
    """One entry of /v1/models."""

    id: str
    root: str | None
    parent: str | None


@dataclass(frozen=True)
class LoadResult:
    ok: bool
    status: int
    message: str


def _error_message(status: int, body: str) -> str:
    """vLLM's error JSON is {"error": {"message": ...}} (older: {"message": ...}); else the raw body."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:2000] or f"HTTP {status}"
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])[:2000]
        if isinstance(data.get("message"), str):
            return str(data["message"])[:2000]
    return body.strip()[:2000]


class EngineClient:
    """Talks to one vLLM server. Create inside a running event loop; close() when done."""

    def __init__(self, base_url: str, *, timeout: float = 10.0, load_timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        # Loading a large adapter reads and copies its weights: minutes are possible on a busy node.
        self._load_timeout = aiohttp.ClientTimeout(total=load_timeout)
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8))

    async def close(self) -> None:
        await self._session.close()

    async def healthy(self) -> bool:
        try:
            async with self._session.get(f"{self.base_url}/health", timeout=self._timeout) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def models(self) -> list[EngineModel]:
        try:
            async with self._session.get(f"{self.base_url}/v1/models", timeout=self._timeout) as resp:
                if resp.status != 200:
                    raise EngineUnavailable(f"GET /v1/models answered {resp.status}")
                data: Any = await resp.json()
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
            raise EngineUnavailable(f"GET /v1/models failed: {e}") from e
        models = []
        for card in data.get("data") or [] if isinstance(data, dict) else []:
            if isinstance(card, dict) and isinstance(card.get("id"), str):
                models.append(EngineModel(card["id"], card.get("root"), card.get("parent")))
        return models

    async def _post(self, path: str, payload: dict[str, Any], timeout: aiohttp.ClientTimeout) -> LoadResult:
        try:
            async with self._session.post(f"{self.base_url}{path}", json=payload, timeout=timeout) as resp:
                body = await resp.text()
                ok = resp.status == 200
                return LoadResult(ok, resp.status, body.strip() if ok else _error_message(resp.status, body))
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise EngineUnavailable(f"POST {path} failed: {e!r}") from e

    async def load(self, name: str, path: str) -> LoadResult:
        """POST /v1/load_lora_adapter of a new name. Never ``load_inplace``: vLLM 0.32 keeps that flag on the stored
        request and re-reads the adapter from disk at every engine step (vllm issue 33791); a new version is loaded
        under another name instead (lorafleet.serving.routes)."""
        return await self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}, self._load_timeout)

    async def unload(self, name: str) -> LoadResult:
        return await self._post("/v1/unload_lora_adapter", {"lora_name": name}, self._timeout)
