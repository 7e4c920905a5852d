"""The pod's only open port: a reverse proxy (aiohttp) that forwards the OpenAI inference routes to vLLM on
localhost, plus the sidecar's own health, readiness and state endpoints.

Routes are an allowlist matched exactly; the upstream URL is built from the matched route, never from the
request's path, so vLLM's runtime LoRA endpoints (/v1/load_lora_adapter, /v1/unload_lora_adapter, SageMaker's
/adapters) and its admin routes cannot be reached through the Service whatever the spelling of the path.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp
from aiohttp import web

from lorafleet.serving.engine import EngineClient
from lorafleet.serving.syncer import Syncer

log = logging.getLogger("lorafleet.serving.gateway")

# (method, path) forwarded as they are; responses stream back (SSE included).
INFERENCE_ROUTES: tuple[tuple[str, str], ...] = (
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/embeddings"),
    ("GET", "/v1/models"),
)
HEALTH, READY, STATE = "/health", "/lorafleet/ready", "/lorafleet/state"
MAX_REQUEST_BYTES = 64 * 1024 * 1024
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)

SYNCER: web.AppKey[Syncer] = web.AppKey("syncer", Syncer)
ENGINE: web.AppKey[EngineClient] = web.AppKey("engine", EngineClient)
UPSTREAM: web.AppKey[aiohttp.ClientSession] = web.AppKey("upstream", aiohttp.ClientSession)


def _forward_headers(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}


def _proxy(path: str) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        engine = request.app[ENGINE]
        session = request.app[UPSTREAM]
        body = await request.read() if request.can_read_body else None
        try:
            upstream = await session.request(
                request.method,
                engine.base_url + path,
                params=request.query,
                data=body,
                headers=_forward_headers(request.headers),
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            log.warning("%s %s: vLLM unreachable: %r", request.method, path, e)
            return web.json_response(
                {"error": {"message": f"the model server is not reachable: {e}", "type": "ServiceUnavailable",
                           "code": 503}},
                status=503,
            )
        async with upstream:
            headers = _forward_headers(upstream.headers)
            if upstream.headers.get("Content-Length") and "chunked" not in upstream.headers.get(
                "Transfer-Encoding", ""
            ):
                headers["Content-Length"] = upstream.headers["Content-Length"]
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except (ConnectionResetError, aiohttp.ClientConnectionError) as e:
                # Client gone (closing the upstream response tells vLLM to abort) or vLLM died mid-stream.
                log.info("%s %s: stream ended early: %r", request.method, path, e)
                return response
            await response.write_eof()
            return response

    return handler


async def health(request: web.Request) -> web.Response:
    """vLLM's /health through the sidecar: the vllm container's startup and liveness probes use it."""
    healthy = await request.app[ENGINE].healthy()
    return web.Response(status=200 if healthy else 503, text="ok\n" if healthy else "vLLM is not healthy\n")


async def ready(request: web.Request) -> web.Response:
    """The readiness probe: vLLM healthy and every desired adapter loaded (Failed ones excepted)."""
    ok, message = request.app[SYNCER].ready(await request.app[ENGINE].healthy())
    return web.Response(status=200 if ok else 503, text=message + "\n")


async def state(request: web.Request) -> web.Response:
    return web.json_response(request.app[SYNCER].state(), dumps=lambda o: json.dumps(o, indent=1))


def build_app(syncer: Syncer, engine: EngineClient) -> web.Application:
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app[SYNCER] = syncer
    app[ENGINE] = engine

    async def upstream_session(app: web.Application) -> Any:
        # No total timeout: a long generation streams for minutes. Bytes pass through as they are.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        connector = aiohttp.TCPConnector(limit=512)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False) as session:
            app[UPSTREAM] = session
            yield

    app.cleanup_ctx.append(upstream_session)
    for method, path in INFERENCE_ROUTES:
        app.router.add_route(method, path, _proxy(path))
    app.router.add_get(HEALTH, health)
    app.router.add_get(READY, ready)
    app.router.add_get(STATE, state)
    return app
