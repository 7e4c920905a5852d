"""BaseModel controller: checks what the API server cannot (Secrets, operator defaults, the stored manifest)
and reports Ready with the verified digest.

The weights themselves are pulled and checked file by file by the pods that use them; FineTuneJobs and
AdapterDeployments that wait for a BaseModel are reconciled as soon as it changes.
"""

from __future__ import annotations

from lorafleet.api.basemodel import BaseModelStatus
from lorafleet.api.objects import BaseModelObject
from lorafleet.controllers import artifacts
from lorafleet.controllers.base import SETTINGS, Reconciler, now, register_reconciler
from lorafleet.controllers.store_refs import bind_basemodel
from lorafleet.resources.conditions import Reason
from lorafleet.resources.status import ArtifactCheck, BaseModelObserved, basemodel_secret_names, basemodel_status

KIND = "BaseModel"


def reconcile(bm: BaseModelObject) -> BaseModelStatus:
    namespace = bm.namespace
    bm, refused = bind_basemodel(bm)
    if refused is not None:  # the store is never read: the reference itself is the problem
        refusal = ArtifactCheck(problem=(refused.reason, refused.message))
        observed = BaseModelObserved(default_store_configured=True, source_check=refusal)
        return basemodel_status(bm, observed, now())
    try:
        missing = next((n for n in basemodel_secret_names(bm) if artifacts.read_secret(namespace, n) is None), None)
    except artifacts.SecretForbidden as exc:  # the chart's RBAC does not reach this namespace's Secrets
        forbidden = ArtifactCheck(problem=(Reason.STORE_NOT_ALLOWED, str(exc)))
        return basemodel_status(bm, BaseModelObserved(default_store_configured=True, source_check=forbidden), now())
    source = bm.spec.source
    configured = bool(SETTINGS.store_endpoint) or source.store is not None
    check = None
    if source.uri.startswith("s3://") and configured and not missing:
        check = artifacts.MANIFESTS.get(source.store, namespace, source.uri, source.digest)
    observed = BaseModelObserved(
        default_store_configured=bool(SETTINGS.store_endpoint), missing_secret=missing, source_check=check
    )
    return basemodel_status(bm, observed, now())


RECONCILER = Reconciler(KIND, "basemodels", BaseModelObject, reconcile)
register_reconciler(RECONCILER)
