#!/usr/bin/env bash
# The demo (README): sets up the virtualenv, then `lorafleet demo` on the local cluster (or LORAFLEET_CLUSTER=external).
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib/venv.sh
ensure_venv dev
exec lorafleet demo "$@"
