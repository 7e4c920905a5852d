"""Status of each lorafleet kind: one module per kind, pure functions called once per reconcile pass.

Each takes the typed object (lorafleet.api.objects), what the controller observed (the kind's `Observed`
dataclass: dependencies, children, reports from the pods, a render error) and `now`, and returns the kind's
Status model. Conditions keep their lastTransitionTime while their status holds, so the result can be compared
with the previous status and the differences turned into Events (lorafleet.resources.conditions.transitions).
"""

from lorafleet.resources.status.adapterdeployment import (
    AdapterDeploymentObserved,
    ResolvedAdapter,
    adapterdeployment_status,
    resolve_adapters,
)
from lorafleet.resources.status.basemodel import BaseModelObserved, basemodel_secret_names, basemodel_status
from lorafleet.resources.status.common import ArtifactCheck, status_dict, status_patch
from lorafleet.resources.status.finetunejob import FineTuneJobObserved, finetunejob_status

__all__ = [
    "AdapterDeploymentObserved",
    "ArtifactCheck",
    "BaseModelObserved",
    "FineTuneJobObserved",
    "ResolvedAdapter",
    "adapterdeployment_status",
    "basemodel_secret_names",
    "basemodel_status",
    "finetunejob_status",
    "resolve_adapters",
    "status_dict",
    "status_patch",
]
