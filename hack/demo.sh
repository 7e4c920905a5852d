#!/usr/bin/env bash
# The demo (README): sets up the virtualenv, then `lorafleet demo`: as root, train and serve on a real local node;
# otherwise (or LORAFLEET_DEMO_NODE=kwok, LORAFLEET_CLUSTER=external) the kwok variant.
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib/venv.sh
ensure_venv dev,trainer,serve
exec lorafleet demo "$@"
