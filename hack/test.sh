#!/usr/bin/env bash
# The test command (README and .ci/run): sets up a virtualenv, installs lorafleet with its extras, builds
# and starts the local Kubernetes control plane and MinIO (cached under ~/.cache/lorafleet), runs lint, unit and
# integration tests (real API server, MinIO, vLLM on CPU, training steps on a tiny model), and as root the e2e tests
# on a real node (pods train and serve; lorafleet's images are built without Docker).
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib/venv.sh
# Debian tools the Docker-less image build test uses (tests/integration/test_chart_images.py); as root only.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for tool in mmdebstrap containerd runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi
ensure_venv dev,trainer,serve
python -m ruff check operator tests hack
python -m mypy
# The e2e tests run pods on a real node (containerd, kubelet): root only. Without root they are left out, loudly.
suites=(tests/unit tests/integration)
if [ "$(id -u)" = 0 ] && [ "${LORAFLEET_SKIP_E2E:-0}" != 1 ]; then
  suites+=(tests/e2e)
else
  echo "hack/test.sh: NOT running tests/e2e (they need root for the real node; docs/node.md)" >&2
fi
exec python -m pytest "${suites[@]}" "$@"
