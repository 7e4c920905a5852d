"""The summary of a hack/gpu.sh run: results.json and results.md in OUT from the phases' JSON files, and
logs.txt with the tails of the logs the phases left in the work folder (vLLM, the sidecar, the training runs).

    python benchmarks/gpu/report.py --out OUT --work WORK [--budget 480 --elapsed 455]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json

LOG_TAIL_BYTES = 400_000


def load(path: Path) -> dict[str, Any] | list[Any] | None:
    try:
        data: dict[str, Any] | list[Any] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        return None


def fmt(x: Any, spec: str = ".1f", scale: float = 1.0) -> str:
    if x is None or x == "":
        return "-"
    if isinstance(x, (int, float)):
        return format(x * scale if scale != 1.0 else x, spec)
    return str(x)


def phases(work: Path) -> list[dict[str, str]]:
    rows = []
    try:
        for line in (work / "phases.tsv").read_text().splitlines():
            name, rc, seconds, note = [*line.split("\t"), "", "", ""][:4]
            rows.append({"phase": name, "rc": rc, "seconds": seconds, "note": note})
    except OSError:
        pass
    return rows


def serving_md(s: dict[str, Any] | None, inv: dict[str, Any]) -> list[str]:
    md = ["## Serving: multi-LoRA on one GPU", ""]
    if not s:
        why = inv.get("servingBlocked") or "the serving phase did not run or wrote nothing"
        return [*md, f"**Blocked / not run**: {why}. vLLM in the image: `{inv.get('vllm', {})}`"[:1500], ""]
    md += [
        f"{s.get('shape')} (random weights, `--load-format dummy`), rank-{s.get('rank')} adapters, vLLM "
        f"{s.get('vllm')}; {s.get('requests')} requests per scenario, {s.get('concurrency')} clients, "
        f"{s.get('promptLen')} prompt tokens, {s.get('outputLen')} output tokens.",
        "",
        "| engine | traffic | adapters | output tok/s | ratio to base | TTFT p50 (s) | TTFT p99 (s) | errors "
        "| GPU MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in s.get("rows", []):
        if "skipped" in r:
            md.append(f"| {r['config']} | {r['traffic']} | {r['adapters']} | skipped ({r['skipped']}) | | | | | |")
            continue
        mem = r.get("gpuMemoryMiB")
        md.append(
            f"| {r['config']} | {r['traffic']} | {r['adapters']} | {fmt(r.get('tokensPerS'))} | "
            f"{fmt(r.get('ratioToBase'), '.2f')}x | {fmt(r.get('ttftP50'), '.3f')} | {fmt(r.get('ttftP99'), '.3f')} | "
            f"{r.get('errors')} | {mem[0] if mem else '-'} |"
        )
    for name, c in s.get("configs", {}).items():
        state = c.get("skipped") or (
            f"error: {c['error'][-300:]}" if "error" in c else f"started in {fmt(c.get('startSeconds'))} s"
        )
        md.append(f"\n- engine `{name}`: {state}; `{' '.join(c.get('command', [])[2:])}` {c.get('env') or ''}")
        for line in c.get("memoryLog", [])[:4]:
            md.append(f"  - `{line}`")
    g = s.get("gateway")
    if g:
        md += ["", "Through lorafleet's sidecar + gateway (same engine, alternating with direct):", ""]
        if "error" in g or "skipped" in g:
            md.append(f"- {g.get('error') or g.get('skipped')}")
        for kind in ("zipf", "base"):
            d, gw = g.get(f"{kind}Direct"), g.get(f"{kind}Gateway")
            if d and gw:
                md.append(
                    f"- {kind} ({g.get('adapters') if kind == 'zipf' else 0} adapters): direct "
                    f"{fmt(d['tokensPerS'])} tok/s, gateway {fmt(gw['tokensPerS'])} tok/s, ratio "
                    f"**{fmt(g.get(f'{kind}GatewayRatio'), '.3f')}x**; TTFT p50 {fmt(d['ttftP50'], '.3f')} / "
                    f"{fmt(gw['ttftP50'], '.3f')} s"
                )
    t = s.get("target", {})
    md += ["", f"Target (25 adapters, Zipf, >= 0.8x base): ratio {fmt(t.get('ratio'), '.2f')}, met: {t.get('met')}", ""]
    return md


def trainer_md(t: list[Any] | None) -> list[str]:
    md = ["## Trainer: lorafleet.trainer vs the plain transformers + peft loop (1.1B)", ""]
    if not t:
        return [*md, "Not run or no result.", ""]
    md += ["| benchmark | ours tok/s | plain tok/s | ratio | ours MFU | plain MFU | peak GiB | losses |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in t:
        md.append(
            f"| {r.get('benchmark')} | {fmt(r.get('ours'), ',.0f')} | {fmt(r.get('plain'), ',.0f')} | "
            f"{fmt(r.get('ratio'), '.2f')}x | {fmt(r.get('oursMFU'), '.1f', 100)}% | "
            f"{fmt(r.get('plainMFU'), '.1f', 100)}% | {fmt(r.get('peakMemoryGiB'))} | "
            f"{fmt(r.get('oursFinalLoss'), '.3f')} / {fmt(r.get('plainFinalLoss'), '.3f')} |"
        )
    return [*md, ""]


def training_md(tr: dict[str, Any] | None) -> list[str]:
    md = ["## Training ladder toward 40% MFU, and 7B", ""]
    if not tr:
        return [*md, "Not run or no result.", ""]
    md += [
        f"MFU against {tr.get('peakTflops')} TFLOP/s dense bf16. A change is kept when it beats the best so far "
        "by more than 2%.",
        "",
        "| run | status | batch | tok/s | MFU | vs plain | kept | peak GiB | note |",
        "|---|---|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in [*tr.get("ladder", []), *tr.get("sevenB", [])]:
        note = r.get("why") or r.get("error") or ""
        md.append(
            f"| {r.get('label')} | {r.get('status')} | {fmt(r.get('batch'), 'd')} | "
            f"{fmt(r.get('tokensPerS'), ',.0f')} | "
            f"{fmt(r.get('mfu'), '.1f', 100)}% | {fmt(r.get('vsPlain'), '.2f')} | {'yes' if r.get('kept') else ''} | "
            f"{fmt(r.get('peakMemoryGiB'))} | {str(note)[-160:].replace('|', '/')} |"
        )
    b = tr.get("best1B", {})
    md += [
        "",
        f"Kept on 1.1B: {', '.join(tr.get('kept', [])) or 'nothing'}; best MFU {fmt(b.get('mfu'), '.1f', 100)}%.",
        "",
    ]
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--budget", type=float)
    p.add_argument("--elapsed", type=float)
    args = p.parse_args(argv)
    inv_raw = load(args.out / "inventory.json")
    inv: dict[str, Any] = inv_raw if isinstance(inv_raw, dict) else {}
    serving = load(args.out / "serving.json")
    trainer = load(args.out / "trainer-1b.json")
    training = load(args.out / "training.json")
    torch_info = inv.get("torch", {})
    packages = inv.get("packages", {})
    summary = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "gpu": torch_info.get("device"), "torch": torch_info.get("version"), "cuda": torch_info.get("cuda"),
        "packages": packages, "budgetSeconds": args.budget, "elapsedSeconds": args.elapsed,
        "phases": phases(args.work), "servingBlocked": inv.get("servingBlocked"),
        "servingTarget": serving.get("target") if isinstance(serving, dict) else None,
        "gateway": {k: v for k, v in (serving.get("gateway") or {}).items() if k.endswith("Ratio")}
        if isinstance(serving, dict) else None,
        "trainer1B": trainer, "trainingKept": training.get("kept") if isinstance(training, dict) else None,
        "trainingBest1B": training.get("best1B") if isinstance(training, dict) else None,
    }  # fmt: skip
    write_json(args.out / "results.json", summary)
    vers = ", ".join(f"{k} {v}" for k, v in packages.items() if v)
    md = [
        "# lorafleet GPU run (issue #18)",
        "",
        f"{summary['date']}; GPU {summary['gpu']}; torch {summary['torch']} (CUDA {summary['cuda']}); {vers}.",
        f"Budget {fmt(args.budget, '.0f')} s, elapsed {fmt(args.elapsed, '.0f')} s.",
        "",
        "| phase | rc | seconds | note |",
        "|---|---|---:|---|",
        *[f"| {r['phase']} | {r['rc']} | {r['seconds']} | {r['note']} |" for r in summary["phases"]],
        "",
    ]
    sections: list[tuple[Any, Any]] = [
        (serving_md, (serving if isinstance(serving, dict) else None, inv)),
        (trainer_md, (trainer if isinstance(trainer, list) else None,)),
        (training_md, (training if isinstance(training, dict) else None,)),
    ]
    for section, section_args in sections:  # one section that cannot be rendered must not lose the others
        try:
            md += section(*section_args)
        except Exception as e:
            md += [f"({section.__name__} failed: {e!r}; the JSON files have the numbers)", ""]
    (args.out / "results.md").write_text("\n".join(md) + "\n")
    # logs.txt: the tails of every log in the work folder (the phases' own output is in gpu.log).
    parts = []
    for log in sorted(args.work.rglob("*.log")) + sorted(args.work.glob("pip-list.txt")):
        data = log.read_bytes()
        tail = data[-LOG_TAIL_BYTES:]
        parts.append(f"===== {log.relative_to(args.work)} ({len(data)} bytes, last {len(tail)})\n")
        parts.append(tail.decode(errors="replace"))
    (args.out / "logs.txt").write_text("".join(parts))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
