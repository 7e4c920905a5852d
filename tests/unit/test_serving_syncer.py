"""The sidecar's reconciler, pass by pass, against an in-memory engine that behaves like vLLM's LoRA routes
(the real vLLM is in tests/integration/test_serving_sidecar.py). Covers the paths that are slow or awkward to
provoke there: the kubelet's symlink swap, a bad desired file, store outages, refused replacements, adapters
loaded by someone else."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from lorafleet.contracts.serving import AdapterReason as Reason
from lorafleet.contracts.serving import DesiredAdapter, DesiredAdapterSet
from lorafleet.serving import syncer as syncer_module
from lorafleet.serving.checks import Refusal
from lorafleet.serving.engine import EngineModel, EngineUnavailable, LoadResult
from lorafleet.serving.syncer import Prepared, Syncer

BASE = "base"


class FakeEngine:
    """vLLM's /health, /v1/models and runtime LoRA routes, in memory."""

    base_url = "http://fake"

    def __init__(self) -> None:
        self.up = True
        self.loras: dict[str, str] = {}  # name -> path
        self.calls: list[tuple[str, str]] = []
        self.refuse: dict[str, tuple[int, str]] = {}  # path -> (status, message)

    async def healthy(self) -> bool:
        return self.up

    async def models(self) -> list[EngineModel]:
        if not self.up:
            raise EngineUnavailable("down")
        return [EngineModel(BASE, "/models/base", None)] + [EngineModel(n, p, BASE) for n, p in self.loras.items()]

    async def load(self, name: str, path: str, *, inplace: bool = False) -> LoadResult:
        if not self.up:
            raise EngineUnavailable("down")
        self.calls.append(("load_inplace" if inplace else "load", name))
        if path in self.refuse:
            status, message = self.refuse[path]
            return LoadResult(False, status, message)
        if name in self.loras and not inplace:
            return LoadResult(False, 400, f"The lora adapter '{name}' has already been loaded.")
        self.loras[name] = path
        return LoadResult(True, 200, "Success")

    async def unload(self, name: str) -> LoadResult:
        self.calls.append(("unload", name))
        if self.loras.pop(name, None) is None:
            return LoadResult(False, 404, "cannot be found")
        return LoadResult(True, 200, "Success")

    def restart(self) -> None:
        self.loras.clear()


class FakeStore:
    """The prepare function: adapters by uri; a Refusal to refuse; 'down' while the store is unreachable."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.down = False
        self.refusals: dict[str, Refusal] = {}
        self.pulls: list[str] = []

    def __call__(self, want: DesiredAdapter, desired: DesiredAdapterSet, adapters_dir: Path) -> Prepared | Refusal:
        if self.down:
            return Refusal(Reason.STORE_UNAVAILABLE, "could not reach the store")
        if want.uri in self.refusals:
            return self.refusals[want.uri]
        self.pulls.append(want.uri)
        digest = want.digest or "sha256:" + want.uri.encode().hex()[:64].ljust(64, "0")
        path = adapters_dir / want.name / digest.removeprefix("sha256:")
        path.mkdir(parents=True, exist_ok=True)
        (path / "adapter_config.json").write_text("{}")
        return Prepared(digest, path)


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.desired_file = tmp_path / "desired" / "adapters.json"
        self.engine = FakeEngine()
        self.store = FakeStore(tmp_path)
        self.adapters_dir = tmp_path / "adapters"
        self.adapters_dir.mkdir()
        self.syncer = Syncer(
            desired_file=self.desired_file,
            engine=self.engine,  # type: ignore[arg-type]
            adapters_dir=self.adapters_dir,
            prepare=self.store,
        )

    def write(self, adapters: list[tuple[str, str]], **kw: Any) -> None:
        desired = {"baseModel": BASE, "maxLoraRank": 16, **kw, "adapters": [{"name": n, "uri": u} for n, u in adapters]}
        self.desired_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.desired_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(desired))
        os.replace(tmp, self.desired_file)

    async def settle(self, passes: int = 4) -> dict[str, dict[str, Any]]:
        """Read the file and run passes, letting the prepare threads finish in between."""
        self.syncer.read_desired()
        for _ in range(passes):
            await self.syncer.reconcile()
            tasks = [a.task for a in self.syncer.adapters.values() if a.task is not None]
            if tasks:
                await asyncio.wait(tasks)
            await asyncio.sleep(0)
        await self.syncer.reconcile()
        return {a["name"]: a for a in self.syncer.state()["adapters"]}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_load_replace_unload(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        h.write([("a", "s3://b/a/v1"), ("b", "s3://b/b/v1")])
        states = await h.settle()
        assert {n: s["state"] for n, s in states.items()} == {"a": "Loaded", "b": "Loaded"}
        assert h.syncer.ready(True) == (True, "serving 2 adapters")
        old = Path(states["a"]["path"])

        h.write([("a", "s3://b/a/v2"), ("b", "s3://b/b/v1")])
        states = await h.settle()
        assert states["a"]["state"] == "Loaded" and states["a"]["uri"] == "s3://b/a/v2"
        # Loaded beside the old version under another name, routed to, then the old one unloaded: no gap, and
        # never load_inplace (vLLM 0.32 would re-read the adapter at every step).
        alias = "a@" + Path(states["a"]["path"]).name[:12]
        assert h.engine.calls[-2:] == [("load", alias), ("unload", "a")]
        assert not any(c[0] == "load_inplace" for c in h.engine.calls)
        assert h.engine.loras == {alias: states["a"]["path"], "b": states["b"]["path"]}
        assert h.syncer.routes.engine_name("a") == alias
        assert not old.exists()

        # The next version takes the plain name again, freed by the unload.
        h.write([("a", "s3://b/a/v3"), ("b", "s3://b/b/v1")])
        states = await h.settle()
        assert states["a"]["state"] == "Loaded" and h.engine.calls[-2:] == [("load", "a"), ("unload", alias)]
        assert h.syncer.routes.engine_name("a") == "a" and h.engine.loras["a"] == states["a"]["path"]

        h.write([("b", "s3://b/b/v1")])
        states = await h.settle()
        assert set(states) == {"b"} and "a" not in h.engine.loras
        assert not (h.adapters_dir / "a").exists()

    run(scenario())


def test_old_version_unloaded_only_after_its_requests_end(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        h.write([("a", "s3://b/a/v1")])
        old_path = (await h.settle())["a"]["path"]
        in_flight = h.syncer.routes.enter()  # a request the gateway routed to v1 ("a")

        h.write([("a", "s3://b/a/v2")])
        states = await h.settle()
        alias = h.syncer.routes.engine_name("a")
        assert states["a"]["state"] == "Loaded" and alias != "a" and h.engine.loras[alias] == states["a"]["path"]
        assert h.engine.loras["a"] == old_path and Path(old_path).is_dir()  # still answering that request

        h.syncer.routes.leave(in_flight)
        await h.settle()
        assert set(h.engine.loras) == {alias} and not Path(old_path).exists()

    run(scenario())


def test_kubelet_symlink_swap_and_a_bad_file(tmp_path: Path) -> None:
    """The kubelet writes a new timestamped folder and swaps the ..data symlink; the file path stays the same."""

    async def scenario() -> None:
        h = Harness(tmp_path)
        mount = tmp_path / "mount"
        mount.mkdir()

        def publish(version: str, content: str) -> None:
            (mount / version).mkdir()
            (mount / version / "adapters.json").write_text(content)
            link = mount / "..data_tmp"
            link.symlink_to(version)
            os.replace(link, mount / "..data")

        publish(
            "..v1",
            json.dumps({"baseModel": BASE, "maxLoraRank": 16, "adapters": [{"name": "a", "uri": "s3://b/a/v1"}]}),
        )
        (mount / "adapters.json").symlink_to("..data/adapters.json")
        h.syncer.desired_file = mount / "adapters.json"
        assert h.syncer.read_desired() is True
        assert h.syncer.read_desired() is False  # unchanged
        publish(
            "..v2",
            json.dumps({"baseModel": BASE, "maxLoraRank": 16, "adapters": [{"name": "c", "uri": "s3://b/c/v1"}]}),
        )
        assert h.syncer.read_desired() is True
        assert list(h.syncer.adapters) == ["c"]

        publish("..v3", "{broken")
        assert h.syncer.read_desired() is False
        assert list(h.syncer.adapters) == ["c"]  # the last good set stays
        assert "not a valid desired adapter set" in (h.syncer.state()["desired"]["error"] or "")

        publish(
            "..v4",
            json.dumps(
                {
                    "baseModel": BASE,
                    "maxLoraRank": 16,
                    "adapters": [{"name": "c", "uri": "s3://b/c/v1"}, {"name": "c", "uri": "s3://b/c/v2"}],
                }
            ),
        )
        assert h.syncer.read_desired() is False
        assert "twice" in (h.syncer.desired_error or "")

    run(scenario())


def test_missing_desired_file_is_not_ready(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    assert h.syncer.read_desired() is False
    ok, message = h.syncer.ready(True)
    assert not ok and "does not exist" in message


def test_store_outage_waits_then_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(syncer_module, "RETRY_MIN_S", 0.0)

    async def scenario() -> None:
        h = Harness(tmp_path)
        h.store.down = True
        h.write([("a", "s3://b/a/v1")])
        states = await h.settle(passes=1)
        assert states["a"]["state"] == "Pending" and states["a"]["reason"] == Reason.STORE_UNAVAILABLE
        assert "retrying" in states["a"]["message"]
        assert h.syncer.ready(True)[0] is False  # a pending adapter holds the pod out of the Service

        h.store.down = False
        states = await h.settle()
        assert states["a"]["state"] == "Loaded"

    run(scenario())


def test_a_refused_replacement_unloads_the_old_version(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        h.write([("a", "s3://b/a/v1"), ("b", "s3://b/b/v1")])
        await h.settle()
        h.store.refusals["s3://b/a/v2"] = Refusal(Reason.RANK_EXCEEDS_MAX, "rank 32 > 16")
        h.write([("a", "s3://b/a/v2"), ("b", "s3://b/b/v1")])
        states = await h.settle()
        assert states["a"]["state"] == "Failed" and states["a"]["reason"] == Reason.RANK_EXCEEDS_MAX
        assert "a" not in h.engine.loras  # never serve a version other than the desired one
        assert states["b"]["state"] == "Loaded"
        assert h.syncer.ready(True)[0] is True  # a Failed adapter does not hold the pod out
        pulls = len(h.store.pulls)
        await h.settle()
        assert len(h.store.pulls) == pulls  # permanent: not retried until the desired set changes

    run(scenario())


def test_engine_refusal_is_classified(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        h.write([("a", "s3://b/a/v1")])
        h.syncer.read_desired()
        prepared = h.store(h.syncer.adapters["a"].want, h.syncer.desired, h.adapters_dir)  # type: ignore[arg-type]
        assert isinstance(prepared, Prepared)
        h.engine.refuse[str(prepared.path)] = (400, "While loading x, expected target modules in [] but received")
        states = await h.settle()
        assert states["a"]["state"] == "Failed" and states["a"]["reason"] == Reason.UNSUPPORTED_TARGET_MODULES

    run(scenario())


def test_engine_restart_reloads_and_never_reports_loaded_while_down(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        h.write([("a", "s3://b/a/v1"), ("b", "s3://b/b/v1")])
        await h.settle()
        h.engine.up = False
        h.engine.restart()
        states = await h.settle(passes=1)
        assert {s["state"] for s in states.values()} == {"Pending"}
        assert h.syncer.ready(False)[0] is False
        h.engine.up = True
        states = await h.settle()
        assert {s["state"] for s in states.values()} == {"Loaded"}
        assert h.syncer.engine_restarts == 1
        pulls = len(h.store.pulls)
        # A restart vLLM's /health did not show (both adapters silently gone): the next pass reloads them.
        h.engine.restart()
        states = await h.settle()
        assert {s["state"] for s in states.values()} == {"Loaded"}
        assert len(h.store.pulls) == pulls  # from the files already on disk
        assert h.syncer.lost_adapters == 2

    run(scenario())


def test_adapters_loaded_by_others_are_left_alone(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        h.engine.loras["static"] = "/somewhere/else"  # e.g. --lora-modules in extraArgs
        h.write([("a", "s3://b/a/v1")])
        await h.settle()
        assert "static" in h.engine.loras
        assert ("unload", "static") not in h.engine.calls

    run(scenario())


def test_a_changed_rank_limit_rechecks_every_adapter(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        h.write([("a", "s3://b/a/v1")])
        await h.settle()
        pulls = len(h.store.pulls)
        h.write([("a", "s3://b/a/v1")], maxLoraRank=8)
        states = await h.settle()
        assert len(h.store.pulls) == pulls + 1
        assert states["a"]["state"] == "Loaded"

    run(scenario())


def test_an_engine_serving_another_base_model_gets_no_adapters(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        h.write([("a", "s3://b/a/v1")], baseModel="other-base")
        states = await h.settle()
        assert states["a"]["state"] != "Loaded"
        assert h.engine.loras == {}
        ok, message = h.syncer.ready(True)
        assert not ok and "other-base" in message

    run(scenario())


def test_an_added_adapter_does_not_take_a_serving_pod_out_of_the_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the first full set the pod waits (the Service must not route to a pod missing adapters); after
    it, an added adapter loads while the pod stays ready; a vLLM restart starts over."""
    monkeypatch.setattr(syncer_module, "RETRY_MIN_S", 0.0)

    async def scenario() -> None:
        h = Harness(tmp_path)
        h.store.down = True
        h.write([("a", "s3://b/a/v1")])
        await h.settle(passes=1)
        assert h.syncer.ready(True)[0] is False
        h.store.down = False
        await h.settle()
        assert h.syncer.ready(True) == (True, "serving 1 adapters")

        h.store.down = True  # the new adapter stays Pending
        h.write([("a", "s3://b/a/v1"), ("b", "s3://b/b/v1")])
        states = await h.settle(passes=1)
        assert states["b"]["state"] == "Pending"
        assert h.syncer.ready(True) == (True, "serving 1 adapters; loading b")

        assert h.syncer.ready(False)[0] is False  # vLLM unhealthy: out, and waiting again once back
        assert h.syncer.ready(True) == (False, "waiting for adapters: b")
        h.store.down = False
        await h.settle()
        assert h.syncer.ready(True) == (True, "serving 2 adapters")

    run(scenario())
