#!/usr/bin/env bash
# The test command (README and .ci/run): sets up a virtualenv, installs lorafleet with its dev extra, builds
# and starts the local Kubernetes control plane (cached under ~/.cache/lorafleet), runs unit + integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib/venv.sh
ensure_venv dev,trainer
python -m ruff check operator tests hack
python -m mypy
exec python -m pytest tests/unit tests/integration "$@"
