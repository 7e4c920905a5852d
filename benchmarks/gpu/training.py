"""LoRA training efficiency on one GPU (issue #18, point 3): the measured-change ladder toward 40% MFU on the
~1.1B Llama, then the 7B (Mistral-shaped) bf16 LoRA and QLoRA against the plain transformers + peft loop.

    python benchmarks/gpu/training.py --out training.json [--budget-s 300]
    python benchmarks/gpu/training.py --dry-run --out training.json       # CPU, tiny shapes, 2 + 2 steps

Every run is one child process (`--run SPEC`): a model of the shape built from its config on the device with
random weights (nothing loaded from disk), LoRA r=16 alpha 32 on every linear projection (no dropout), fused
AdamW, random full rows of `seq` tokens (no padding), `warmup` steps untimed then `steps` timed between CUDA
syncs. tokens/s = timed tokens / seconds; MFU = tokens/s x model FLOPs per token (as benchmarks/trainer/run.py:
4 x matmul weights + causal attention, no recompute counted) / --peak-tflops; peak memory =
torch.cuda.max_memory_allocated. A child per run keeps one change's patches (Liger patches classes) and
compiled code out of the next, and a hang or crash costs only its own timeout.

The ladder (1.1B, batch 8 x 2048, as the earlier H100 table): `plain` first, then each change added to what has
been kept so far; a change is kept when it raises tokens/s by more than 2% over the best so far. A change whose
package is absent records "not available", one that fails records its error; neither stops the ladder.
  lora_bf16       LoRA weights in bf16 (peft keeps them fp32 by default: every LoRA matmul upcasts)
  fused_ce        Liger's fused linear cross-entropy (no [tokens x vocab] fp32 logits)
  liger           Liger's RMSNorm, SwiGLU and RoPE kernels (single GPU here: no FSDP to break)
  compile         torch.compile of every decoder layer, LoRA layers inside (regional compilation)
  batch16         micro-batch 16 without activation checkpointing (if memory allows)
  ckpt_batch32    activation checkpointing with micro-batch 32
  flash_varlen    flash-attention 2 on the batch packed into one row (position_ids restart per sample: varlen)
7B: plain bf16 LoRA (batch 2 x 2048), the 1.1B ladder's kept changes on 7B, QLoRA (nf4, bitsandbytes) plain.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SHAPES, TARGETS, Budget, hf_config, write_json  # noqa: E402

LADDER = ["lora_bf16", "fused_ce", "liger", "compile", "batch16", "ckpt_batch32", "flash_varlen"]
NEEDS = {"fused_ce": "liger_kernel", "liger": "liger_kernel", "flash_varlen": "flash_attn"}
NEEDS_CUDA = {"fused_ce", "liger", "flash_varlen"}
KEEP_GAIN = 1.02


def flops_per_token(shape: str, seq: int) -> float:
    """benchmarks/trainer/run.py's matmul_flops_per_token: 4 FLOPs per matmul weight per token (forward, and the
    activation gradients; frozen weights get no weight gradients) over every projection and the LM head, plus
    causal attention's score and value products (2 x 2 x seq x hidden per layer forward, x3 with backward)."""
    s = SHAPES[shape]
    h, layers, inter = s["hidden_size"], s["num_hidden_layers"], s["intermediate_size"]
    kv = h * s["num_key_value_heads"] // s["num_attention_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter
    return float(4 * (layers * per_layer + h * s["vocab_size"]) + 3 * 4 * layers * h * seq)


# -- one run (in a child process) ----------------------------------------------------------------------------------


def quantize_4bit(model: Any, device: str) -> None:
    """Swap every LoRA-target nn.Linear for a bitsandbytes nf4 Linear4bit holding the same (random) weights,
    quantized on the device: QLoRA without writing 14 GB to disk and loading it back."""
    import bitsandbytes as bnb
    import torch

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in TARGETS and isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    compute_dtype=child.weight.dtype, compress_statistics=True, quant_type="nf4", device="meta",
                )  # fmt: skip
                q.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
                )
                q = q.to(device)  # quantizes
                setattr(parent, name, q)
                del child
    model.is_loaded_in_4bit = True  # peft then wraps Linear4bit with its 4-bit LoRA layer
    if device == "cuda":
        torch.cuda.empty_cache()


def one_run(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    flags = set(spec["flags"])
    cuda = torch.cuda.is_available()
    for flag in flags:
        if flag in NEEDS and importlib.util.find_spec(NEEDS[flag]) is None:
            return {"status": "not available", "why": f"{NEEDS[flag]} is not installed"}
        if flag in NEEDS_CUDA and not cuda:
            return {"status": "not available", "why": f"{flag} needs CUDA (dry run)"}
    if spec.get("qlora") and importlib.util.find_spec("bitsandbytes") is None:
        return {"status": "not available", "why": "bitsandbytes is not installed"}
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    shape, seq = spec["shape"], spec["seq"]
    batch = 32 if "ckpt_batch32" in flags else 16 if "batch16" in flags else spec["batch"]
    if not cuda:  # the dry run keeps its tiny batch
        batch = spec["batch"] * (2 if "batch16" in flags or "ckpt_batch32" in flags else 1)
    packed = "flash_varlen" in flags
    t_build = time.perf_counter()
    config = hf_config(shape, "bfloat16" if cuda else "float32")
    config.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, dtype=dtype, attn_implementation="flash_attention_2" if packed else "sdpa"
        )
    if flags & {"fused_ce", "liger"}:
        from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_mistral

        apply = apply_liger_kernel_to_mistral if SHAPES[shape]["arch"] == "mistral" else apply_liger_kernel_to_llama
        on = "liger" in flags
        apply(rope=on, rms_norm=on, swiglu=on, cross_entropy=False,
              fused_linear_cross_entropy="fused_ce" in flags, model=model)  # fmt: skip
    if spec.get("qlora"):
        quantize_4bit(model, device)
    if "ckpt_batch32" in flags:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(TARGETS), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora, autocast_adapter_dtype="lora_bf16" not in flags)
    if "compile" in flags:
        base: Any = model.get_base_model()
        for layer in base.model.layers:
            layer.compile()
    model.train()
    build_seconds = time.perf_counter() - t_build
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=cuda)
    gen = torch.Generator().manual_seed(1)
    vocab = SHAPES[shape]["vocab_size"]
    batches = []
    for _ in range(4):
        ids = torch.randint(3, vocab, (batch, seq), generator=gen)
        b: dict[str, Any] = {"input_ids": ids, "labels": ids.clone()}
        if packed:  # one row, positions restarting per sample: flash-attention's varlen path, no padding
            b = {"input_ids": ids.reshape(1, -1), "labels": ids.reshape(1, -1).clone(),
                 "position_ids": torch.arange(seq).repeat(batch).reshape(1, -1)}  # fmt: skip
        batches.append({k: v.to(device) for k, v in b.items()})
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses = []
    t0 = 0.0
    warmup, steps = spec["warmup"], spec["steps"]
    for step in range(warmup + steps):
        if step == warmup:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        out = model(**batches[step % len(batches)])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()) if step >= warmup + steps - 2 else 0.0)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = steps * batch * seq
    tps = tokens / seconds
    return {
        "status": "ok", "batch": batch, "seq": seq, "tokensPerS": tps,
        "mfu": tps * flops_per_token(shape, seq) / (spec["peakTflops"] * 1e12),
        "stepSeconds": seconds / steps, "buildSeconds": build_seconds, "finalLoss": losses[-1],
        "peakMemoryGiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "trainableParams": sum(p.numel() for p in params),
        "linear4bit": sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit"),
    }  # fmt: skip


def child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        result = one_run(spec)
    except Exception as e:
        import traceback

        traceback.print_exc()
        oom = "OutOfMemory" in type(e).__name__ or "out of memory" in str(e)
        result = {"status": "oom" if oom else "error", "error": repr(e)[-1500:]}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# -- the orchestration -------------------------------------------------------------------------------------------


def run_child(spec: dict[str, Any], timeout: float, log: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run", json.dumps(spec)]
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n=== {spec['label']}: {json.dumps(spec)}\n")
        f.flush()
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, timeout=timeout)
            out = p.stdout
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            f.write(out)
            return {"status": "timeout", "error": f"killed after {timeout:.0f} s", "wallSeconds": timeout}
        f.write(out)
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("RESULT ")), None)
    result: dict[str, Any] = (
        json.loads(line[7:]) if line else {"status": "error", "error": f"child rc {p.returncode}, no result"}
    )
    result["wallSeconds"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path)
    p.add_argument("--log", type=Path, default=Path("/tmp/lorafleet-gpu-work/training.log"))
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, few steps")
    p.add_argument("--budget-s", type=float, default=300.0)
    p.add_argument("--ladder", default=",".join(LADDER), help="changes to try, in order")
    p.add_argument("--no-7b", action="store_true")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 8; dry 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; dry 1)")
    p.add_argument("--run-timeout", type=float, default=None, help="seconds per child (default 150; dry 240)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    args = p.parse_args(argv)
    if args.run:
        return child_main(args.run)
    assert args.out, "--out is required"
    dry = args.dry_run
    small, big = ("tiny-llama", "tiny-mistral") if dry else ("llama-1b", "mistral-7b")
    s_label, b_label = ("tiny-llama", "tiny-mistral") if dry else ("1.1B", "7B")
    seq = 64 if dry else 2048
    base = {
        "seq": seq, "steps": args.steps or (2 if dry else 8), "warmup": args.warmup or (1 if dry else 3),
        "peakTflops": args.peak_tflops,
    }  # fmt: skip
    timeout = args.run_timeout or (240.0 if dry else 150.0)
    budget = Budget(args.budget_s)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "benchmark": "LoRA r=16 all linear projections, random-init models, fused AdamW, full rows",
        "dryRun": dry, "peakTflops": args.peak_tflops, "ladder": [], "sevenB": [],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip

    def go(label: str, shape: str, batch: int, flags: list[str], est: float, **extra: Any) -> dict[str, Any]:
        spec = {**base, "label": label, "shape": shape, "batch": batch, "flags": flags, **extra}
        row: dict[str, Any] = {"label": label, "shape": shape, "flags": flags, **extra}
        missing = [NEEDS[f] for f in flags if f in NEEDS and importlib.util.find_spec(NEEDS[f]) is None]
        if extra.get("qlora") and importlib.util.find_spec("bitsandbytes") is None:
            missing.append("bitsandbytes")
        if missing:  # decided here: a child would spend its imports only to say so
            row.update(status="not available", why=f"{', '.join(missing)} is not installed")
        elif dry and set(flags) & NEEDS_CUDA:
            row.update(status="not available", why=f"{', '.join(sorted(set(flags) & NEEDS_CUDA))} needs CUDA (dry run)")
        elif not budget.fits(est):
            row.update(status="skipped", why=f"budget ({budget.left():.0f} s left, needs ~{est:.0f})")
        else:
            row.update(run_child(spec, min(timeout, max(budget.left(), 10.0)), args.log))
        tps, mfu = row.get("tokensPerS"), row.get("mfu")
        print(
            f"training: {label:28s} {row['status']:13s} "
            + (f"{tps:10.0f} tok/s  MFU {100 * (mfu or 0.0):5.1f}%  peak {row.get('peakMemoryGiB')} GiB" if tps else
               str(row.get("why") or row.get("error", ""))[-300:]),
            flush=True,
        )  # fmt: skip
        return row

    # Order by what matters most when the budget runs short: the two plain baselines and QLoRA first, then the
    # ladder (its tail is what a short budget skips), then 7B with the changes the ladder kept.
    small_batch, big_batch = (2, 1) if dry else (8, 2)
    plain = go(f"{s_label} plain", small, small_batch, [], 60)
    res["ladder"].append(plain)
    write_json(args.out, res)  # after every run: a phase killed by its timeout keeps what was measured
    seven: list[dict[str, Any]] = res["sevenB"]
    if not args.no_7b:
        seven.append(go(f"{b_label} bf16 LoRA plain", big, big_batch, [], 60))
        write_json(args.out, res)
        seven.append(go(f"{b_label} QLoRA nf4 plain", big, big_batch, [], 90, qlora=True))
        write_json(args.out, res)
    kept: list[str] = []
    best = plain.get("tokensPerS") or 0.0
    for change in [c for c in args.ladder.split(",") if c]:
        row = go(f"{s_label} +{change}", small, small_batch, [*kept, change], 90 if change == "compile" else 45)
        row["change"] = change
        tps = row.get("tokensPerS")
        row["vsPlain"] = tps / plain["tokensPerS"] if tps and plain.get("tokensPerS") else None
        row["vsBest"] = tps / best if tps and best else None
        row["kept"] = bool(tps and best and tps > best * KEEP_GAIN)
        if row["kept"]:
            kept.append(change)
            best = tps or best
        res["ladder"].append(row)
        res["kept"] = kept
        write_json(args.out, res)
    res["kept"] = kept
    best_mfu = max((r.get("mfu") or 0.0 for r in res["ladder"] if r.get("tokensPerS") == best), default=None)
    res["best1B"] = {"flags": kept, "tokensPerS": best, "mfu": best_mfu}
    # The kept 1.1B changes on 7B, except the batch sizes (sized for 1.1B; 7B's memory differs).
    keep7 = [c for c in kept if c not in ("batch16", "ckpt_batch32")]
    if seven and keep7:
        seven.append(go(f"{b_label} bf16 LoRA +" + "+".join(keep7), big, big_batch, keep7, 90))
    p7 = seven[0].get("tokensPerS") if seven else None
    for row in seven[1:]:
        row["vsPlain"] = row["tokensPerS"] / p7 if row.get("tokensPerS") and p7 else None
    res["seconds"] = args.budget_s - budget.left()
    write_json(args.out, res)
    ok = plain.get("status") == "ok"
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
