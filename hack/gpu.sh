#!/usr/bin/env bash
# The trainer's GPU checks, on a machine with a CUDA GPU and torch/transformers/accelerate installed:
# tests/integration/test_trainer_gpu.py (bf16 LoRA, QLoRA, NCCL under torchrun, FSDP, resume) and the 1B benchmark.
# Packages missing there come from .gpu/site (hack/gpu-site.sh). Logs and results go to ${OUT:-/tmp/lorafleet-gpu}.
# No conftest: the GPU tests need no cluster, and the cluster fixtures need the kubernetes client.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/lorafleet-gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD/.gpu/site:$PWD/operator:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
nvidia-smi -L
"$PY" -c "import torch, transformers, peft, accelerate, bitsandbytes; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, \
'bitsandbytes', bitsandbytes.__version__)"
rc=0
if [[ ${LORAFLEET_GPU_TESTS:-1} == 1 ]]; then
  timeout "${LORAFLEET_GPU_TESTS_TIMEOUT:-420}" "$PY" -m pytest --noconftest -p no:cacheprovider -q -rA -s \
    -m gpu --timeout 200 tests/integration/test_trainer_gpu.py "$@" 2>&1 | tee "$out/gpu-tests.log" || rc=1
fi
if [[ ${LORAFLEET_GPU_BENCH:-1} == 1 ]]; then
  timeout "${LORAFLEET_GPU_BENCH_TIMEOUT:-240}" "$PY" benchmarks/trainer/run.py --gpu --repeats "${REPEATS:-2}" \
    --out "$out/gpu-bench.json" 2>&1 | tee "$out/gpu-bench.log" || rc=1
fi
exit $rc
