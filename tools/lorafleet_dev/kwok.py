"""kwok configuration for the local cluster: fake GPU/CPU nodes and the Stages that drive their pods.

Pod lifecycle on the fake nodes (kwok's default stages plus two of ours):

* every pod becomes Running (kwok ``pod-ready``);
* a pod owned by a Job turns Succeeded after ``JOB_COMPLETE_DELAY_MS`` (2 s) -- long enough for a test to
  see it Running first; the delay can be set per pod with the annotation ``lorafleet.io/kwok-duration``
  (a Go duration such as ``"10s"``);
* a pod annotated ``lorafleet.io/kwok-fail: "true"`` (any owner) turns Failed, container exit code 1,
  after ``FAIL_DELAY_MS`` (1 s, also overridable with ``lorafleet.io/kwok-duration``). The exit code
  can be chosen with ``lorafleet.io/kwok-exit-code``. Give such Jobs ``backoffLimit: 0`` to fail at once;
* pods of other owners (Deployments, ...) stay Running until deleted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
FAKE_NODE_SELECTOR = f"{FAKE_NODE_ANNOTATION}=fake"
FAIL_ANNOTATION = "lorafleet.io/kwok-fail"
DURATION_ANNOTATION = "lorafleet.io/kwok-duration"
EXIT_CODE_ANNOTATION = "lorafleet.io/kwok-exit-code"
JOB_COMPLETE_DELAY_MS = 2000
FAIL_DELAY_MS = 1000

GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
GPU_NODES = ("lorafleet-gpu-0", "lorafleet-gpu-1")
CPU_NODES = ("lorafleet-cpu-0",)

_FAIL_TEMPLATE = """\
{{ $now := Now }}
{{ $annotations := or .metadata.annotations dict }}
{{ $exitCode := or ( index $annotations "EXIT_ANNOTATION" ) 1 }}
conditions:
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Initialized
- lastTransitionTime: {{ $now | Quote }}
  status: "False"
  reason: PodFailed
  type: Ready
- lastTransitionTime: {{ $now | Quote }}
  status: "False"
  reason: PodFailed
  type: ContainersReady
containerStatuses:
{{ range .spec.containers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: false
  restartCount: 0
  started: false
  state:
    terminated:
      exitCode: {{ $exitCode }}
      finishedAt: {{ $now | Quote }}
      reason: Error
      message: "failed on purpose (FAIL_ANNOTATION)"
      startedAt: {{ $now | Quote }}
{{ end }}
phase: Failed
""".replace("EXIT_ANNOTATION", EXIT_CODE_ANNOTATION).replace("FAIL_ANNOTATION", FAIL_ANNOTATION)


def _annotation_key(name: str) -> str:
    return f'.metadata.annotations["{name}"]'


# kwok's own pod-complete template (kustomize/stage/pod/fast/pod-complete.yaml, Apache-2.0).
_COMPLETE_TEMPLATE = """\
{{ $now := Now }}
containerStatuses:
{{ range .spec.containers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: false
  restartCount: 0
  started: false
  state:
    terminated:
      exitCode: 0
      finishedAt: {{ $now | Quote }}
      reason: Completed
      startedAt: {{ $now | Quote }}
{{ end }}
phase: Succeeded
"""

_RUNNING = [
    {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"},
    {"key": ".status.phase", "operator": "In", "values": ["Running"]},
]
UPSTREAM_STAGES = ("node-initialize", "node-heartbeat-with-lease", "pod-ready", "pod-delete")


def _pod_stage(name: str, match: list[dict[str, Any]], delay_ms: int, template: str) -> dict[str, Any]:
    return {
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "Stage",
        "metadata": {"name": name},
        "spec": {
            "resourceRef": {"apiGroup": "v1", "kind": "Pod"},
            "selector": {"matchExpressions": _RUNNING + match},
            "delay": {
                "durationMilliseconds": delay_ms,
                "durationFrom": {"jq": {"expression": _annotation_key(DURATION_ANNOTATION)}},
            },
            "next": {"statusTemplate": template},
        },
    }


def custom_stages() -> list[dict[str, Any]]:
    """Job-complete (replaces kwok's ``pod-complete``: delayed, skips failing pods) and pod-fail stages."""
    fail_key = _annotation_key(FAIL_ANNOTATION)
    return [
        _pod_stage(
            "pod-complete",
            [
                {"key": ".metadata.ownerReferences.[].kind", "operator": "In", "values": ["Job"]},
                {"key": fail_key, "operator": "NotIn", "values": ["true"]},
            ],
            JOB_COMPLETE_DELAY_MS,
            _COMPLETE_TEMPLATE,
        ),
        _pod_stage(
            "lorafleet-pod-fail",
            [{"key": fail_key, "operator": "In", "values": ["true"]}],
            FAIL_DELAY_MS,
            _FAIL_TEMPLATE,
        ),
    ]


def stages(upstream_dir: Path) -> list[dict[str, Any]]:
    """kwok's default node and pod stages (copied from its source at build time) plus ours."""
    loaded = {}
    for f in sorted(upstream_dir.glob("*.yaml")):
        doc = yaml.safe_load(f.read_text())
        loaded[doc["metadata"]["name"]] = doc
    missing = set(UPSTREAM_STAGES) - set(loaded)
    if missing:
        raise FileNotFoundError(f"kwok stages {sorted(missing)} not found in {upstream_dir}")
    # kwok's pod-delete only deletes; a Job's pod keeps the job controller's tracking finalizer until the pod is
    # terminal, which a deleted fake pod never becomes (no kubelet), so it would stay Terminating for ever. Clear the
    # finalizers as the pod is deleted, as a kubelet's final status would let the job controller do.
    loaded["pod-delete"]["spec"]["next"]["finalizers"] = {"empty": True}
    return [loaded[n] for n in UPSTREAM_STAGES] + custom_stages()


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (the Go templates) as readable literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def dump(docs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False)


def write_config(path: Path, upstream_dir: Path) -> Path:
    path.write_text(dump(stages(upstream_dir)))
    return path


def _node(name: str, labels: dict[str, str], capacity: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {FAKE_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node-role.kubernetes.io/agent": "",
                **labels,
            },
        },
        # No taints: workloads need no tolerations to land on the fake nodes.
        "spec": {},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def nodes() -> list[dict[str, Any]]:
    gpu = [
        _node(
            n,
            {
                "lorafleet.io/node-pool": "gpu",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": GPU_PRODUCT,
                "nvidia.com/gpu.count": "8",
                "nvidia.com/gpu.memory": "81559",
            },
            {"cpu": "96", "memory": "1Ti", "pods": "110", "ephemeral-storage": "2Ti", "nvidia.com/gpu": "8"},
        )
        for n in GPU_NODES
    ]
    cpu = [
        _node(
            n,
            {"lorafleet.io/node-pool": "cpu"},
            {"cpu": "32", "memory": "128Gi", "pods": "110", "ephemeral-storage": "500Gi"},
        )
        for n in CPU_NODES
    ]
    return gpu + cpu


def write_nodes(path: Path) -> Path:
    path.write_text(dump(nodes()))
    return path
