#!/usr/bin/env bash
# The test command (README and .ci/run): sets up a virtualenv, installs lorafleet with its extras, builds
# and starts the local Kubernetes control plane and MinIO (cached under ~/.cache/lorafleet), runs lint, unit and
# integration tests (real API server, MinIO, vLLM on CPU, training steps on a tiny model).
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib/venv.sh
ensure_venv dev,trainer,serve
python -m ruff check operator tests hack
python -m mypy
exec python -m pytest tests/unit tests/integration "$@"
