"""The registry of lorafleet kinds: one entry per kind, from which CRDs and clients are derived."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lorafleet import GROUP, VERSION
from lorafleet.api.adapterdeployment import (
    ADAPTER_DEPLOYMENT_NAME_VALIDATIONS,
    ADAPTER_DEPLOYMENT_VALIDATIONS,
    AdapterDeploymentSpec,
    AdapterDeploymentStatus,
)
from lorafleet.api.basemodel import BASE_MODEL_VALIDATIONS, BaseModelSpec, BaseModelStatus
from lorafleet.api.crdgen import CRDInfo, crd_manifest, dump_yaml
from lorafleet.api.finetunejob import (
    FINE_TUNE_JOB_NAME_VALIDATIONS,
    FINE_TUNE_JOB_VALIDATIONS,
    FineTuneJobSpec,
    FineTuneJobStatus,
)
from lorafleet.api.stores import ArtifactStoreSpec, ClusterArtifactStoreSpec, StoreStatus


def _column(name: str, path: str, type_: str = "string", priority: int = 0) -> dict[str, Any]:
    column: dict[str, Any] = {"name": name, "type": type_, "jsonPath": path}
    if priority:
        column["priority"] = priority
    return column


@dataclass(frozen=True)
class Kind:
    info: CRDInfo
    spec: type[BaseModel]
    status: type[BaseModel]
    description: str
    validations: tuple[dict[str, str], ...]
    # Rules on the whole object: what its name must be (children are named after it).
    object_validations: tuple[dict[str, str], ...] = ()

    def crd(self) -> dict[str, Any]:
        return crd_manifest(
            self.info,
            self.spec,
            self.status,
            self.description,
            list(self.validations),
            list(self.object_validations),
        )

    @property
    def plural(self) -> str:
        return self.info.plural


BASE_MODEL = Kind(
    info=CRDInfo(
        group=GROUP,
        version=VERSION,
        kind="BaseModel",
        plural="basemodels",
        singular="basemodel",
        short_names=("bm",),
        categories=("lorafleet",),
        printer_columns=(
            _column("Phase", ".status.phase"),
            _column("Family", ".spec.family"),
            _column("Source", ".spec.source.uri"),
            _column("Digest", ".status.digest", priority=1),
        ),
    ),
    spec=BaseModelSpec,
    status=BaseModelStatus,
    description="An open model whose weights sit in on-prem object storage or on a volume.",
    validations=tuple(BASE_MODEL_VALIDATIONS),
)

FINE_TUNE_JOB = Kind(
    info=CRDInfo(
        group=GROUP,
        version=VERSION,
        kind="FineTuneJob",
        plural="finetunejobs",
        singular="finetunejob",
        short_names=("ftj",),
        categories=("lorafleet",),
        printer_columns=(
            _column("Phase", ".status.phase"),
            _column("Base", ".spec.baseModelRef.name"),
            _column("Method", ".spec.method"),
            _column("Step", ".status.progress.step", "integer"),
            _column("Loss", ".status.progress.loss", "number"),
            _column("Score", ".status.evaluation.score"),
            _column("GPU-s", ".status.usage.gpuSeconds", "number", priority=1),
            _column("CPU-s", ".status.usage.cpuSeconds", "number", priority=1),
            _column("Cost", ".status.usage.estimatedCost", priority=1),
            _column("Artifact", ".status.artifact.uri", priority=1),
        ),
    ),
    spec=FineTuneJobSpec,
    status=FineTuneJobStatus,
    description="A LoRA or QLoRA fine-tune of a BaseModel on a private dataset, run as a Kubernetes Job.",
    validations=tuple(FINE_TUNE_JOB_VALIDATIONS),
    object_validations=tuple(FINE_TUNE_JOB_NAME_VALIDATIONS),
)

ADAPTER_DEPLOYMENT = Kind(
    info=CRDInfo(
        group=GROUP,
        version=VERSION,
        kind="AdapterDeployment",
        plural="adapterdeployments",
        singular="adapterdeployment",
        short_names=("ad",),
        categories=("lorafleet",),
        printer_columns=(
            _column("Phase", ".status.phase"),
            _column("Base", ".spec.baseModelRef.name"),
            _column("Ready", ".status.readyReplicas", "integer"),
            _column("Replicas", ".spec.replicas", "integer"),
            _column("Adapters", ".status.adaptersReady"),
            _column("Endpoint", ".status.endpoint", priority=1),
        ),
    ),
    spec=AdapterDeploymentSpec,
    status=AdapterDeploymentStatus,
    description="One base model served by vLLM with many LoRA adapters loaded at once.",
    validations=tuple(ADAPTER_DEPLOYMENT_VALIDATIONS),
    object_validations=tuple(ADAPTER_DEPLOYMENT_NAME_VALIDATIONS),
)

CLUSTER_ARTIFACT_STORE = Kind(
    info=CRDInfo(
        group=GROUP,
        version=VERSION,
        kind="ClusterArtifactStore",
        plural="clusterartifactstores",
        singular="clusterartifactstore",
        short_names=("cas",),
        categories=("lorafleet",),
        printer_columns=(
            _column("Endpoint", ".spec.endpoint"),
            _column("Bucket", ".spec.bucket"),
            _column("Prefix", ".spec.prefix"),
        ),
        scope="Cluster",
    ),
    spec=ClusterArtifactStoreSpec,
    status=StoreStatus,
    description="An artifact store the platform team defines for many namespaces; each namespace's artifacts "
    "live under <prefix>/<namespace>/.",
    validations=(),
)

ARTIFACT_STORE = Kind(
    info=CRDInfo(
        group=GROUP,
        version=VERSION,
        kind="ArtifactStore",
        plural="artifactstores",
        singular="artifactstore",
        short_names=("ast",),
        categories=("lorafleet",),
        printer_columns=(
            _column("Endpoint", ".spec.endpoint"),
            _column("Bucket", ".spec.bucket"),
            _column("Prefix", ".spec.prefix"),
        ),
    ),
    spec=ArtifactStoreSpec,
    status=StoreStatus,
    description="A team's own artifact store, with credentials of its namespace, at an endpoint the platform allows.",
    validations=(),
)

KINDS: tuple[Kind, ...] = (BASE_MODEL, FINE_TUNE_JOB, ADAPTER_DEPLOYMENT, CLUSTER_ARTIFACT_STORE, ARTIFACT_STORE)


def crd_files() -> dict[str, str]:
    """File name -> YAML text of every CRD, as committed under crds/."""
    return {f"{kind.info.group}_{kind.plural}.yaml": dump_yaml(kind.crd()) for kind in KINDS}


def write_crds(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in crd_files().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written
