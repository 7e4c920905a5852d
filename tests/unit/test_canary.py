"""Canaries in the gateway (lorafleet.serving.routes) and its per-adapter counters (lorafleet.serving.metrics).

Invariants: a served name with versions 90/10 sends each request to one version with those odds (1,000 picks fall
within 5-sigma binomial bounds, so no fixed seed is needed); a version of weight 0 is never picked; only the
versions vLLM serves now get requests (all of them when none does); responses and /v1/models show the served name,
never a version's engine name; a version's engine name cannot be requested directly; the token counters read the
usage of JSON bodies and of a stream's usage chunk whatever the chunking, and count nothing they cannot read.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from lorafleet.contracts.serving import DesiredAdapter, DesiredAdapterSet, version_key
from lorafleet.serving.guard import parse_body
from lorafleet.serving.metrics import MAX_USAGE_BODY, ServingMetrics, Usage, UsageTap
from lorafleet.serving.routes import Routes, StreamRewriter, Version, internal_name, pick_version
from lorafleet.serving.syncer import served_names

V3, V4 = version_key("support-bot", "v3"), version_key("support-bot", "v4")
CANARY = [Version(V3, "v3", 90), Version(V4, "v4", 10)]


def _within_bounds(hits: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    return abs(hits - mean) <= sigmas * sd


def test_a_90_10_split_over_1000_requests_is_within_binomial_bounds() -> None:
    routes = Routes()
    routes.set_served({"support-bot": CANARY}, "base")
    routes.set_live([V3, V4])
    picks = Counter(t.version for t in (routes.target("support-bot") for _ in range(1000)) if t is not None)
    assert sum(picks.values()) == 1000
    assert _within_bounds(picks["v4"], 1000, 0.10), picks
    assert _within_bounds(picks["v3"], 1000, 0.90), picks


@pytest.mark.parametrize("draw", [0.0, 0.5, 0.899, 0.9, 0.999999])
def test_a_zero_weight_version_is_never_picked(draw: float) -> None:
    versions = [Version(V3, "v3", 100), Version(V4, "v4", 0)]
    assert pick_version(versions, [V3, V4], lambda: draw).label == "v3"
    assert pick_version(list(reversed(versions)), [V3, V4], lambda: draw).label == "v3"


def test_the_draw_maps_onto_the_weights() -> None:
    assert pick_version(CANARY, [V3, V4], lambda: 0.0).label == "v3"
    assert pick_version(CANARY, [V3, V4], lambda: 0.8999).label == "v3"
    assert pick_version(CANARY, [V3, V4], lambda: 0.9).label == "v4"
    assert pick_version(CANARY, [V3, V4], lambda: 0.99999).label == "v4"


def test_only_versions_vllm_serves_get_requests() -> None:
    # v4 still loading (or refused): every request goes to v3, whatever the draw.
    for draw in (0.0, 0.95, 0.9999):
        assert pick_version(CANARY, [V3], lambda d=draw: d).label == "v3"
        assert pick_version(CANARY, [V4], lambda d=draw: d).label == "v4"
    # None serves yet: the weights decide (vLLM answers 404 until one is loaded).
    assert pick_version(CANARY, [], lambda: 0.95).label == "v4"


def test_a_canary_request_is_sent_to_the_version_and_answered_under_the_served_name() -> None:
    routes = Routes()
    routes.set_served({"support-bot": CANARY, "sql": [Version("sql", "v1")]}, "base")
    routes.set_live([V3, V4, "sql"])
    body = b'{"model": "support-bot", "prompt": "hi"}'
    data, model = parse_body(body)
    assert model == "support-bot"
    target = routes.target(model, lambda: 0.95)
    assert target is not None and (target.served, target.version, target.engine_name) == ("support-bot", "v4", V4)
    new_body, rewriter = routes.rewrite_request(body, data, target)
    assert new_body is not None and json.loads(new_body) == {"model": V4, "prompt": "hi"}
    assert rewriter is not None
    answer = json.dumps({"model": V4, "choices": []}).encode()
    assert json.loads(rewriter.feed(answer) + rewriter.flush())["model"] == "support-bot"

    # A version being switched to answers under its alias: the rename follows.
    routes.route(V4, V4 + "@0123456789ab")
    target = routes.target("support-bot", lambda: 0.95)
    assert target is not None and target.engine_name == V4 + "@0123456789ab"

    # A plain adapter or the base model: no rename, no parse needed afterwards.
    sql = routes.target("sql")
    assert sql is not None and sql.engine_name == "sql"
    assert routes.rewrite_request(b'{"model":"sql"}', {"model": "sql"}, sql) == (b'{"model":"sql"}', None)
    assert routes.target("base") is None and routes.target("nope") is None


def test_models_list_a_canary_once_under_its_served_name() -> None:
    routes = Routes()
    routes.set_served({"support-bot": CANARY, "sql": [Version("sql", "v1")]}, "base")
    raw = json.dumps({"object": "list", "data": [
        {"id": "base", "parent": None},
        {"id": V3, "parent": "base", "root": "/adapters/v3"},
        {"id": V4, "parent": "base", "root": "/adapters/v4"},
        {"id": "sql", "parent": "base", "root": "/adapters/sql"},
    ]}).encode()  # fmt: skip
    ids = [c["id"] for c in json.loads(routes.rewrite_models(raw))["data"]]
    assert ids == ["base", "support-bot", "sql"]


def test_engine_names_are_internal() -> None:
    # The gateway answers these 404: asking for a version directly would skip the served name's API keys.
    assert internal_name(V4) and internal_name("chat@0123456789ab")
    assert not internal_name("support-bot") and not internal_name("tiny.v1_2")


def test_the_desired_set_gives_each_served_name_its_versions() -> None:
    store = "s3://b/fleet/adapters"
    desired = DesiredAdapterSet(
        base_model="base",
        max_lora_rank=16,
        adapters=[
            DesiredAdapter(name=V3, uri=f"{store}/bot/3", served_name="support-bot", version="v3", weight=90),
            DesiredAdapter(name=V4, uri=f"{store}/bot/4", served_name="support-bot", version="v4", weight=10),
            DesiredAdapter(name="sql", uri=f"{store}/sql/r7/"),
        ],
    )
    assert served_names(desired) == {"support-bot": CANARY, "sql": [Version("sql", "r7")]}
    # A set without canaries renders as before: no new keys.
    plain = DesiredAdapterSet(base_model="base", max_lora_rank=16, adapters=[DesiredAdapter(name="a", uri=store)])
    assert set(plain.render()["adapters"][0]) == {"name", "uri", "digest", "store"}


# -- usage and counters ----------------------------------------------------------------------------------


def _tap(content_type: str, body: bytes, cut: int) -> Usage | None:
    tap = UsageTap(content_type)
    for i in range(0, len(body), cut):
        tap.feed(body[i : i + cut])
    return tap.usage()


def test_usage_of_a_json_body() -> None:
    body = json.dumps({"model": "a", "usage": {"prompt_tokens": 7, "completion_tokens": 12}}).encode()
    for cut in (1, 5, len(body)):
        assert _tap("application/json", body, cut) == Usage(7, 12)
    embeddings = json.dumps({"usage": {"prompt_tokens": 4, "total_tokens": 4}}).encode()
    assert _tap("application/json; charset=utf-8", embeddings, 3) == Usage(4, 0)
    assert _tap("application/json", b'{"error": {"code": 404}}', 4) is None
    assert _tap("application/json", b"not json", 4) is None


def test_usage_of_a_stream_is_its_last_usage_chunk_whatever_the_chunking() -> None:
    events = [
        {"choices": [{"text": "a"}], "usage": None},
        {"choices": [{"text": "b"}]},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
    ]
    stream = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    for cut in range(1, 40):
        assert _tap("text/event-stream", stream, cut) == Usage(5, 2), cut
    assert _tap("text/event-stream", stream.replace(b"\n", b"\r\n"), 7) == Usage(5, 2)
    no_usage = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events[:2])
    assert _tap("text/event-stream", no_usage, 3) is None


def test_what_cannot_be_read_is_not_counted() -> None:
    huge = b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1}, "x": "' + b"a" * MAX_USAGE_BODY + b'"}'
    assert _tap("application/json", huge, 1 << 20) is None
    body = json.dumps({"usage": {"prompt_tokens": -3, "completion_tokens": "9"}}).encode()
    assert _tap("application/json", body, 8) == Usage(0, 0)
    assert _tap("text/plain", b'{"usage": {"prompt_tokens": 1}}', 4) is None


def test_counters_per_adapter_version_and_code() -> None:
    metrics = ServingMetrics()
    metrics.observe("support-bot", "v3", 200, Usage(10, 5))
    metrics.observe("support-bot", "v3", 200, Usage(1, 2))
    metrics.observe("support-bot", "v4", 500, None)
    text = metrics.exposition().decode()
    assert 'lorafleet_adapter_requests_total{adapter="support-bot",code="200",version="v3"} 2.0' in text
    assert 'lorafleet_adapter_requests_total{adapter="support-bot",code="500",version="v4"} 1.0' in text
    assert 'lorafleet_adapter_tokens_total{adapter="support-bot",kind="prompt",version="v3"} 11.0' in text
    assert 'lorafleet_adapter_tokens_total{adapter="support-bot",kind="completion",version="v3"} 7.0' in text
    assert 'version="v4",kind=' not in text and 'kind="prompt",version="v4"' not in text


def test_stream_rewriter_is_unchanged_by_canaries() -> None:
    r = StreamRewriter(V4, "support-bot")
    assert r.feed(b'{"model":"support-bot:v') + r.feed(b'4"}') + r.flush() == b'{"model":"support-bot"}'
