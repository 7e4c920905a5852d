"""BaseModel controller: checks what the API server cannot (Secrets, operator defaults, the stored manifest)
and reports Ready with the verified digest.

The weights themselves are pulled and checked file by file by the pods that use them; FineTuneJobs and
AdapterDeployments that wait for a BaseModel are reconciled as soon as it changes.
"""

from __future__ import annotations

from typing import Any

import kopf

from lorafleet import GROUP, VERSION, k8s
from lorafleet.api.basemodel import BaseModelSpec
from lorafleet.controllers import adapterdeployment, artifacts, finetunejob
from lorafleet.controllers.base import SETTINGS, Obj, now, reconcile_by_name, register_reconciler
from lorafleet.resources.status import basemodel_secret_names, basemodel_status

KIND = "BaseModel"


def reconcile(body: Obj) -> Obj:
    namespace = body["metadata"]["namespace"]
    missing = next((n for n in basemodel_secret_names(body) if k8s.get("v1", "Secret", n, namespace) is None), None)
    spec = BaseModelSpec.model_validate(body["spec"])
    configured = bool(SETTINGS.store_endpoint) or spec.source.store is not None
    check = None
    if spec.source.uri.startswith("s3://") and configured and not missing:
        check = artifacts.check_version(spec.source.store, namespace, spec.source.uri, spec.source.digest)
    return basemodel_status(
        body,
        default_store_configured=bool(SETTINGS.store_endpoint),
        missing_secret=missing,
        now=now(),
        source_check=check,
    )


register_reconciler("basemodels", reconcile)


@kopf.on.event(GROUP, VERSION, "basemodels", id="dependents")
def wake_dependents(event: kopf.RawEvent, body: kopf.Body, **kwargs: Any) -> None:
    """A BaseModel appearing, becoming Ready or going away moves the jobs and deployments that wait for it."""
    if event.get("type") not in ("ADDED", "MODIFIED", "DELETED"):
        return
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    for name in list(kwargs["finetunejobs_by_base_model"].get(key, ())):  # kopf mutates it concurrently
        reconcile_by_name(finetunejob.reconcile, finetunejob.KIND, name, key[0])
    for name in list(kwargs["adapterdeployments_by_base_model"].get(key, ())):
        reconcile_by_name(adapterdeployment.reconcile, adapterdeployment.KIND, name, key[0])
