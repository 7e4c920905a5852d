"""The gateway's route table for version switches (lorafleet.serving.routes): a request is routed to one engine
name and answered under the public one, whatever the chunking of the response; an old version is unloadable only
once every request routed before the switch has ended; a body whose model needs no renaming passes unchanged."""

from __future__ import annotations

import json

from lorafleet.serving.guard import parse_body
from lorafleet.serving.routes import Routes, StreamRewriter, Version, public_name, version_alias


def _routes(*names: str) -> Routes:
    routes = Routes()
    routes.set_served({n: [Version(n, "v1")] for n in names}, "base")
    return routes


def _rewrite(routes: Routes, body: bytes) -> tuple[bytes | None, StreamRewriter | None]:
    """What the gateway does: parse, pick the target of the model, rewrite."""
    data, model = parse_body(body)
    return routes.rewrite_request(body, data, routes.target(model) if model is not None else None)


def test_alias_names() -> None:
    alias = version_alias("chat", "sha256:" + "ab" * 32)
    assert alias == "chat@abababababab" and public_name(alias) == "chat" and public_name("chat") == "chat"


def test_no_alias_leaves_bodies_untouched() -> None:
    routes = _routes("chat", "other")
    body = b'{"model": "chat",  "prompt": "x"}'
    assert _rewrite(routes, body) == (body, None)
    routes.route("other", "other@123")
    assert _rewrite(routes, body) == (body, None)  # chat has no alias
    assert _rewrite(routes, b"not json") == (b"not json", None)
    assert _rewrite(routes, b'{"model": "base"}') == (b'{"model": "base"}', None)


def test_request_and_response_renamed() -> None:
    routes = _routes("chat")
    routes.route("chat", "chat@0123456789ab")
    body, rewriter = _rewrite(routes, b'{"model": "chat", "prompt": "hi"}')
    assert body is not None and json.loads(body) == {"model": "chat@0123456789ab", "prompt": "hi"}
    assert rewriter is not None
    stream = b'data: {"id":"1","model":"chat@0123456789ab","choices":[]}\n\ndata: {"model":"chat@0123456789ab"}\n\n'
    expected = stream.replace(b"chat@0123456789ab", b"chat")
    for cut in range(1, 12):  # every chunking, names cut anywhere
        r = StreamRewriter("chat@0123456789ab", "chat")
        out = b"".join(r.feed(stream[i : i + cut]) for i in range(0, len(stream), cut)) + r.flush()
        assert out == expected, cut


def test_models_list_each_adapter_once_under_its_public_name() -> None:
    routes = Routes()
    routes.route("chat", "chat@0123456789ab")
    raw = json.dumps({"object": "list", "data": [
        {"id": "base", "parent": None},
        {"id": "chat", "parent": "base", "root": "/adapters/chat/old"},
        {"id": "chat@0123456789ab", "parent": "base", "root": "/adapters/chat/new"},
        {"id": "other", "parent": "base", "root": "/adapters/other/v"},
    ]}).encode()  # fmt: skip
    cards = json.loads(routes.rewrite_models(raw))["data"]
    assert [(c["id"], c.get("root")) for c in cards] == [
        ("base", None), ("chat", "/adapters/chat/new"), ("other", "/adapters/other/v"),
    ]  # fmt: skip


def test_old_version_drains_before_it_may_be_unloaded() -> None:
    routes = Routes()
    before = routes.enter()  # routed to "chat" (no alias yet)
    routes.route("chat", "chat@0123456789ab")
    after = routes.enter()  # routed to the new version
    assert not routes.drained("chat")
    routes.leave(after)
    assert not routes.drained("chat")  # the request from before the switch is still running
    routes.leave(before)
    assert routes.drained("chat")
    assert routes.drained("chat@0123456789ab") is False  # never retired: retired now, drained once idle
    assert routes.drained("chat@0123456789ab")


def test_switch_back_to_the_plain_name() -> None:
    routes = _routes("chat")
    routes.route("chat", "chat@0123456789ab")
    routes.route("chat", "chat")
    assert routes.engine_name("chat") == "chat"
    assert _rewrite(routes, b'{"model": "chat"}') == (b'{"model": "chat"}', None)
    assert routes.drained("chat@0123456789ab")
    routes.forget("chat")
    assert routes.engine_name("chat") == "chat"
