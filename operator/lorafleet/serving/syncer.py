"""The reconciler of the adapter-sync sidecar: makes vLLM serve exactly the desired adapter set.

Level-based: every pass compares the desired set (the mounted ConfigMap file) with what vLLM lists in
/v1/models and acts on the difference, so a vLLM restart (which forgets runtime-loaded adapters), a lost
adapter or a missed change is repaired by the next pass without special cases.

Per adapter: read the stored manifest (digest pin, base model, file formats: refused before any download), pull
it with checksum verification into ``<adapters-dir>/<name>/<digest hex>`` (a folder per version: vLLM's
/v1/models reports it as the adapter's ``root``, which is how a loaded adapter is matched by digest), check
adapter_config.json (rank, target modules, plain LoRA), then ``POST /v1/load_lora_adapter``. A new version of a
loaded adapter is downloaded, checked and loaded under another engine name while the old one serves; the gateway's
route is switched (lorafleet.serving.routes) and the old version unloaded once its requests are done: no gap, and
no ``load_inplace`` (vLLM 0.32 then re-reads the adapter at every engine step, vllm issue 33791).
Removed adapters are unloaded and their files deleted. Downloads run in threads, several at once; one failing
adapter never holds up the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.contracts.serving import (
    FAILED,
    LOADED,
    LOADING,
    PENDING,
    AdapterState,
    DesiredAdapter,
    DesiredAdapterSet,
    DesiredFileState,
    EngineState,
    ReplicaAdapter,
    ReplicaState,
)
from lorafleet.serving.checks import (
    Reason,
    Refusal,
    classify_engine_error,
)
from lorafleet.serving.engine import EngineClient, EngineModel, EngineUnavailable
from lorafleet.serving.metrics import ServingMetrics
from lorafleet.serving.routes import Routes, Version, public_name, version_alias

log = logging.getLogger("lorafleet.serving.sync")

RETRY_MIN_S, RETRY_MAX_S = 5.0, 300.0


def _now() -> float:
    return time.time()


def _rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@dataclass(frozen=True)
class Prepared:
    """An adapter version downloaded, verified and checked: ready for vLLM."""

    digest: str
    path: Path


# One adapter's versions in vLLM: engine name -> its /v1/models entry.
Served = dict[str, EngineModel]
PrepareFn = Callable[[DesiredAdapter, DesiredAdapterSet, Path], "Prepared | Refusal"]


@dataclass
class Adapter:
    """What the sidecar knows of one desired adapter."""

    want: DesiredAdapter
    state: AdapterState = PENDING
    reason: str | None = None
    message: str | None = None
    prepared: Prepared | None = None
    refusal: Refusal | None = None
    failures: int = 0
    retry_at: float = 0.0
    task: asyncio.Task[Prepared | Refusal] | None = None
    since: float = field(default_factory=_now)
    loaded_at: float | None = None
    load_seconds: float | None = None
    prepare_started: float | None = None
    prepare_seconds: float | None = None

    @property
    def key(self) -> tuple[str, str | None, str]:
        return _key(self.want)

    def set(self, state: AdapterState, reason: str | None, message: str | None) -> None:
        if (state, reason, message) != (self.state, self.reason, self.message):
            if state != self.state:
                self.since = _now()
                log.info("adapter %s: %s -> %s (%s) %s", self.want.name, self.state, state, reason, message or "")
            self.state, self.reason, self.message = state, reason, message

    def report(self) -> ReplicaAdapter:
        return ReplicaAdapter(
            name=self.want.name,
            state=self.state,
            reason=self.reason,
            message=self.message,
            uri=self.want.uri,
            # The digest being served (or prepared); the pin when nothing is known yet.
            digest=self.prepared.digest if self.prepared else self.want.digest,
            desired_digest=self.want.digest,
            path=str(self.prepared.path) if self.prepared else None,
            since=_rfc3339(self.since),
            loaded_at=_rfc3339(self.loaded_at),
            download_seconds=round(self.prepare_seconds, 4) if self.prepare_seconds is not None else None,
            load_seconds=round(self.load_seconds, 4) if self.load_seconds is not None else None,
        )


def _key(want: DesiredAdapter) -> tuple[str, str | None, str]:
    store = want.store.model_dump_json() if want.store is not None else ""
    return (want.uri, want.digest, store)


def version_label(want: DesiredAdapter) -> str:
    """The metrics' version label: a canary's version name, else the version folder's name (the URI's last part)."""
    return want.version or want.uri.rstrip("/").rsplit("/", 1)[-1]


def served_names(desired: DesiredAdapterSet) -> dict[str, list[Version]]:
    """Served name -> the versions answering it, in the desired set's order."""
    served: dict[str, list[Version]] = {}
    for want in desired.adapters:
        served.setdefault(want.public_name, []).append(Version(want.name, version_label(want), want.weight))
    return served


def _backoff(failures: int) -> float:
    return float(min(RETRY_MAX_S, RETRY_MIN_S * 2 ** max(0, failures - 1)))


class Syncer:
    """Owns the adapter states; ``run()`` is the loop, ``state()``/``ready()`` feed the gateway."""

    def __init__(
        self,
        *,
        desired_file: Path,
        engine: EngineClient,
        adapters_dir: Path,
        prepare: PrepareFn,
        poll_interval: float = 0.1,
        resync_interval: float = 2.0,
        max_parallel_downloads: int = 2,
    ) -> None:
        self.desired_file = desired_file
        self.engine = engine
        self.adapters_dir = adapters_dir
        self._prepare = prepare
        self.poll_interval = poll_interval
        self.resync_interval = resync_interval
        self._downloads = asyncio.Semaphore(max_parallel_downloads)
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self.desired: DesiredAdapterSet | None = None
        self.desired_sha256: str | None = None
        self.desired_error: str | None = None
        self.desired_read_at: float | None = None
        self._desired_stat: tuple[int, int, int, int] | None = None
        self.adapters: dict[str, Adapter] = {}
        self.routes = Routes()
        self.metrics = ServingMetrics()
        self.engine_healthy = False
        self.engine_base: str | None = None
        self.engine_message: str | None = "not checked yet"
        self.engine_restarts = 0
        self._was_healthy = False
        self._ever_healthy = False
        self._known_served: set[str] = set()
        self.lost_adapters = 0
        self.passes = 0
        # Set once this pod has served the whole desired set: adapters added later no longer hold it out of the
        # Service (the others are being served); a new pod or a restarted vLLM starts over.
        self.served_full_set = False
        self.last_pass: float | None = None
        self.pod = os.environ.get("POD_NAME") or socket.gethostname()

    # -- the desired set -----------------------------------------------------------------------------------

    def read_desired(self, force: bool = True) -> bool:
        """Re-read the desired file; True when its content changed. A bad file keeps the last good set.

        Without force, a file whose stat (inode, size, mtime: the kubelet's symlink swap changes them all) is
        unchanged is not read again: cheap enough to poll every 100 ms."""
        try:
            st = os.stat(self.desired_file)
            signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if not force and signature == self._desired_stat:
                return False
            self._desired_stat = signature
            raw = self.desired_file.read_bytes()
        except FileNotFoundError:
            if self.desired is None:
                self.desired_error = f"{self.desired_file} does not exist (the ConfigMap is not mounted yet?)"
            return False
        except OSError as e:
            self.desired_error = f"cannot read {self.desired_file}: {e}"
            return False
        digest = hashlib.sha256(raw).hexdigest()
        if digest == self.desired_sha256:
            return False
        self.desired_sha256 = digest
        try:
            desired = DesiredAdapterSet.model_validate_json(raw)
        except ValueError as e:
            self.desired_error = f"{self.desired_file} is not a valid desired adapter set (keeping the last one): {e}"
            log.error("%s", self.desired_error)
            return False
        names = [a.name for a in desired.adapters]
        if len(names) != len(set(names)):
            self.desired_error = f"{self.desired_file} names an adapter twice (keeping the last set): {names}"
            log.error("%s", self.desired_error)
            return False
        clash = sorted({a.served_name for a in desired.adapters if a.served_name} & set(names))
        if clash:
            self.desired_error = (
                f"{self.desired_file} serves {clash} both as an adapter and a canary (keeping the last set)"
            )
            log.error("%s", self.desired_error)
            return False
        self._apply_desired(desired)
        return True

    def _apply_desired(self, desired: DesiredAdapterSet) -> None:
        old = self.desired
        settings_changed = old is not None and (
            old.base_model != desired.base_model
            or old.base_model_digest != desired.base_model_digest
            or old.max_lora_rank != desired.max_lora_rank
            or old.target_modules != desired.target_modules
        )
        self.desired, self.desired_error, self.desired_read_at = desired, None, _now()
        wanted = {a.name: a for a in desired.adapters}
        self.routes.set_served(served_names(desired), desired.base_model)
        for name in list(self.adapters):
            if name not in wanted:
                self._cancel(self.adapters.pop(name))
        for name, want in wanted.items():
            current = self.adapters.get(name)
            if current is None:
                self.adapters[name] = Adapter(want)
            elif current.key != _key(want) or settings_changed:
                # A new version (or new rules): start over, but keep what is loaded until it is replaced.
                self._cancel(current)
                replacement = Adapter(want)
                replacement.since = _now()
                self.adapters[name] = replacement
            else:
                current.want = want
        log.info("desired set: base %s, %d adapters: %s", desired.base_model, len(wanted), ", ".join(wanted))

    @staticmethod
    def _cancel(adapter: Adapter) -> None:
        if adapter.task is not None and not adapter.task.done():
            adapter.task.cancel()  # the thread finishes its pull; its folder is collected later

    # -- the loop ------------------------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        last_full = 0.0
        while True:
            due = time.monotonic() - last_full >= self.resync_interval
            changed = self.read_desired(force=due)
            woken = self._wake.is_set()
            self._wake.clear()
            if changed or woken or due:
                last_full = time.monotonic()
                try:
                    await self.reconcile()
                except Exception:  # never die: the next pass retries
                    log.exception("reconcile pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval)

    async def reconcile(self) -> None:
        async with self._lock:
            await self._reconcile()
            self.passes += 1
            self.last_pass = _now()

    async def _reconcile(self) -> None:
        desired = self.desired
        if desired is None:
            return
        # Downloads and checks need no engine: start them first.
        for adapter in self.adapters.values():
            self._start_prepare(adapter, desired)

        healthy = await self.engine.healthy()
        if not healthy:
            self._engine_down("vLLM /health is not answering 200 (starting, restarting or overloaded)")
            return
        try:
            models = await self.engine.models()
        except EngineUnavailable as e:
            self._engine_down(str(e))
            return
        if self._ever_healthy and not self._was_healthy:
            self.engine_restarts += 1
            log.warning("vLLM is back after being unhealthy: re-loading every adapter it lost")
        self.engine_healthy, self._was_healthy, self._ever_healthy, self.engine_message = True, True, True, None
        served = self._served(models, desired)
        if self.engine_base != desired.base_model:
            # Another base model (a rollout of a new BaseModel under way): loading these adapters into it would be
            # wrong, and this pod is not ready; the new pods will serve them.
            for adapter in self.adapters.values():
                if adapter.state in (LOADED, LOADING) and adapter.prepared is not None:
                    adapter.set(PENDING, Reason.WAITING_FOR_ENGINE, self.engine_message)
            return
        lost = self._known_served - set(served)
        if lost:
            self.lost_adapters += len(lost)
            self.served_full_set = False  # reloading them, as a new pod would
            log.warning("vLLM no longer lists %s (restarted?); re-loading", ", ".join(sorted(lost)))

        # Unload what is no longer desired (only adapters this sidecar manages: their root is ours).
        for name, versions in served.items():
            if name not in self.adapters:
                self.routes.forget(name)
                await self._unload(versions, "no longer desired")

        for adapter in self.adapters.values():
            await self._converge(adapter, served.get(adapter.want.name, {}))

        # Loaded means listed by vLLM with our base model as parent, from the folder of the digest we prepared.
        try:
            models = await self.engine.models()
        except EngineUnavailable as e:
            self._engine_down(str(e))
            return
        served = self._served(models, desired)
        for adapter in self.adapters.values():
            self._observe(adapter, served.get(adapter.want.name, {}))
        self._known_served = {n for n, a in self.adapters.items() if a.state == LOADED}
        # A canary's requests go only to the versions vLLM serves now (one still loading gets none).
        self.routes.set_live(n for n in self.adapters if self.routes.engine_name(n) in served.get(n, {}))
        self._collect_garbage(served)

    async def _unload(self, versions: Served, why: str, keep: str | None = None, wait: bool = False) -> None:
        """Unload our engine names among versions but keep; with wait, only those no request can still use."""
        for engine_name, model in versions.items():
            if engine_name == keep or not self._ours(model) or (wait and not self.routes.drained(engine_name)):
                continue
            result = await self._call(self.engine.unload(engine_name))
            if result is not None:
                self.routes.unloaded(engine_name)
                log.info("unloaded %s (%s): %s", engine_name, why, result.message)

    def _engine_down(self, message: str) -> None:
        if self._was_healthy:
            log.warning("vLLM became unhealthy: %s", message)
        self.engine_healthy, self._was_healthy, self.engine_message = False, False, message
        self._known_served = set()  # a restart forgets them all: counted as a restart, not as lost adapters
        for adapter in self.adapters.values():
            if adapter.state in (LOADED, LOADING) and adapter.prepared is not None:
                adapter.set(PENDING, Reason.WAITING_FOR_ENGINE, f"vLLM is not healthy: {message}")

    def _served(self, models: list[EngineModel], desired: DesiredAdapterSet) -> dict[str, Served]:
        """Adapters on our base model by public name: each with its engine names (two during a switch)."""
        base_ids = [m.id for m in models if m.parent is None]
        self.engine_base = desired.base_model if desired.base_model in base_ids else next(iter(base_ids), None)
        if desired.base_model not in base_ids:
            self.engine_message = (
                f"vLLM serves {', '.join(base_ids) or 'no base model'}, not the desired base model "
                f"{desired.base_model!r}: the pod runs an older engine configuration"
            )
        served: dict[str, Served] = {}
        for m in models:
            if m.parent is not None and m.parent == desired.base_model:
                served.setdefault(public_name(m.id) if self._ours(m) else m.id, {})[m.id] = m
        return served

    def _ours(self, model: EngineModel) -> bool:
        root = Path(model.root or "/nonexistent")
        return root.is_relative_to(self.adapters_dir)

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except EngineUnavailable as e:
            log.warning("%s", e)
            return None

    # -- per adapter ---------------------------------------------------------------------------------------

    def _start_prepare(self, adapter: Adapter, desired: DesiredAdapterSet) -> None:
        if adapter.prepared is not None or adapter.task is not None:
            return
        if adapter.refusal is not None and adapter.refusal.permanent:
            return
        if _now() < adapter.retry_at:
            return
        if adapter.failures == 0 and adapter.state != LOADED:
            adapter.set(LOADING, Reason.DOWNLOADING, f"downloading and checking {adapter.want.uri}")
        # A retry keeps the state and reason of the last failure (no flapping); the message says it retries.
        adapter.prepare_started = time.monotonic()
        adapter.task = asyncio.create_task(self._run_prepare(adapter.want, desired))
        adapter.task.add_done_callback(functools.partial(self._prepared, adapter))

    async def _run_prepare(self, want: DesiredAdapter, desired: DesiredAdapterSet) -> Prepared | Refusal:
        async with self._downloads:
            return await asyncio.to_thread(self._prepare, want, desired, self.adapters_dir)

    def _prepared(self, adapter: Adapter, task: asyncio.Task[Prepared | Refusal]) -> None:
        adapter.task = None
        if task.cancelled() or self.adapters.get(adapter.want.name) is not adapter:
            return
        if adapter.prepare_started is not None:
            adapter.prepare_seconds = time.monotonic() - adapter.prepare_started
        error = task.exception()
        result: Prepared | Refusal
        if error is not None:
            log.error("preparing %s failed", adapter.want.name, exc_info=error)
            result = Refusal(Reason.DOWNLOAD_FAILED, f"preparing adapter {adapter.want.name!r} failed: {error!r}")
        else:
            result = task.result()
        if isinstance(result, Prepared):
            adapter.prepared, adapter.refusal = result, None
        else:
            self._refuse(adapter, result)
        self.wake()

    def _refuse(self, adapter: Adapter, refusal: Refusal) -> None:
        adapter.refusal = refusal
        adapter.failures += 1
        if refusal.permanent:
            adapter.set(FAILED, refusal.reason, refusal.message)
            return
        delay = _backoff(adapter.failures)
        adapter.retry_at = _now() + delay
        # The store being down says nothing against the adapter: it waits (Pending) rather than fails.
        state = PENDING if refusal.reason in (Reason.STORE_UNAVAILABLE, Reason.DOWNLOAD_FAILED) else FAILED
        adapter.set(state, refusal.reason, f"{refusal.message} (attempt {adapter.failures}; retrying in {delay:.0f} s)")

    async def _converge(self, adapter: Adapter, versions: Served) -> None:
        name = adapter.want.name
        if self.routes.engine_name(name) not in versions and versions:
            self.routes.route(name, next(iter(versions)))  # e.g. after a sidecar restart: what vLLM has serves
        if adapter.state == FAILED:
            # The desired version cannot be served: do not keep serving another one under its name.
            self.routes.forget(name)
            await self._unload(versions, "its desired version is refused")
            if adapter.refusal is not None and (adapter.refusal.permanent or _now() < adapter.retry_at):
                return
        if adapter.prepared is None:
            return  # downloading (a previous version, if any, serves meanwhile)
        path = str(adapter.prepared.path)
        current = next((n for n, m in versions.items() if m.root == path), None)
        if current is not None:
            self.routes.route(name, current)  # atomic for the gateway: new requests go to this version
            await self._unload(versions, "replaced", keep=current, wait=True)
            return
        if adapter.refusal is not None and _now() < adapter.retry_at:
            return
        # The old version keeps serving under its engine name while the new one loads under a free one.
        engine_name = name if name not in versions else version_alias(name, adapter.prepared.digest)
        if engine_name in versions:  # that alias from another path (not ours to route): make room
            await self._unload({engine_name: versions[engine_name]}, "stale alias")
        adapter.set(LOADING, Reason.LOADING, f"loading {adapter.prepared.digest} into vLLM")
        started = time.monotonic()
        result = await self._call(self.engine.load(engine_name, path))
        if result is None:
            adapter.set(PENDING, Reason.WAITING_FOR_ENGINE, "vLLM did not answer the load request; retrying")
            return
        if result.ok:
            adapter.load_seconds = time.monotonic() - started
            adapter.loaded_at = _now()
            adapter.failures, adapter.refusal = 0, None
            self.routes.route(name, engine_name)
            await self._unload(versions, "replaced", keep=engine_name, wait=True)
            return
        if result.status == 400 and "already been loaded" in result.message:
            return  # loaded meanwhile; the observation below tells by its root
        reason = classify_engine_error(result.message)
        if reason == Reason.NOT_FOUND and not adapter.prepared.path.is_dir():
            adapter.prepared = None  # our files went away: download again
            return
        message = f"vLLM refused adapter {name!r} (HTTP {result.status}): {result.message}"
        self._refuse(adapter, Refusal(reason, message))
        if adapter.state == FAILED:
            self.routes.forget(name)
            await self._unload(versions, "its desired version is refused")

    def _observe(self, adapter: Adapter, versions: Served) -> None:
        prepared = adapter.prepared
        model = versions.get(self.routes.engine_name(adapter.want.name))
        if prepared is not None and model is not None and model.root == str(prepared.path):
            adapter.set(LOADED, Reason.LOADED, f"served by vLLM from {prepared.path} ({prepared.digest})")
            return
        if adapter.state == LOADED:
            adapter.set(PENDING, Reason.WAITING_FOR_ENGINE, "vLLM no longer lists the adapter; re-loading")
            self.wake()

    def _collect_garbage(self, served: dict[str, Served]) -> None:
        """Delete version folders nothing needs: not prepared for a desired adapter, not served, not in flight."""
        keep = {str(a.prepared.path) for a in self.adapters.values() if a.prepared is not None}
        keep |= {m.root for versions in served.values() for m in versions.values() if m.root}
        busy = {a.want.name for a in self.adapters.values() if a.task is not None}
        if not self.adapters_dir.is_dir():
            return
        for name_dir in self.adapters_dir.iterdir():
            if not name_dir.is_dir() or name_dir.name.startswith(".") or name_dir.name in busy:
                continue
            for version_dir in name_dir.iterdir():
                if str(version_dir) not in keep:
                    log.info("removing %s (no longer desired nor served)", version_dir)
                    shutil.rmtree(version_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                name_dir.rmdir()  # only when empty

    # -- what the gateway reports --------------------------------------------------------------------------

    def blocking(self) -> list[str]:
        """Desired adapters this pod is still expected to load (Pending/Loading). Failed ones do not block
        readiness: they cannot be served by any replica, and holding every pod unready would stop the others."""
        return [n for n, a in self.adapters.items() if a.state in (PENDING, LOADING)]

    def ready(self, engine_healthy: bool) -> tuple[bool, str]:
        """Ready once vLLM is healthy and every desired adapter is loaded (or failed for good). After that,
        an adapter added to the set does not make the pod unready while it loads: taking every replica out of
        the Service to add one adapter would stop all the others."""
        if self.desired is None:
            return False, self.desired_error or "no desired adapter set read yet"
        if not engine_healthy:
            self.served_full_set = False
            return False, "vLLM is not healthy"
        if self.engine_base is not None and self.engine_base != self.desired.base_model:
            return False, self.engine_message or "vLLM serves another base model"
        if self.passes == 0:
            return False, "no sync pass completed yet"
        serving = f"serving {sum(a.state == LOADED for a in self.adapters.values())} adapters"
        waiting = self.blocking()
        if waiting and not self.served_full_set:
            return False, "waiting for adapters: " + ", ".join(waiting)
        if waiting:
            return True, f"{serving}; loading {', '.join(waiting)}"
        self.served_full_set = True
        return True, serving

    def state(self) -> dict[str, Any]:
        """What GET /lorafleet/state answers (the contract lorafleet.contracts.serving.ReplicaState)."""
        desired = self.desired
        return ReplicaState(
            pod=self.pod,
            base_model=desired.base_model if desired else None,
            engine=EngineState(
                url=self.engine.base_url,
                healthy=self.engine_healthy,
                base_model=self.engine_base,
                restarts=self.engine_restarts,
                lost_adapters=self.lost_adapters,
                message=self.engine_message,
            ),
            desired=DesiredFileState(
                file=str(self.desired_file),
                sha256=self.desired_sha256,
                read_at=_rfc3339(self.desired_read_at),
                error=self.desired_error,
                adapters=len(desired.adapters) if desired else 0,
            ),
            ready=self.ready(self.engine_healthy)[0],
            passes=self.passes,
            last_pass=_rfc3339(self.last_pass),
            adapters=[a.report() for a in self.adapters.values()],
        ).state_json()
