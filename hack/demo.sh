#!/usr/bin/env bash
# The demo (README): sets up the virtualenv and the machine's prerequisites (hack/lib/prereqs.sh: enough free disk,
# else one line and exit 1; Debian packages), then
# `lorafleet-dev demo`: as root, train and serve on a real local node; otherwise (or LORAFLEET_DEMO_NODE=kwok,
# LORAFLEET_CLUSTER=external) the kwok variant.
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib/venv.sh
source hack/lib/prereqs.sh
started=$SECONDS
echo "hack/demo.sh: [1/3] virtualenv (.venv; first run: 3 to 5 minutes)" >&2
ensure_venv dev,trainer,serve
echo "hack/demo.sh: [2/3] prerequisites ($((SECONDS - started))s so far)" >&2
# Disk: the demo's MinIO refuses writes with less than 1% of the filesystem available. NEED: the scratch folders
# earlier demos left behind held 1.8 GiB each (now removed at the end), and a code change rebuilds and imports images
# (in the run measured for hack/test.sh the rebuilt operator and trainer-cpu images, in buildah and containerd, took
# about 5 GiB); 8 GiB leaves a margin. A first run adds what it builds into the caches (disk_need_gib).
ensure_disk hack/demo.sh "$(disk_need_gib 8)" || exit 1
if ! ensure_prereqs hack/demo.sh && [ "$(id -u)" = 0 ] && [ "${LORAFLEET_DEMO_NODE:-}" != kwok ]; then
  echo "hack/demo.sh: the real-node demo needs them; LORAFLEET_DEMO_NODE=kwok bash hack/demo.sh runs the kwok variant" >&2
  exit 1
fi
echo "hack/demo.sh: [3/3] lorafleet-dev demo (first run builds the cluster, the node and three images: 20 to 40 minutes; then 1.5 to 2.5)" >&2
exec lorafleet-dev demo "$@"
