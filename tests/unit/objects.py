"""Builders of test objects (in the style of kueue's wrappers): a valid object by default, tweaked per test."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from lorafleet import API_VERSION
from lorafleet.api.objects import AdapterDeploymentObject, BaseModelObject, FineTuneJobObject, parse
from lorafleet.contracts.trainer import TrainerReport
from lorafleet.resources import status
from lorafleet.resources.status import (
    AdapterDeploymentObserved,
    ArtifactCheck,
    BaseModelObserved,
    FineTuneJobObserved,
    status_dict,
)
from lorafleet.resources.stores import RenderError

Obj = dict[str, Any]


def _meta(name: str, namespace: str, generation: int = 1) -> Obj:
    return {
        "name": name,
        "namespace": namespace,
        "uid": f"uid-{name}-0000-0000",
        "generation": generation,
        "creationTimestamp": "2026-11-22T10:00:00Z",
    }


def base_model(name: str = "tiny-llama", namespace: str = "ml", **spec: Any) -> Obj:
    obj = {
        "apiVersion": API_VERSION,
        "kind": "BaseModel",
        "metadata": _meta(name, namespace),
        "spec": {"source": {"uri": "s3://models/tiny-llama/r1"}, "family": "llama"},
    }
    obj["spec"].update(copy.deepcopy(spec))
    return obj


def ready(obj: Obj, **status: Any) -> Obj:
    out = copy.deepcopy(obj)
    out["status"] = {"phase": "Ready", **status}
    return out


def fine_tune_job(name: str = "support", namespace: str = "ml", **spec: Any) -> Obj:
    obj = {
        "apiVersion": API_VERSION,
        "kind": "FineTuneJob",
        "metadata": _meta(name, namespace),
        "spec": {
            "baseModelRef": {"name": "tiny-llama"},
            "dataset": {"uri": "s3://datasets/support/train.jsonl", "format": "chat"},
            "output": {"adapterName": "support-bot", "version": "v1"},
            "training": {"maxSteps": 100, "checkpointInterval": 20},
            "resources": {"gpusPerNode": 1, "cpu": 8, "memory": "64Gi"},
        },
    }
    obj["spec"].update(copy.deepcopy(spec))
    return obj


def adapter_deployment(name: str = "chat", namespace: str = "ml", **spec: Any) -> Obj:
    obj = {
        "apiVersion": API_VERSION,
        "kind": "AdapterDeployment",
        "metadata": _meta(name, namespace),
        "spec": {
            "baseModelRef": {"name": "tiny-llama"},
            "adapters": [
                {"name": "support-bot", "fineTuneJobRef": {"name": "support"}},
                {
                    "name": "sql",
                    "artifact": {
                        "uri": "s3://lorafleet/adapters/sql/v3",
                        "digest": "sha256:" + "ab" * 32,
                    },
                },
            ],
            "replicas": 2,
            "resources": {"gpusPerReplica": 1, "cpu": 8, "memory": "32Gi"},
        },
    }
    obj["spec"].update(copy.deepcopy(spec))
    return obj


# -- typed objects and the status functions as the controllers call them -------------------------------------


def as_base_model(obj: Obj) -> BaseModelObject:
    return parse(BaseModelObject, obj)


def as_fine_tune_job(obj: Obj) -> FineTuneJobObject:
    return parse(FineTuneJobObject, obj)


def basemodel_obj(obj: Obj | None) -> BaseModelObject | None:
    return None if obj is None else parse(BaseModelObject, obj)


def fine_tune_job_obj(obj: Obj | None) -> FineTuneJobObject | None:
    return None if obj is None else parse(FineTuneJobObject, obj)


def adapter_deployment_obj(obj: Obj) -> AdapterDeploymentObject:
    return parse(AdapterDeploymentObject, obj)


def fine_tune_jobs(jobs: Mapping[str, Obj | None]) -> dict[str, FineTuneJobObject | None]:
    return {name: fine_tune_job_obj(job) for name, job in jobs.items()}


def basemodel_status(
    bm: Obj,
    *,
    default_store_configured: bool,
    missing_secret: str | None,
    now: datetime,
    source_check: ArtifactCheck | None = None,
) -> Obj:
    """lorafleet.resources.status.basemodel_status on a body, as the controller's write sees it (JSON)."""
    observed = BaseModelObserved(default_store_configured, missing_secret, source_check)
    return status_dict(status.basemodel_status(parse(BaseModelObject, bm), observed, now))


def finetunejob_status(
    ftj: Obj,
    *,
    base_model: Obj | None,
    job: Obj | None,
    now: datetime,
    trainer_report: Obj | None = None,
    render_error: RenderError | None = None,
) -> Obj:
    """lorafleet.resources.status.finetunejob_status on bodies and the trainer's JSON report, as JSON."""
    report = None if trainer_report is None else TrainerReport.model_validate(trainer_report)
    observed = FineTuneJobObserved(basemodel_obj(base_model), job, report, render_error)
    return status_dict(status.finetunejob_status(parse(FineTuneJobObject, ftj), observed, now))


def adapterdeployment_status(
    ad: Obj,
    *,
    base_model: Obj | None,
    fine_tune_jobs: Mapping[str, Obj | None],
    deployment: Obj | None,
    service_host: str | None,
    adapter_reports: Mapping[str, Any] | None = None,
    now: datetime,
    render_error: RenderError | None = None,
) -> Obj:
    """lorafleet.resources.status.adapterdeployment_status on bodies, as JSON."""
    observed = AdapterDeploymentObserved(
        basemodel_obj(base_model),
        {name: fine_tune_job_obj(job) for name, job in fine_tune_jobs.items()},
        deployment,
        service_host,
        adapter_reports,
        render_error,
    )
    return status_dict(status.adapterdeployment_status(parse(AdapterDeploymentObject, ad), observed, now))
