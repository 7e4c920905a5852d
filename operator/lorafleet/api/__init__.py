"""The lorafleet API: pydantic models, the single source of truth for the CRDs."""

from lorafleet.api.adapterdeployment import AdapterDeploymentSpec, AdapterDeploymentStatus, AdapterSpec
from lorafleet.api.basemodel import BaseModelSpec, BaseModelStatus
from lorafleet.api.common import Condition
from lorafleet.api.finetunejob import FineTuneJobSpec, FineTuneJobStatus

__all__ = [
    "AdapterDeploymentSpec",
    "AdapterDeploymentStatus",
    "AdapterSpec",
    "BaseModelSpec",
    "BaseModelStatus",
    "Condition",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
]
