"""The serving gateway's admission, on the real sidecar process in front of a small real HTTP upstream standing in
for vLLM (the gateway forwards to any URL; the vLLM tests are in test_serving_sidecar.py).

Invariants (issue 15, point 6): /lorafleet/state is not served on the serving port, only on the status port; a
protected adapter answers 401 without its key or with a wrong one and 200 with it, and its key never reaches the
upstream or the sidecar's log; a protected adapter without keys is refused to everyone (503); bodies over the
cap get 413 whether or not they declare their length, before anything reaches the upstream; an upstream that
sends nothing gets the client a 504 after the read timeout.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from lorafleet_dev.vllm_local import SidecarServer, desired_set, http_get, write_desired

pytestmark = pytest.mark.integration

KEY = "sk-team-a-7f3a9c"
CAP = 64 * 1024
READ_TIMEOUT = 2.0


class _Upstream(BaseHTTPRequestHandler):
    """vLLM as far as the gateway and the syncer see it: /health, /v1/models, and completions that echo what
    arrived (the model, the Authorization header, the body size). Model "slow" answers after READ_TIMEOUT * 2."""

    seen: list[dict[str, Any]] = []
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, {})
        elif self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "base", "root": "/models/base", "parent": None}]})
        else:
            self._send(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        request = json.loads(body or b"{}")
        seen = {"model": request.get("model"), "authorization": self.headers.get("Authorization"), "bytes": len(body)}
        _Upstream.seen.append(seen)
        if request.get("model") == "slow":
            time.sleep(READ_TIMEOUT * 2)
        self._send(200, {"object": "text_completion", "model": request.get("model"), "choices": [{"text": "ok"}]})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def sidecar(upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarServer]:
    root = tmp_path_factory.mktemp("gateway-guard")
    desired = root / "desired" / "adapters.json"
    write_desired(desired, desired_set("base", []))
    keys = root / "api-keys"
    keys.mkdir()
    (keys / "secret-bot").write_text(KEY + "\n")  # as the Secret volume holds it
    server = SidecarServer(
        log_path=root / "sidecar.log",
        desired_file=desired,
        engine_url=upstream,
        adapters_dir=root / "adapters",
        extra_args=[
            f"--api-keys-dir={keys}",
            "--protected-model=secret-bot",
            "--protected-model=keyless-bot",  # protected, but its Secret is missing
            f"--max-request-bytes={CAP}",
            f"--upstream-read-timeout={READ_TIMEOUT}",
        ],
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _post(url: str, payload: dict[str, Any] | bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        conn.request(
            "POST", "/v1/completions", body=body, headers={"Content-Type": "application/json", **(headers or {})}
        )
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw.startswith(b"{") else raw
    finally:
        conn.close()


def test_state_is_served_on_the_status_port_only(sidecar: SidecarServer) -> None:
    status, _ = http_get(sidecar.url + "/lorafleet/state")
    assert status == 404
    status, body = http_get(sidecar.state_url + "/lorafleet/state")
    assert status == 200 and json.loads(body)["engine"]["url"]
    # The status port serves nothing else: no proxying there.
    assert http_get(sidecar.state_url + "/v1/models")[0] == 404
    assert http_get(sidecar.url + "/v1/models")[0] == 200


def test_a_protected_adapter_needs_its_key(sidecar: SidecarServer) -> None:
    _Upstream.seen.clear()
    status, body = _post(sidecar.url, {"model": "secret-bot", "prompt": "hi"})
    assert status == 401 and body["error"]["type"] == "Unauthorized", body
    assert "Authorization: Bearer" in body["error"]["message"]
    status, body = _post(sidecar.url, {"model": "secret-bot", "prompt": "hi"}, {"Authorization": "Bearer nope"})
    assert status == 401 and "not valid" in body["error"]["message"], body
    assert _Upstream.seen == []  # refused before the upstream

    status, body = _post(sidecar.url, {"model": "secret-bot", "prompt": "hi"}, {"Authorization": f"Bearer {KEY}"})
    assert status == 200 and body["model"] == "secret-bot", body
    assert _Upstream.seen == [{"model": "secret-bot", "authorization": None, "bytes": _Upstream.seen[0]["bytes"]}]

    # The base model and unprotected adapters need no key (and their headers pass through untouched).
    status, _ = _post(sidecar.url, {"model": "base", "prompt": "hi"}, {"Authorization": "Bearer for-vllm"})
    assert status == 200 and _Upstream.seen[-1]["authorization"] == "Bearer for-vllm"

    # The same model named twice (parsers disagree on which wins) is refused.
    status, body = _post(sidecar.url, b'{"model": "base", "model": "secret-bot"}')
    assert status == 400 and "duplicate" in body["error"]["message"], body
    assert KEY not in sidecar.log_tail(1000)


def test_a_protected_adapter_without_keys_is_refused_to_everyone(sidecar: SidecarServer) -> None:
    status, body = _post(sidecar.url, {"model": "keyless-bot", "prompt": "hi"}, {"Authorization": f"Bearer {KEY}"})
    assert status == 503 and "apiKeySecretRef" in body["error"]["message"], body


def test_bodies_over_the_cap_get_413(sidecar: SidecarServer) -> None:
    _Upstream.seen.clear()
    big = {"model": "base", "prompt": "x" * CAP}
    status, body = _post(sidecar.url, big)
    assert status == 413 and body["error"]["code"] == 413 and f"{CAP} bytes" in body["error"]["message"], body

    # Chunked: no Content-Length to refuse up front; cut off once the cap is passed.
    host, port = sidecar.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        chunks = iter([b'{"model": "base", "prompt": "', *([b"x" * 8192] * 16), b'"}'])
        conn.request("POST", "/v1/completions", body=chunks, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413, resp.read()
    finally:
        conn.close()
    assert _Upstream.seen == []

    status, _ = _post(sidecar.url, {"model": "base", "prompt": "x" * (CAP // 2)})
    assert status == 200 and _Upstream.seen[-1]["bytes"] > CAP // 2


def test_a_silent_upstream_gets_504_after_the_read_timeout(sidecar: SidecarServer) -> None:
    started = time.monotonic()
    status, body = _post(sidecar.url, {"model": "slow", "prompt": "hi"})
    elapsed = time.monotonic() - started
    assert status == 504 and body["error"]["type"] == "GatewayTimeout", body
    # The 504 itself shows the gateway gave up before the upstream's answer (due at 2 x READ_TIMEOUT); no upper
    # bound on the wall time, which a loaded machine stretches.
    assert elapsed >= READ_TIMEOUT, elapsed


def test_state_port_answers_while_requests_are_refused(sidecar: SidecarServer) -> None:
    assert sidecar.state()["desired"]["error"] is None
