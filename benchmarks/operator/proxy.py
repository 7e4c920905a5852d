"""A counting reverse proxy in front of the Kubernetes API server: one per operator under test.

    python benchmarks/operator/proxy.py --port 18080 --upstream https://127.0.0.1:6443 \
        --ca ca.crt --cert admin.crt --key admin.key

The operator's kubeconfig points at ``http://127.0.0.1:<port>`` (plain HTTP on loopback); the proxy forwards
every request unchanged (method, path, query, body, content type, user agent) to the API server over TLS with
the cluster admin's client certificate, and streams the response back chunk by chunk (watches included, bytes
passed through compressed or not). Before forwarding it counts the request under ``"<verb> <resource>"``:

* verbs as the API server's audit log names them: get, list, watch, create, update, patch, delete,
  deletecollection, plus ``apply`` for a PATCH with ``application/apply-patch+yaml`` (server-side apply);
* resource: the plural, with its subresource (``finetunejobs/status``); discovery and other non-resource
  paths count as ``get /version``, ``get /apis``...

``GET /_bench/counts`` (answered by the proxy itself, never forwarded) returns the counters so far as JSON:
``{"counts": {"watch jobs": 1, ...}, "requests": total, "in_flight": n}``.
"""

from __future__ import annotations

import argparse
import collections
import ssl
from urllib.parse import parse_qs

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

WRITE_VERBS = ("create", "update", "patch", "apply", "delete", "deletecollection")
# Hop-by-hop headers (RFC 9110 7.6.1) and those the proxy recomputes.
_SKIP_REQUEST = {"host", "connection", "keep-alive", "transfer-encoding", "content-length", "authorization", "te"}
_SKIP_RESPONSE = {"connection", "keep-alive", "transfer-encoding", "content-length"}


def classify(method: str, path: str, query: str, content_type: str = "") -> str:
    """``"<verb> <resource>"`` of one API request (pure; unit-checked in run.py's self-test)."""
    parts = [p for p in path.split("/") if p]
    params = parse_qs(query)
    if not parts or parts[0] not in ("api", "apis"):
        return f"{method.lower()} /{'/'.join(parts[:1])}"
    # /api/v1/... or /apis/<group>/<version>/...
    rest = parts[2:] if parts[0] == "api" else parts[3:]
    watch_path = bool(rest) and rest[0] == "watch"
    if watch_path:
        rest = rest[1:]
    if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize"):
        rest = rest[2:]  # /namespaces/<ns>/<plural>[/<name>[/<sub>]]; else a Namespace object itself
    if not rest:
        return f"{method.lower()} /{'/'.join(parts[:3])}"  # discovery of a group version
    resource = rest[0]
    named = len(rest) >= 2
    if len(rest) >= 3:
        resource = f"{resource}/{rest[2]}"
    m = method.upper()
    if m == "GET":
        watching = watch_path or params.get("watch", ["false"])[0] in ("true", "1")
        verb = "watch" if watching else ("get" if named else "list")
    elif m == "POST":
        verb = "create"
    elif m == "PUT":
        verb = "update"
    elif m == "PATCH":
        verb = "apply" if "apply-patch" in content_type else "patch"
    elif m == "DELETE":
        verb = "delete" if named else "deletecollection"
    else:
        verb = m.lower()
    return f"{verb} {resource}"


class CountingProxy:
    def __init__(self, upstream: str, ssl_context: ssl.SSLContext) -> None:
        self.upstream = upstream.rstrip("/")
        self.ssl = ssl_context
        self.counts: collections.Counter[str] = collections.Counter()
        self.in_flight = 0
        self.session: ClientSession | None = None

    async def start(self, _: web.Application) -> None:
        # No limit on connections: every watch holds one for minutes. No timeouts: watches end server-side.
        self.session = ClientSession(
            connector=TCPConnector(limit=0, ssl=self.ssl),
            timeout=ClientTimeout(total=None, sock_read=None, sock_connect=30),
            auto_decompress=False,
        )

    async def stop(self, _: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    async def counts_view(self, _: web.Request) -> web.Response:
        return web.json_response(
            {"counts": dict(self.counts), "requests": sum(self.counts.values()), "in_flight": self.in_flight}
        )

    async def forward(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        key = classify(request.method, request.path, request.query_string, request.headers.get("Content-Type", ""))
        self.counts[key] += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP_REQUEST}
        body = await request.read()
        self.in_flight += 1
        try:
            async with self.session.request(
                request.method,
                self.upstream + request.path_qs,
                headers=headers,
                data=body or None,
                # Forward exactly what came: aiohttp would label a body without Content-Type (the official
                # client's create calls send none) application/octet-stream, which the API server refuses (415).
                skip_auto_headers=("Content-Type", "User-Agent", "Accept-Encoding"),
            ) as upstream:
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for name, value in upstream.headers.items():
                    if name.lower() not in _SKIP_RESPONSE:
                        response.headers.add(name, value)
                await response.prepare(request)
                try:
                    async for chunk in upstream.content.iter_any():
                        await response.write(chunk)
                    await response.write_eof()
                except ConnectionResetError:
                    pass  # the client went away (a watch it closed): drop the upstream stream with it
                return response
        finally:
            self.in_flight -= 1


def ssl_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(cert, key)
    return ctx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="loopback port to listen on (plain HTTP)")
    parser.add_argument("--upstream", required=True, help="the API server, https://127.0.0.1:<port>")
    parser.add_argument("--ca", required=True, help="CA bundle that signed the API server's certificate")
    parser.add_argument("--cert", required=True, help="client certificate used upstream")
    parser.add_argument("--key", required=True, help="its private key")
    args = parser.parse_args()

    proxy = CountingProxy(args.upstream, ssl_context(args.ca, args.cert, args.key))
    app = web.Application(client_max_size=64 * 2**20)
    app.on_startup.append(proxy.start)
    app.on_cleanup.append(proxy.stop)
    app.router.add_get("/_bench/counts", proxy.counts_view)
    app.router.add_route("*", "/{tail:.*}", proxy.forward)
    # SIGTERM and SIGINT stop it (aiohttp's handlers); open watches are cut after a second.
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None, shutdown_timeout=1.0)


if __name__ == "__main__":
    main()
