"""The three custom resources as whole objects (metadata, spec, status), parsed once where a kopf handler
receives them (lorafleet.controllers) and passed typed from there on: to the builders and the status functions.

The spec keeps the CRD's strict model (the API server validated it against the schema generated from it); the
status and metadata ignore fields this operator does not know.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from lorafleet import API_VERSION
from lorafleet.api.adapterdeployment import AdapterDeploymentSpec, AdapterDeploymentStatus
from lorafleet.api.basemodel import BaseModelSpec, BaseModelStatus
from lorafleet.api.finetunejob import FineTuneJobSpec, FineTuneJobStatus


class _Object(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class ObjectMeta(_Object):
    """The parts of metav1.ObjectMeta the operator uses."""

    name: str
    namespace: str = ""
    uid: str = ""
    generation: int | None = None
    resource_version: str | None = None
    creation_timestamp: str | None = None
    deletion_timestamp: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class CustomResource(_Object):
    """What every lorafleet object has: identity and metadata."""

    KIND: ClassVar[str]  # the kind each subclass models
    api_version: str = API_VERSION
    kind: str
    metadata: ObjectMeta

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    @property
    def generation(self) -> int | None:
        return self.metadata.generation


class BaseModelObject(CustomResource):
    KIND: ClassVar[str] = "BaseModel"
    kind: Literal["BaseModel"] = "BaseModel"
    spec: BaseModelSpec
    status: BaseModelStatus | None = None


class FineTuneJobObject(CustomResource):
    KIND: ClassVar[str] = "FineTuneJob"
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None


class AdapterDeploymentObject(CustomResource):
    KIND: ClassVar[str] = "AdapterDeployment"
    kind: Literal["AdapterDeployment"] = "AdapterDeployment"
    spec: AdapterDeploymentSpec
    status: AdapterDeploymentStatus | None = None


_O = TypeVar("_O", bound=CustomResource)


def parse(cls: type[_O], body: Mapping[str, Any]) -> _O:
    """The typed object of a body as kopf or the API client hands it over (kopf's Body is a Mapping)."""
    return cls.model_validate(dict(body))
