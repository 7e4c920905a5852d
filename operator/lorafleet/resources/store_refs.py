"""Resolving a `storeRef` (pure): which store an object may use and under which key prefix.

A ClusterArtifactStore is the platform team's: usable only from the namespaces it allows, and each namespace's
artifacts live under `s3://<bucket>/<prefix>/<namespace>/`. An ArtifactStore is a team's own and is looked up
in the referencing object's namespace only, so another team's store cannot be named at all. The operator's
default store (Helm artifactStore) is the implicit ClusterArtifactStore `default`, allowed everywhere. Either
kind must sit at an endpoint the platform allows (the default store's, or artifactStore.allowedEndpoints): the
Helm values stay the one root of trust for where credentials may be sent.

An object naming neither `store` nor `storeRef` uses the default store too, on the same terms (`default_location`):
what it writes and the adapters it serves lie under `<artifactStore.uri>/<namespace>/`. Read-only inputs (base
model weights, datasets) may also come from anywhere outside `<artifactStore.uri>/`, where the platform team keeps
shared base models; never from another namespace's root (`require_shared_readable`).

The controller looks the objects up (controllers.store_refs) and calls `resolve` with what it found.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from lorafleet.api.common import ObjectStore, S3CredentialsRef, SecretKeySelector
from lorafleet.api.stores import (
    AllowedNamespaces,
    ArtifactStoreSpec,
    ClusterArtifactStoreSpec,
    LabelSelector,
    StoreConnection,
    StoreRef,
    StoreSts,
)
from lorafleet.config import OperatorSettings
from lorafleet.resources.conditions import Reason
from lorafleet.resources.stores import RenderError, allowed_endpoints, default_store
from lorafleet.uris import pvc_subpath

DEFAULT_STORE = "default"
CLUSTER = "ClusterArtifactStore"
NAMESPACED = "ArtifactStore"


class MintingStore(ObjectStore):
    """A ClusterArtifactStore with spec.sts.enabled, as `resolve` binds it (never parsed from a spec: a tenant
    cannot write one). Its workloads name minted Secrets (controllers.credentials); the operator's own reads and
    deletes (controllers.artifacts.store_for) use the store's keys and CA bundle from the operator's namespace,
    never a Secret of the object's namespace, and stay inside `root`."""

    store_name: str
    root: str
    platform_credentials: S3CredentialsRef
    platform_ca: SecretKeySelector | None = None
    sts: StoreSts


def same_minting_store(store: ObjectStore | None, minting: ObjectStore | None) -> bool:
    """Both are the same ClusterArtifactStore with spec.sts, bound for the same namespace (its location)."""
    return (
        isinstance(store, MintingStore)
        and isinstance(minting, MintingStore)
        and store.store_name == minting.store_name
        and store.root == minting.root
    )


def require_base_minted_by(base_store: ObjectStore | None, minting: ObjectStore | None, workload: str) -> None:
    """Base weights in a ClusterArtifactStore with spec.sts are read by a workload only with keys that store minted
    for it: the store the workload's own keys are minted by (`minting`: a FineTuneJob's output store, an
    AdapterDeployment's adapters' store) must be that same store, whose grant then adds the weights read-only. One
    minted Secret per workload: a base in another store (or a workload without minted keys of that store) is
    StoreNotAllowed, never the store's own Secret expected in the tenant's namespace."""
    if not isinstance(base_store, MintingStore) or same_minting_store(base_store, minting):
        return
    name = base_store.store_name
    raise RenderError(
        Reason.STORE_NOT_ALLOWED,
        f'the BaseModel\'s weights are in ClusterArtifactStore "{name}" (BaseModel spec.source.storeRef), whose '
        f"spec.sts mints the keys that read them, but {workload} is not in that store: its workloads get keys minted "
        f'by one store only; put {workload} in ClusterArtifactStore "{name}" too (storeRef), or use a BaseModel '
        "from another store",
    )


@dataclass(frozen=True)
class ResolvedStore:
    """A store an object may use: how to reach it (the inline form the workloads already understand) and the
    root its URIs must lie under."""

    ref: StoreRef
    store: ObjectStore
    root: str  # s3://bucket[/prefix][/namespace], no trailing slash
    # A ClusterArtifactStore that mints its workloads' credentials (spec.sts.enabled), None otherwise.
    sts: StoreSts | None = None

    @property
    def label(self) -> str:
        return describe(self.ref)


def describe(ref: StoreRef) -> str:
    return f'{ref.kind} "{ref.name}"'


def selector_matches(selector: LabelSelector, labels: Mapping[str, str]) -> bool:
    """metav1.LabelSelector semantics: every matchLabels pair and every expression must hold."""
    if any(labels.get(k) != v for k, v in selector.match_labels.items()):
        return False
    for req in selector.match_expressions:
        present = req.key in labels
        if req.operator == "In" and not (present and labels[req.key] in req.values):
            return False
        if req.operator == "NotIn" and present and labels[req.key] in req.values:
            return False
        if req.operator == "Exists" and not present:
            return False
        if req.operator == "DoesNotExist" and present:
            return False
    return True


def namespace_allowed(allowed: AllowedNamespaces, namespace: str, labels: Mapping[str, str]) -> bool:
    if namespace in allowed.names:
        return True
    return allowed.selector is not None and selector_matches(allowed.selector, labels)


def _inline(spec: StoreConnection, credentials: Any) -> ObjectStore:
    return ObjectStore(
        endpoint=spec.endpoint,
        region=spec.region,
        credentials_secret_ref=credentials,
        ca_bundle_secret_ref=spec.ca_bundle_secret_ref,
        insecure_skip_tls_verify=spec.insecure_skip_tls_verify,
        server_side_encryption=spec.server_side_encryption,
        checksum_headers=spec.checksum_headers,
    )


def _root(spec: StoreConnection, *tail: str) -> str:
    return "/".join(["s3:/", spec.bucket, *([spec.prefix] if spec.prefix else []), *tail])


def resolve(
    ref: StoreRef,
    namespace: str,
    found: Mapping[str, Any] | None,
    namespace_labels: Mapping[str, str],
    settings: OperatorSettings,
    field: str,
) -> ResolvedStore:
    """The store `ref` names for an object of `namespace`, given the object found by that name (a
    ClusterArtifactStore, or an ArtifactStore of `namespace`; None: not found). RenderError says why not."""
    if ref.kind == CLUSTER and ref.name == DEFAULT_STORE and found is None:
        store = default_store(settings)
        if store is None or not settings.store_uri:
            raise RenderError(
                Reason.STORE_NOT_CONFIGURED,
                f'{field}.storeRef names ClusterArtifactStore "default", but the operator has no default artifact '
                "store: set the Helm values artifactStore.endpoint and artifactStore.uri, or name another store",
            )
        return ResolvedStore(ref, store, f"{settings.store_uri.rstrip('/')}/{namespace}")
    if found is None:
        where = "" if ref.kind == CLUSTER else f' in namespace "{namespace}"'
        raise RenderError(
            Reason.STORE_NOT_FOUND,
            f"{field}.storeRef: {describe(ref)} not found{where}; create it or fix the name (an ArtifactStore is "
            "looked up in the object's own namespace only)",
        )
    try:
        if ref.kind == CLUSTER:
            cluster = ClusterArtifactStoreSpec.model_validate(found.get("spec") or {})
        else:
            team = ArtifactStoreSpec.model_validate(found.get("spec") or {})
    except ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in e["loc"]) or "spec" for e in exc.errors())
        raise RenderError(Reason.STORE_NOT_ALLOWED, f"{describe(ref)} has an invalid spec ({fields})") from None
    spec: StoreConnection = cluster if ref.kind == CLUSTER else team
    if ref.kind == CLUSTER and not namespace_allowed(cluster.allowed_namespaces, namespace, namespace_labels):
        raise RenderError(
            Reason.STORE_NOT_ALLOWED,
            f'{field}.storeRef: {describe(ref)} does not allow namespace "{namespace}" (its spec.allowedNamespaces): '
            "ask the platform team to allow it, or name another store",
        )
    allowed = allowed_endpoints(settings)
    if spec.endpoint.rstrip("/") not in allowed:
        raise RenderError(
            Reason.STORE_NOT_ALLOWED,
            f"{field}.storeRef: {describe(ref)} is at {spec.endpoint}, not an endpoint the platform allows "
            f"(allowed: {', '.join(allowed) or 'none'}): the platform team adds it to the Helm value "
            "artifactStore.allowedEndpoints",
        )
    if ref.kind == CLUSTER:
        root = _root(cluster, namespace)
        if not cluster.sts.enabled:
            return ResolvedStore(ref, _inline(cluster, cluster.credentials_secret_ref), root)
        if cluster.credentials_secret_ref is None:
            raise RenderError(
                Reason.STORE_NOT_CONFIGURED,
                f"{describe(ref)} has spec.sts.enabled but no spec.credentialsSecretRef: the platform team names the "
                f'Secret (in the operator\'s namespace "{settings.operator_namespace}") whose keys mint the '
                "workloads' credentials",
            )
        inline = _inline(cluster, cluster.credentials_secret_ref)
        minting = MintingStore(
            **dict(inline),
            store_name=ref.name,
            root=root,
            platform_credentials=cluster.credentials_secret_ref,
            platform_ca=cluster.ca_bundle_secret_ref,
            sts=cluster.sts,
        )
        return ResolvedStore(ref, minting, root, sts=cluster.sts)
    require_own_secret(team, settings, f"{field}.storeRef: {describe(ref)} spec")
    return ResolvedStore(ref, _inline(team, team.credentials_secret_ref), _root(team))


def read_only_source(resolved: ResolvedStore) -> ObjectStore:
    """A BaseModel's source store as bound (controllers.store_refs.bind_basemodel): a ClusterArtifactStore with
    spec.sts names no credentials Secret at all (the operator reads with the store's keys from its namespace, the
    workloads with keys minted for them), any other store as resolved."""
    if isinstance(resolved.store, MintingStore):
        return resolved.store.model_copy(update={"credentials_secret_ref": None})
    return resolved.store


def require_own_secret(store: ArtifactStoreSpec | ObjectStore, settings: OperatorSettings, field: str) -> None:
    """A store a tenant wrote (inline `store`, or its ArtifactStore) uses a Secret of its own, never the copy of the
    platform's keys that workloads of the default store read (Helm artifactStore.credentialsSecret): with those
    keys and a URI of its choosing it would read or write anywhere the platform can."""
    ref = store.credentials_secret_ref
    platform = settings.store_credentials_secret
    if ref is not None and platform and ref.name == platform:
        raise RenderError(
            Reason.STORE_NOT_ALLOWED,
            f'{field}.credentialsSecretRef names Secret "{ref.name}", the platform\'s keys for the default store '
            "(Helm artifactStore.credentialsSecret): a store of your own uses a Secret of your own; to use the "
            f"default store, leave {field} out or name it with storeRef (its per-namespace location applies)",
        )


def require_inline_served(store: ObjectStore, uri: str, namespace: str, settings: OperatorSettings, field: str) -> None:
    """An adapter a tenant names with an inline `store`: at the default store's endpoint the serving sidecar reads
    it with the default store's keys (it holds no other Secret), so the default store's location rule applies;
    elsewhere it is read unsigned."""
    require_own_secret(store, settings, field)
    if settings.store_endpoint and store.endpoint.rstrip("/") == settings.store_endpoint.rstrip("/"):
        require_within(uri, default_location(namespace, settings, field), f"{field}.uri")


def plain_key(uri: str) -> bool:
    """No '.', '..' or empty segment, backslash or %2e/%2f/%5c in the key: a server or proxy that normalises paths
    could otherwise resolve s3://b/team-a/../team-b to another team's root."""
    _, _, rest = uri.partition("://")
    _, _, key = rest.partition("/")
    try:
        pvc_subpath(key)  # the same rules as a pvc:// path inside its claim
    except ValueError:
        return False
    return True


def within(uri: str, root: str) -> bool:
    """`uri` names `root` or a key under it (by whole segments: s3://b/team-a does not contain s3://b/team-ab),
    written plainly (`plain_key`)."""
    uri, root = uri.rstrip("/"), root.rstrip("/")
    return plain_key(uri) and (uri == root or uri.startswith(root + "/"))


def default_location(namespace: str, settings: OperatorSettings, field: str) -> ResolvedStore:
    """The default store, for an object naming neither `store` nor `storeRef`: the implicit ClusterArtifactStore
    "default", rooted at `<artifactStore.uri>/<namespace>`. RenderError when the operator has none."""
    return resolve(StoreRef(kind=CLUSTER, name=DEFAULT_STORE), namespace, None, {}, settings, field)


def require_shared_readable(uri: str, namespace: str, settings: OperatorSettings, field: str) -> None:
    """A read-only input of the default store (base model weights, a dataset): this namespace's root, or anywhere
    outside `<artifactStore.uri>/`, never another namespace's root (its adapters and checkpoints)."""
    top = (settings.store_uri or "").rstrip("/")
    if not plain_key(uri):
        raise RenderError(
            Reason.STORE_NOT_ALLOWED,
            f"{field} {uri} holds '.', '..' or empty segments, backslashes or %2e/%2f/%5c: write the plain key",
        )
    if not top or not within(uri, top):
        return
    own = f"{top}/{namespace}"
    if not within(uri, own):
        raise RenderError(
            Reason.STORE_NOT_ALLOWED,
            f"{field} {uri} is under the default store's per-namespace location ({top}/<namespace>/) but not this "
            f"namespace's ({own}/): another team's artifacts are not readable; name a URI under {own}/, or a shared "
            f"base model outside {top}/ (where the platform team keeps them)",
        )


def require_within(uri: str, resolved: ResolvedStore, field: str) -> None:
    if not within(uri, resolved.root):
        raise RenderError(
            Reason.STORE_NOT_ALLOWED,
            f"{field} {uri} is outside {resolved.label}'s location for this namespace ({resolved.root}/): name a "
            "URI under it, or another store",
        )
