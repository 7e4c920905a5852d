"""Binding `storeRef`s before a reconcile plans: each reference is looked up (in the object's own namespace for
an ArtifactStore), resolved (resources.store_refs, pure) and replaced by the inline store and location it stands
for, so the planners, the manifest checks and the pods' settings work unchanged on the bound copy.

A reference that cannot be used leaves the object unbound, with the RenderError its status shows
(StoreNotAllowed, StoreNotFound, StoreNotConfigured); nothing is read from or sent to that store.
"""

from __future__ import annotations

from typing import Any

from lorafleet import API_VERSION
from lorafleet.api.adapterdeployment import ArtifactRef
from lorafleet.api.common import S3CredentialsRef
from lorafleet.api.objects import AdapterDeploymentObject, BaseModelObject, FineTuneJobObject
from lorafleet.api.stores import StoreRef
from lorafleet.controllers.base import SETTINGS
from lorafleet.controllers.caches import CACHES
from lorafleet.resources.finetunejob import names_of as finetunejob_names
from lorafleet.resources.store_refs import (
    CLUSTER,
    ResolvedStore,
    default_location,
    read_only_source,
    require_inline_served,
    require_own_secret,
    require_shared_readable,
    require_within,
    resolve,
)
from lorafleet.resources.stores import RenderError
from lorafleet.uris import parse


def resolve_ref(ref: StoreRef, namespace: str, field: str) -> ResolvedStore:
    """Look the store up (live when no cache serves the kind) and resolve it for `namespace`."""
    found = CACHES.get(API_VERSION, ref.kind, ref.name, "" if ref.kind == CLUSTER else namespace)
    labels: dict[str, str] = {}
    if ref.kind == CLUSTER and found is not None:
        ns = CACHES.get("v1", "Namespace", namespace, "")
        labels = dict(((ns or {}).get("metadata") or {}).get("labels") or {})
    return resolve(ref, namespace, found, labels, SETTINGS, field)


def _replace(model: Any, **changes: Any) -> Any:
    return model.model_copy(update=changes)


def bind_basemodel(bm: BaseModelObject) -> tuple[BaseModelObject, RenderError | None]:
    """A source in the default store (neither store nor storeRef) is shared read-only, except other namespaces'
    roots (resources.store_refs.require_shared_readable). A ClusterArtifactStore with spec.sts is bound without a
    credentials Secret: the operator's manifest checks use the store's keys from its own namespace (MintingStore),
    and the workloads that fetch the weights read them with keys that store minted for them
    (resources.finetunejob.workload_grant, resources.serving_credentials.cluster_serving_grant), so the store's
    Secret is never expected in the tenant's namespace."""
    source = bm.spec.source
    if source.store_ref is None:
        try:
            if source.store is not None:
                require_own_secret(source.store, SETTINGS, "spec.source.store")
            elif parse(source.uri).scheme == "s3":
                require_shared_readable(source.uri, bm.namespace, SETTINGS, "spec.source.uri")
        except RenderError as exc:
            return bm, exc
        return bm, None
    try:
        resolved = resolve_ref(source.store_ref, bm.namespace, "spec.source")
        require_within(source.uri, resolved, "spec.source.uri")
    except RenderError as exc:
        return bm, exc
    spec = _replace(bm.spec, source=_replace(source, store=read_only_source(resolved), store_ref=None))
    return _replace(bm, spec=spec), None


def bind_finetunejob(ftj: FineTuneJobObject) -> tuple[FineTuneJobObject, RenderError | None]:
    """The output goes to the store's root for this namespace: <root>/adapters/<name>/<version>. A
    ClusterArtifactStore with spec.sts.enabled mints the trainer's credentials: the bound store names the FineTuneJob's
    minted Secret (never the store's), and the bound copy keeps its storeRef, which marks it as minting for the
    planner (resources.finetunejob.workload_grant) and the controller (which keys mint them)."""
    output = ftj.spec.output
    if output.store_ref is None:
        try:
            if output.store is not None:
                require_own_secret(output.store, SETTINGS, "spec.output.store")
        except RenderError as exc:
            return ftj, exc
        return ftj, None
    try:
        resolved = resolve_ref(output.store_ref, ftj.namespace, "spec.output")
    except RenderError as exc:
        return ftj, exc
    if resolved.sts is not None:
        minted = S3CredentialsRef(name=finetunejob_names(ftj).credentials)
        store = _replace(resolved.store, credentials_secret_ref=minted)
        spec = _replace(ftj.spec, output=_replace(output, store=store, uri=resolved.root))
    else:
        spec = _replace(ftj.spec, output=_replace(output, store=resolved.store, uri=resolved.root, store_ref=None))
    return _replace(ftj, spec=spec), None


def _bind_artifact(artifact: ArtifactRef, namespace: str, field: str) -> tuple[ArtifactRef, RenderError | None]:
    if artifact.store_ref is None:
        try:
            if artifact.store is None:
                require_within(artifact.uri, default_location(namespace, SETTINGS, field), f"{field}.uri")
            else:  # the sidecar reads the default store's endpoint with the default store's keys
                require_inline_served(artifact.store, artifact.uri, namespace, SETTINGS, f"{field}.store")
        except RenderError as exc:
            return artifact, exc
        return artifact, None
    try:
        resolved = resolve_ref(artifact.store_ref, namespace, field)
        require_within(artifact.uri, resolved, f"{field}.uri")
    except RenderError as exc:
        return artifact, exc
    return _replace(artifact, store=resolved.store, store_ref=None), None


def bind_adapterdeployment(ad: AdapterDeploymentObject) -> tuple[AdapterDeploymentObject, RenderError | None]:
    """Every adapter's artifact store (each version's, in a canary); the first that cannot be used is the error
    (the others stay bound). An artifact in the default store (neither store nor storeRef) is served, with the
    platform's keys, only from this namespace's root, as through storeRef ClusterArtifactStore "default"; so is one
    with an inline store at the default store's endpoint, which the sidecar reads with the default store's keys."""
    errors: list[RenderError] = []
    adapters = []
    for i, adapter in enumerate(ad.spec.adapters):
        if adapter.artifact is not None:
            artifact, error = _bind_artifact(adapter.artifact, ad.namespace, f"spec.adapters[{i}].artifact")
            errors += [error] if error is not None else []
            adapter = _replace(adapter, artifact=artifact)
        if adapter.versions is not None:
            versions = []
            for j, version in enumerate(adapter.versions):
                if version.artifact is not None:
                    field = f"spec.adapters[{i}].versions[{j}].artifact"
                    artifact, error = _bind_artifact(version.artifact, ad.namespace, field)
                    errors += [error] if error is not None else []
                    version = _replace(version, artifact=artifact)
                versions.append(version)
            adapter = _replace(adapter, versions=versions)
        adapters.append(adapter)
    return _replace(ad, spec=_replace(ad.spec, adapters=adapters)), next(iter(errors), None)
