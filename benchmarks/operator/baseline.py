"""The baseline of the operator benchmark: a minimal kopf operator that creates one Job per FineTuneJob.

    KUBECONFIG=... python benchmarks/operator/baseline.py --namespace NS

What a team would write in an afternoon with kopf and the official client: one ``on.create`` handler that
creates a Job (one container, the FineTuneJob's GPU count, node selector, pod annotations and backoff limit)
owned by the FineTuneJob (``kopf.adopt``: controller owner reference, so the garbage collector deletes it with
its owner), and for the AdapterDeployment run one that creates a Deployment. No status, no resync, no other
children, no finalizer. Settings shared with lorafleet's operator so that the comparison is about the design,
not the knobs: standalone (no peering), Events only for warnings, 16 worker threads for sync handlers, watches
only in ``--namespace``. Everything else is kopf's default.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

GROUP, VERSION = "lorafleet.io", "v1alpha1"
IMAGE = "lorafleet/trainer:benchmark-baseline"
MAX_WORKERS = 16  # as lorafleet.controllers.runtime.MAX_WORKERS


def job_for(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The one child: a Job shaped like a training Job, without lorafleet's config, RBAC or policy."""
    resources = spec.get("resources") or {}
    gpus = int(resources.get("gpusPerNode", 1))
    limits = {"nvidia.com/gpu": str(gpus)} if gpus else {}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [
            {
                "name": "trainer",
                "image": spec.get("image") or IMAGE,
                "args": ["train", "--job", name],
                "resources": {"limits": limits} if limits else {},
            }
        ],
    }
    if resources.get("nodeSelector"):
        pod_spec["nodeSelector"] = dict(resources["nodeSelector"])
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"{name}-train", "labels": {"app.kubernetes.io/managed-by": "baseline"}},
        "spec": {
            "backoffLimit": int(spec.get("backoffLimit", 3)),
            "template": {
                "metadata": {"annotations": dict(resources.get("podAnnotations") or {})},
                "spec": pod_spec,
            },
        },
    }


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.peering.standalone = True
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = MAX_WORKERS
    config.load_kube_config()  # type: ignore[no-untyped-call]


@kopf.on.create(GROUP, VERSION, "finetunejobs")
def create_job(body: kopf.Body, name: str, namespace: str | None, spec: kopf.Spec, **_: Any) -> None:
    job: Any = job_for(name, dict(spec))  # the client takes plain dicts as bodies
    kopf.adopt(job, owner=body)
    try:
        client.BatchV1Api().create_namespaced_job(namespace or "", job)
    except ApiException as exc:
        if exc.status != 409:  # already there: a retry after a lost response
            raise


def deployment_for(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The one child of an AdapterDeployment: a Deployment shaped like the serving one, without lorafleet's
    adapter ConfigMap, sidecar, Service, policies or status."""
    resources = spec.get("resources") or {}
    labels = {"app.kubernetes.io/managed-by": "baseline", "baseline/adapterdeployment": name}
    pod_spec: dict[str, Any] = {"containers": [{"name": "vllm", "image": IMAGE, "args": ["serve"]}]}
    if resources.get("nodeSelector"):
        pod_spec["nodeSelector"] = dict(resources["nodeSelector"])
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": f"{name}-vllm", "labels": labels},
        "spec": {
            "replicas": int(spec.get("replicas", 1)),
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": dict(resources.get("podAnnotations") or {})},
                "spec": pod_spec,
            },
        },
    }


@kopf.on.create(GROUP, VERSION, "adapterdeployments")
def create_deployment(body: kopf.Body, name: str, namespace: str | None, spec: kopf.Spec, **_: Any) -> None:
    deployment: Any = deployment_for(name, dict(spec))
    kopf.adopt(deployment, owner=body)
    try:
        client.AppsV1Api().create_namespaced_deployment(namespace or "", deployment)
    except ApiException as exc:
        if exc.status != 409:
            raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--namespace", action="append", required=True, help="namespace to watch (repeatable)")
    args = parser.parse_args()
    kopf.configure(log_format=kopf.LogFormat.FULL)
    kopf.run(standalone=True, namespaces=args.namespace, clusterwide=False)


if __name__ == "__main__":
    main()
