#!/usr/bin/env bash
# For users with Docker: a kind cluster with the same fake kwok GPU/CPU nodes and pod stages as hack/cluster.
#   hack/kind-up.sh                      # creates kind cluster "lorafleet" (KIND_CLUSTER_NAME to change)
#   LORAFLEET_CLUSTER=external pytest -m integration   # uses $KUBECONFIG / ~/.kube/config (kind's context)
# Delete with: kind delete cluster --name lorafleet
# Needs docker, kind, kubectl, python3 with pyyaml; kwok's manifests come from its GitHub release.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
name="${KIND_CLUSTER_NAME:-lorafleet}"
# Same releases as lorafleet_dev.build (kind's node image follows the Kubernetes minor we pin).
k8s_version="${LORAFLEET_KUBERNETES_VERSION:-v1.34.4}"
kwok_version="${LORAFLEET_KWOK_VERSION:-v0.8.0}"
kwok_release="https://github.com/kubernetes-sigs/kwok/releases/download/${kwok_version}"

for tool in docker kind kubectl python3; do
  command -v "$tool" >/dev/null || { echo "kind-up: $tool not found" >&2; exit 1; }
done

if ! kind get clusters 2>/dev/null | grep -qx "$name"; then
  kind create cluster --name "$name" --image "kindest/node:${k8s_version}" --wait 120s
fi
ctx="kind-${name}"

# kwok controller in cluster (reads Stage CRs) with its default stages, then ours on top:
# pod-complete is replaced by a delayed one and lorafleet-pod-fail is added (docs/dev/cluster.md).
kubectl --context "$ctx" apply -f "${kwok_release}/kwok.yaml"
kubectl --context "$ctx" wait --for=condition=Established crd/stages.kwok.x-k8s.io --timeout=60s
kubectl --context "$ctx" apply -f "${kwok_release}/stage-fast.yaml"
PYTHONPATH="${root}/operator${PYTHONPATH:+:${PYTHONPATH}}" python3 -m lorafleet_dev.cluster manifests \
  | kubectl --context "$ctx" apply -f -
kubectl --context "$ctx" -n kube-system rollout status deployment/kwok-controller --timeout=120s
kubectl --context "$ctx" wait --for=condition=Ready nodes -l type=kwok --timeout=120s

cat <<MSG
kind cluster "$name" is ready with fake kwok nodes. Run the integration tests against it with:
  kubectl config use-context $ctx
  LORAFLEET_CLUSTER=external pytest -m integration
MSG
