"""The adapter-sync sidecar: ``python -m lorafleet.serving.sync``.

Watches the desired adapter set (the mounted ConfigMap file), pulls each adapter from the artifact store with
checksum verification, checks it, loads it into vLLM on localhost, unloads removed ones, re-loads everything after
vLLM restarts, and serves the pod's serving port (the inference routes, /health, /lorafleet/ready) and its status
port (/lorafleet/state, for the operator only). See docs/serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from aiohttp import web

from lorafleet.contracts.serving import STATE_PORT
from lorafleet.serving.engine import EngineClient
from lorafleet.serving.gateway import Limits, build_app, build_status_app
from lorafleet.serving.syncer import PrepareFn, Syncer
from lorafleet.storage.scrub import install_log_filter

log = logging.getLogger("lorafleet.serving.sync")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lorafleet.serving.sync", description=__doc__.split("\n\n")[0])
    p.add_argument("--desired", type=Path, required=True, help="the desired adapter set (JSON, a ConfigMap file)")
    p.add_argument("--engine", required=True, help="vLLM's URL on localhost, e.g. http://127.0.0.1:8001")
    p.add_argument("--adapters-dir", type=Path, required=True, help="shared volume for the adapters' files")
    p.add_argument("--listen", default="0.0.0.0:8000", help="host:port of the gateway (default 0.0.0.0:8000)")
    p.add_argument(
        "--status-listen",
        default=f"0.0.0.0:{STATE_PORT}",
        help=f"host:port of /lorafleet/state, not behind the Service (default 0.0.0.0:{STATE_PORT})",
    )
    p.add_argument("--max-request-bytes", type=int, default=Limits.max_request_bytes, help="request body cap (413)")
    p.add_argument(
        "--upstream-read-timeout",
        type=float,
        default=Limits.read_timeout,
        help="seconds without a byte from vLLM before the gateway gives up on a request",
    )
    p.add_argument("--api-keys-dir", type=Path, help="mounted Secret volume: one file of keys per protected model")
    p.add_argument(
        "--protected-model",
        action="append",
        default=[],
        help="a model served only with one of its API keys (repeatable); no keys file: every request refused",
    )
    p.add_argument(
        "--store-credentials-dir",
        type=Path,
        help="mounted Secret volume with minted store keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "AWS_SESSION_TOKEN), read again whenever the kubelet renews it",
    )
    p.add_argument("--poll-interval", type=float, default=0.1, help="seconds between stats of the desired file")
    p.add_argument("--resync-interval", type=float, default=2.0, help="seconds between checks of vLLM")
    p.add_argument("--parallel-downloads", type=int, default=2, help="adapters downloaded at once")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace, prepare: PrepareFn | None = None) -> None:
    if prepare is None:
        from lorafleet.serving.fetch import StoreFetcher

        prepare = StoreFetcher(credentials_dir=args.store_credentials_dir)
    args.adapters_dir.mkdir(parents=True, exist_ok=True)
    engine = EngineClient(args.engine)
    syncer = Syncer(
        desired_file=args.desired,
        engine=engine,
        adapters_dir=args.adapters_dir.resolve(),
        prepare=prepare,
        poll_interval=args.poll_interval,
        resync_interval=args.resync_interval,
        max_parallel_downloads=args.parallel_downloads,
    )
    limits = Limits(max_request_bytes=args.max_request_bytes, read_timeout=args.upstream_read_timeout)
    app = build_app(
        syncer, engine, limits=limits, api_keys_dir=args.api_keys_dir, protected=frozenset(args.protected_model)
    )

    async def run_syncer(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(syncer.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await engine.close()

    app.cleanup_ctx.append(run_syncer)
    runner = web.AppRunner(app, access_log=None)
    status_runner = web.AppRunner(build_status_app(syncer), access_log=None)
    await runner.setup()
    await status_runner.setup()
    for r, listen in ((runner, args.listen), (status_runner, args.status_listen)):
        host, _, port = listen.rpartition(":")
        await web.TCPSite(r, host or "0.0.0.0", int(port)).start()
    log.info(
        "gateway on %s, state on %s, vLLM at %s, desired set %s, %d protected models",
        args.listen, args.status_listen, args.engine, args.desired, len(args.protected_model),
    )  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("stopping: finishing requests in flight")
    finally:
        await status_runner.cleanup()
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    install_log_filter()  # a store error may carry a credential value: no log line does
    try:  # uvloop (vLLM's image has it) roughly halves the proxy's CPU per request; asyncio's loop otherwise.
        import uvloop

        uvloop.run(serve(args))
    except ImportError:
        asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
