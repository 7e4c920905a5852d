"""The pod's serving port: a reverse proxy (aiohttp) that forwards the OpenAI inference routes to vLLM on
localhost, plus the sidecar's health and readiness; and the pod's status port, with the adapter state for the
operator, which the Service does not expose.

Routes are an allowlist matched exactly; the upstream URL is built from the matched route, never from the
request's path, so vLLM's runtime LoRA endpoints (/v1/load_lora_adapter, /v1/unload_lora_adapter, SageMaker's
/adapters) and its admin routes cannot be reached through the Service whatever the spelling of the path.

Before forwarding, a request is admitted by lorafleet.serving.guard: its body is read up to a cap (413) within a
deadline (408) and within a budget shared by all requests (503); a request for an adapter with API keys needs
one of them (401); a body with a duplicate key is refused (400), and so is a name only the sidecar gives vLLM
(404: a version being switched to, a canary's version). The request then goes to the version lorafleet.serving.routes
picks for its model (by weight, for a canary), and is counted per adapter and version (lorafleet.serving.metrics).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from lorafleet.contracts.serving import HEALTH_PATH, READY_PATH, STATE_PATH
from lorafleet.serving.engine import EngineClient
from lorafleet.serving.guard import BUSY, ApiKeys, BodyBudget, Refusal, body_too_large, parse_body
from lorafleet.serving.metrics import CONTENT_TYPE, METRICS_PATH, OTHER, UsageTap
from lorafleet.serving.routes import Routes, StreamRewriter, internal_name
from lorafleet.serving.syncer import Syncer

log = logging.getLogger("lorafleet.serving.gateway")

# (method, path) forwarded as they are; responses stream back (SSE included).
INFERENCE_ROUTES: tuple[tuple[str, str], ...] = (
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/embeddings"),
    ("GET", "/v1/models"),
)
HEALTH, READY, STATE = HEALTH_PATH, READY_PATH, STATE_PATH
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


@dataclass(frozen=True)
class Limits:
    """What one replica's gateway accepts (sidecar flags; the operator sets them from the AdapterDeployment)."""

    max_request_bytes: int = 8 * 1024 * 1024
    # All bodies held at once: the sidecar's memory limit is 1 GiB.
    max_buffered_bytes: int = 256 * 1024 * 1024
    body_timeout: float = 60.0  # seconds to receive a whole request body (slow senders hold memory)
    connect_timeout: float = 5.0
    # Seconds without a byte from vLLM: a non-streamed completion sends nothing until it is done.
    read_timeout: float = 600.0


SYNCER: web.AppKey[Syncer] = web.AppKey("syncer", Syncer)
ENGINE: web.AppKey[EngineClient] = web.AppKey("engine", EngineClient)
UPSTREAM: web.AppKey[aiohttp.ClientSession] = web.AppKey("upstream", aiohttp.ClientSession)
KEYS: web.AppKey[ApiKeys] = web.AppKey("keys", ApiKeys)
BUDGET: web.AppKey[BodyBudget] = web.AppKey("budget", BodyBudget)
LIMITS: web.AppKey[Limits] = web.AppKey("limits", Limits)


def _forward_headers(headers: Any, drop: frozenset[str] = frozenset()) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP and k.lower() not in drop}


def refuse(refusal: Refusal) -> web.Response:
    return web.json_response(refusal.body(), status=refusal.status, headers=dict(refusal.headers))


class _Refused(Exception):
    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal


async def _read_body(request: web.Request, limits: Limits, budget: BodyBudget) -> tuple[bytes, int]:
    """The whole body, within the cap, the deadline and the shared budget; returns (body, bytes reserved)."""
    declared = request.content_length
    if declared is not None and declared > limits.max_request_bytes:
        raise _Refused(body_too_large(limits.max_request_bytes))
    chunks: list[bytes] = []
    size = reserved = 0
    try:
        async with asyncio.timeout(limits.body_timeout):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limits.max_request_bytes:
                    raise _Refused(body_too_large(limits.max_request_bytes))
                if not budget.reserve(len(chunk)):
                    raise _Refused(BUSY)
                reserved += len(chunk)
                chunks.append(chunk)
    except TimeoutError:
        budget.release(reserved)
        raise _Refused(
            Refusal(408, "RequestTimeout", f"the request body did not arrive within {limits.body_timeout:g} s")
        ) from None
    except _Refused:
        budget.release(reserved)
        raise
    return b"".join(chunks), reserved


@dataclass
class _Outcome:
    """What the metrics record of one request: its adapter and version labels, and its response's usage."""

    adapter: str = OTHER
    version: str = ""
    tap: UsageTap | None = None


CLIENT_CLOSED = 499  # the client went away before the response started (nginx's code)


def _proxy(path: str) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        syncer = request.app[SYNCER]
        routes = syncer.routes
        # Counted until the response ends: the adapter version it was routed to is not unloaded meanwhile.
        generation = routes.enter()
        outcome = _Outcome()
        code = CLIENT_CLOSED
        try:
            response = await _forward(request, path, routes, outcome)
            code = response.status
            return response
        finally:
            routes.leave(generation)
            if request.method == "POST":
                usage = outcome.tap.usage() if outcome.tap is not None else None
                syncer.metrics.observe(outcome.adapter, outcome.version, code, usage)

    return handler


def _not_found(model: str) -> Refusal:
    return Refusal(404, "NotFoundError", f"The model `{model}` does not exist.")


async def _forward(request: web.Request, path: str, routes: Routes, outcome: _Outcome) -> web.StreamResponse:
    app = request.app
    engine, session, limits, budget, keys = app[ENGINE], app[UPSTREAM], app[LIMITS], app[BUDGET], app[KEYS]
    body: bytes | None = None
    rewriter: StreamRewriter | None = None
    reserved = 0
    try:
        if request.can_read_body:
            body, reserved = await _read_body(request, limits, budget)
        try:
            data, model = parse_body(body)
        except ValueError as e:
            return refuse(Refusal(400, "BadRequest", str(e)))
        if model is not None and model != routes.base_model and internal_name(model):
            return refuse(_not_found(model))  # never bypasses a served name's API keys or weights
        target = routes.target(model) if model is not None else None
        if target is not None:
            outcome.adapter, outcome.version = target.served, target.version
        elif model is not None and model == routes.base_model:
            outcome.adapter = model
        drop: frozenset[str] = frozenset()
        if keys.protected:
            refusal = keys.check(model, request.headers.get("Authorization"))
            if refusal is not None:
                log.info("%s %s: %s for model %r", request.method, path, refusal.type, model)
                return refuse(refusal)
            if model in keys.protected:
                drop = frozenset({"authorization"})  # the key was for us; vLLM never sees it
        # The served name -> the picked version's engine name (the body is unchanged when they are the same).
        body, rewriter = routes.rewrite_request(body, data, target)
        data = None
        try:
            upstream = await session.request(
                request.method,
                engine.base_url + path,
                params=request.query,
                data=body,
                headers=_forward_headers(request.headers, drop),
            )
        except TimeoutError as e:  # aiohttp's connect and read timeouts included
            log.warning("%s %s: vLLM did not answer in time: %r", request.method, path, e)
            return refuse(Refusal(504, "GatewayTimeout", f"the model server did not answer in time: {e!r}"))
        except (aiohttp.ClientError, OSError) as e:
            log.warning("%s %s: vLLM unreachable: %r", request.method, path, e)
            return refuse(Refusal(503, "ServiceUnavailable", f"the model server is not reachable: {e!r}"))
    except _Refused as e:
        return refuse(e.refusal)
    finally:
        # Sent (or refused): the body no longer counts against the budget; a long stream holds none of it.
        budget.release(reserved)
        body = None
    async with upstream:
        headers = _forward_headers(upstream.headers)
        if path == "/v1/models" and upstream.status == 200:
            # Each adapter once, under its public name (a switch in progress lists two versions).
            raw = routes.rewrite_models(await upstream.read())
            return web.Response(status=200, body=raw, headers=headers)
        if (
            rewriter is None
            and upstream.headers.get("Content-Length")
            and "chunked" not in upstream.headers.get("Transfer-Encoding", "")
        ):
            headers["Content-Length"] = upstream.headers["Content-Length"]
        tap = outcome.tap = UsageTap(upstream.headers.get("Content-Type")) if request.method == "POST" else None
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                if tap is not None:
                    tap.feed(chunk)
                await response.write(rewriter.feed(chunk) if rewriter else chunk)
            if rewriter:
                await response.write(rewriter.flush())
        except (ConnectionResetError, aiohttp.ClientConnectionError, TimeoutError) as e:
            # Client gone (closing the upstream response tells vLLM to abort), vLLM died mid-stream, or it
            # sent nothing for read_timeout seconds.
            log.info("%s %s: stream ended early: %r", request.method, path, e)
            return response
        await response.write_eof()
        return response


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


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SYNCER].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def build_app(
    syncer: Syncer,
    engine: EngineClient,
    *,
    limits: Limits | None = None,
    api_keys_dir: Path | None = None,
    protected: frozenset[str] = frozenset(),
) -> web.Application:
    """The serving port: inference routes, /health and /lorafleet/ready."""
    limits = limits or Limits()
    # The handlers read bodies themselves (_read_body); this only bounds aiohttp's own reads.
    app = web.Application(client_max_size=limits.max_request_bytes)
    app[SYNCER] = syncer
    app[ENGINE] = engine
    app[LIMITS] = limits
    app[BUDGET] = BodyBudget(limits.max_buffered_bytes)
    app[KEYS] = ApiKeys(api_keys_dir, protected)

    async def upstream_session(app: web.Application) -> Any:
        # No total timeout: a long generation streams for minutes; sock_read bounds the silence between bytes.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=limits.connect_timeout, sock_read=limits.read_timeout)
        connector = aiohttp.TCPConnector(limit=512)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False) as session:
            app[UPSTREAM] = session
            yield

    app.cleanup_ctx.append(upstream_session)
    for method, path in INFERENCE_ROUTES:
        app.router.add_route(method, path, _proxy(path))
    app.router.add_get(HEALTH, health)
    app.router.add_get(READY, ready)
    return app


def build_status_app(syncer: Syncer) -> web.Application:
    """The status port, for the operator only (not behind the Service; the NetworkPolicy admits the operator's
    namespace): /lorafleet/state names the adapters' URIs, digests and errors; /metrics counts each adapter's
    requests and tokens."""
    app = web.Application(client_max_size=1024)
    app[SYNCER] = syncer
    app.router.add_get(STATE, state)
    app.router.add_get(METRICS_PATH, metrics)
    return app
