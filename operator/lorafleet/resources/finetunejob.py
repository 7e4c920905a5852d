"""Desired children of a FineTuneJob: the training Job (its trainer config rides in its pod template), the
trainer's progress ConfigMap and least-privilege account and, when distributed, a headless Service for the
torchrun rendezvous; plus an egress NetworkPolicy."""

from __future__ import annotations

import json
from dataclasses import dataclass

from lorafleet.api.basemodel import BaseModelSpec
from lorafleet.api.common import ObjectStore as ApiObjectStore
from lorafleet.api.finetunejob import FineTuneJobSpec
from lorafleet.api.objects import BaseModelObject, FineTuneJobObject
from lorafleet.config import OperatorSettings
from lorafleet.contracts.base import lenient_copy
from lorafleet.contracts.exits import EXIT_INTERRUPTED, EXIT_INVALID_INPUT  # docs/trainer.md
from lorafleet.contracts.stores import ObjectStore, S3CredentialsRef
from lorafleet.contracts.trainer import (
    CONFIG_FILE,
    PROGRESS_CONFIG_MAP_ENV,
    BaseModelLocation,
    Dataset,
    DistributedSettings,
    JobIdentity,
    LoraSettings,
    OutputTarget,
    TrainerConfig,
    TrainingSettings,
)
from lorafleet.contracts.trainer import Evaluation as TrainerEvaluation
from lorafleet.resources.common import (
    DNS_LABEL_MAX,
    Obj,
    ca_bundle_volume,
    child_name,
    container_security_context,
    egress_network_policy,
    label_value,
    object_meta,
    offline_env,
    pod_security_context,
    resource_requirements,
    store_env,
    tolerations,
)
from lorafleet.resources.conditions import Reason
from lorafleet.resources.store_refs import (
    MintingStore,
    default_location,
    require_base_minted_by,
    require_shared_readable,
    require_within,
    same_minting_store,
    within,
)
from lorafleet.resources.stores import RenderError, default_store, resolve_store, resolve_store_uri
from lorafleet.storage.sts_policy import SECRET_KEYS, Grant
from lorafleet.uris import parse

COMPONENT = "trainer"
CONFIG_MOUNT = "/etc/lorafleet/trainer"
# The rendered TrainerConfig rides in the pod template's annotations and reaches the trainer as a file through
# the downward API: bound to the immutable Job (a tenant's edit of a ConfigMap cannot change what a running job
# does) and one object, and one API request, less per FineTuneJob (issue 14).
CONFIG_ANNOTATION = "lorafleet.io/trainer-config"
# The API server refuses a pod whose annotations exceed 256 KiB in all; keep room for the user's own.
CONFIG_MAX_BYTES = 128 * 1024
WORK_DIR = "/work"
MODEL_DIR = "/work/base-model"
TRAINER_CONTAINER = "trainer"
# Time the trainer gets after SIGTERM to write a checkpoint.
TERMINATION_GRACE_SECONDS = 120
# Every kind a FineTuneJob may own (desired_children), listed by the owner label to diff and prune.
CHILD_KINDS = (
    ("v1", "ConfigMap"),
    ("v1", "ServiceAccount"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("v1", "Service"),
    ("batch/v1", "Job"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
)
# Created once, never changed: a Job's pod template is immutable (children.diff).
CREATE_ONLY = frozenset({"Job"})


@dataclass(frozen=True)
class FineTuneJobNames:
    job: str
    service: str
    network_policy: str
    service_account: str
    progress: str
    credentials: str  # the minted store credentials (settings.store_sts), written by the controller


# An indexed (distributed) Job's pods are named by the Job controller `<job>-<index>` (their hostname, a DNS
# label): the Job's name leaves room for the largest index (spec.resources.nodes <= 128).
INDEXED_JOB_NAME_MAX = DNS_LABEL_MAX - len("-127")


def names(ftj_name: str, distributed: bool = False) -> FineTuneJobNames:
    return FineTuneJobNames(
        job=child_name(ftj_name, "train", INDEXED_JOB_NAME_MAX if distributed else DNS_LABEL_MAX),
        service=child_name(ftj_name, "rdzv"),
        network_policy=child_name(ftj_name, "egress"),
        service_account=child_name(ftj_name, "trainer"),
        progress=child_name(ftj_name, "progress"),
        credentials=child_name(ftj_name, "store"),
    )


def is_distributed(spec: FineTuneJobSpec) -> bool:
    return spec.resources.nodes > 1 or spec.resources.gpus_per_node > 1


def names_of(ftj: FineTuneJobObject) -> FineTuneJobNames:
    """A FineTuneJob's child names (its spec is immutable, so they never change)."""
    return names(ftj.name, is_distributed(ftj.spec))


def output_target(ftj: FineTuneJobObject, settings: OperatorSettings) -> OutputTarget:
    """Where the trainer publishes (its config's `output`): also where the operator expects the adapter, the only
    version it records or deletes for this FineTuneJob (adapter_guard). RenderError without a store."""
    spec, meta = ftj.spec, ftj.metadata
    output_uri = resolve_store_uri(spec.output.uri, settings, "spec.output.uri", meta.namespace)
    output_store = resolve_store(spec.output.store, settings, "spec.output.store")
    if spec.output.store is None:  # the default store writes with the platform's keys: this namespace's root only
        require_within(output_uri, default_location(meta.namespace, settings, "spec.output"), "spec.output.uri")
    return OutputTarget(
        adapter_name=spec.output.adapter_name,
        version=spec.output.version,
        uri=output_uri,
        store=lenient_copy(ObjectStore, output_store),
        checkpoint_uri=f"{output_uri}/checkpoints/{meta.namespace}/{meta.name}-{meta.uid[:8]}",
    )


def platform_store(store: ApiObjectStore | None, settings: OperatorSettings) -> bool:
    """The platform's default store: none named, or one equal to it (storeRef ClusterArtifactStore "default")."""
    return store is None or store == default_store(settings)


def workload_grant(ftj: FineTuneJobObject, base: BaseModelSpec, settings: OperatorSettings) -> Grant | None:
    """What the trainer's minted credentials may reach (settings.store_sts, output in the platform's store):
    read-write its output location, read-only the s3:// inputs it reads with the same keys (base model weights in
    the platform's store, datasets). Minted with the platform's keys, so checked here whatever bound the spec (a
    team's ArtifactStore may equal the platform's store): the output inside this namespace's root, no input in
    another namespace's root (StoreNotAllowed). None: the pods use the store's Secret."""
    if ftj.spec.output.store_ref is not None:
        return _cluster_store_grant(ftj, base, settings)
    if not settings.store_sts or not platform_store(ftj.spec.output.store, settings):
        return None
    namespace = ftj.namespace
    output = resolve_store_uri(ftj.spec.output.uri, settings, "spec.output.uri", namespace)
    require_within(output, default_location(namespace, settings, "spec.output"), "spec.output.uri")
    inputs = _dataset_inputs(ftj.spec)
    if platform_store(base.source.store, settings):
        inputs = {"BaseModel spec.source.uri": base.source.uri, **inputs}
    read_only = []
    for field, uri in inputs.items():
        if uri and parse(uri).scheme == "s3":
            require_shared_readable(uri, namespace, settings, field)
            read_only.append(uri)
    return Grant(read_write=(output,), read_only=tuple(dict.fromkeys(read_only)))


def _cluster_store_grant(ftj: FineTuneJobObject, base: BaseModelSpec, settings: OperatorSettings) -> Grant:
    """Output bound to a ClusterArtifactStore that mints (controllers.store_refs): read-write only the job's own
    version folder and checkpoints, read-only the s3:// inputs inside the namespace's location in that store (the
    BaseModel's weights when they are in it: bound there by storeRef; datasets). The weights and the namespace's
    other artifacts are not writable. Inputs elsewhere are not granted (the minted keys reach no further); base
    weights in another minting store are StoreNotAllowed (resources.store_refs.require_base_minted_by)."""
    minting = ftj.spec.output.store
    require_base_minted_by(base.source.store, minting, "the FineTuneJob's output (spec.output.storeRef)")
    output = output_target(ftj, settings)
    root = minting.root if isinstance(minting, MintingStore) else output.uri
    inputs = list(_dataset_inputs(ftj.spec).values())
    if same_minting_store(base.source.store, minting):
        inputs.insert(0, base.source.uri)
    read_only = [u.rstrip("/") for u in inputs if u and parse(u).scheme == "s3" and within(u, root)]
    return Grant(read_write=(output.adapter_uri, output.checkpoint_uri), read_only=tuple(dict.fromkeys(read_only)))


def _minted(store: ObjectStore, secret: str) -> ObjectStore:
    """The store as the pods reach it with minted credentials: the operator's child Secret, not the platform's."""
    return store.model_copy(update={"credentials_secret_ref": S3CredentialsRef(name=secret)})


def trainer_config(
    ftj: FineTuneJobObject, base_name: str, base: BaseModelSpec, settings: OperatorSettings
) -> TrainerConfig:
    """Render the trainer's config; RenderError when something the cluster must provide is missing."""
    spec, meta = ftj.spec, ftj.metadata
    base_location = parse(base.source.uri)
    base_store = (
        resolve_store(base.source.store, settings, "BaseModel spec.source.store")
        if base_location.scheme == "s3"
        else None
    )
    output = output_target(ftj, settings)
    minting_store = ftj.spec.output.store if ftj.spec.output.store_ref is not None else None
    # Weights in a ClusterArtifactStore with spec.sts: read with keys that store minted for this job, or refused.
    require_base_minted_by(base.source.store, minting_store, "the FineTuneJob's output (spec.output.storeRef)")
    if workload_grant(ftj, base, settings) is not None:  # the platform's Secret name never reaches the pods
        secret = names_of(ftj).credentials
        if output.store is not None:
            output = output.model_copy(update={"store": _minted(output.store, secret)})
        if minting_store is None:  # the platform's keys mint, with the base's grant when it is in that store
            base_granted = platform_store(base.source.store, settings)
        else:  # the ClusterArtifactStore mints, with the base's grant when it is in that store
            base_granted = same_minting_store(base.source.store, minting_store)
        if base_store is not None and base_granted:
            base_store = _minted(lenient_copy(ObjectStore, base_store), secret)
    if spec.output.store is None:  # the trainer reads s3:// datasets with the output store's keys
        for field, uri in _dataset_inputs(spec).items():
            if uri and parse(uri).scheme == "s3":
                require_shared_readable(uri, meta.namespace, settings, field)
    nodes, gpus = spec.resources.nodes, spec.resources.gpus_per_node
    job_names = names_of(ftj)
    return TrainerConfig(
        job=JobIdentity(namespace=meta.namespace, name=meta.name, uid=meta.uid),
        base_model=BaseModelLocation(
            name=base_name,
            uri=base.source.uri,
            digest=base.source.digest,
            store=lenient_copy(ObjectStore, base_store) if base_store else None,
            local_dir=MODEL_DIR if base_location.scheme != "pvc" else f"/mnt/base-model/{base_location.path}",
            allow_public_download=base.source.allow_public_download,
        ),
        dataset=lenient_copy(Dataset, spec.dataset),
        method=spec.method,
        lora=lenient_copy(LoraSettings, spec.lora),
        training=lenient_copy(TrainingSettings, spec.training),
        output=output,
        distributed=DistributedSettings(
            nodes=nodes,
            processes_per_node=max(gpus, 1),
            backend="nccl" if gpus else "gloo",
            strategy=spec.resources.strategy,
            master_addr=f"{job_names.job}-0.{job_names.service}" if is_distributed(spec) else None,
        ),
        image=spec.image or (settings.trainer_image if gpus else settings.trainer_cpu_image),
        work_dir=WORK_DIR,
        evaluation=lenient_copy(TrainerEvaluation, spec.evaluation) if spec.evaluation is not None else None,
    )


def _dataset_inputs(spec: FineTuneJobSpec) -> dict[str, str | None]:
    """Every data file the trainer reads, by the field that names it."""
    return {
        "spec.dataset.uri": spec.dataset.uri,
        "spec.dataset.evalUri": spec.dataset.eval_uri,
        "spec.evaluation.uri": spec.evaluation.uri if spec.evaluation is not None else None,
    }


def rendered_config(config: TrainerConfig) -> str:
    """The trainer's config file as it rides in CONFIG_ANNOTATION; RenderError when it would not fit."""
    text = json.dumps(config.render(), sort_keys=True, separators=(",", ":"))
    size = len(text.encode())
    if size > CONFIG_MAX_BYTES:
        raise RenderError(
            Reason.INVALID_SPEC,
            f"the rendered trainer config is {size // 1024} KiB, over the {CONFIG_MAX_BYTES // 1024} KiB a pod "
            "annotation may carry: shorten spec.evaluation (templates, metrics) or spec.dataset (templates)",
        )
    return text


def _trainer_command(spec: FineTuneJobSpec, config: TrainerConfig) -> list[str]:
    config_path = f"{CONFIG_MOUNT}/{CONFIG_FILE}"
    if not is_distributed(spec):
        return ["python", "-m", "lorafleet.trainer", "--config", config_path]
    dist = config.distributed
    # torchrun's own code, but the trainer's exit codes survive (plain torchrun turns every failure into 1, so
    # the podFailurePolicy could not tell bad input from a crash).
    return [
        "python",
        "-m",
        "lorafleet.trainer.launch",
        f"--nnodes={dist.nodes}",
        f"--nproc-per-node={dist.processes_per_node}",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        f"--master-addr={dist.master_addr}",
        f"--master-port={dist.master_port}",
        "-m",
        "lorafleet.trainer",
        "--config",
        config_path,
    ]


def _model_fetch(
    spec_base: BaseModelSpec, config: TrainerConfig, image: str, env: list[Obj], mounts: list[Obj]
) -> list[Obj]:
    """An init container that downloads and verifies s3:// weights; pvc:// is mounted, hf:// loads itself."""
    if parse(spec_base.source.uri).scheme != "s3":
        return []
    command = ["lorafleet", "artifacts", "pull", spec_base.source.uri, MODEL_DIR]
    if spec_base.source.digest:
        command += ["--digest", spec_base.source.digest]
    return [
        {
            "name": "fetch-base-model",
            "image": image,
            "command": command,
            # Copies: the trainer container gets its own lists (no shared references in the manifest).
            "env": [dict(e) for e in env],
            "volumeMounts": [dict(m) for m in mounts],
            "securityContext": container_security_context(),
        }
    ]


def _dataset_claims(spec: FineTuneJobSpec) -> list[str]:
    uris = list(_dataset_inputs(spec).values())
    return list(dict.fromkeys(parse(u).authority for u in uris if u and u.startswith("pvc://")))


def build_job(ftj: FineTuneJobObject, base: BaseModelSpec, config: TrainerConfig, settings: OperatorSettings) -> Obj:
    spec = ftj.spec
    job_names = names_of(ftj)
    gpus = spec.resources.gpus_per_node
    pod_labels = {"lorafleet.io/finetunejob": label_value(ftj.name)}
    base_location = parse(base.source.uri)

    ca_volumes, ca_mounts, ca_env = ca_bundle_volume(config.output.store)
    env: list[Obj] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": PROGRESS_CONFIG_MAP_ENV, "value": job_names.progress},
        {"name": "HOME", "value": WORK_DIR},
        {"name": "HF_HOME", "value": f"{WORK_DIR}/hf"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *offline_env(base.source.allow_public_download),
        *store_env(config.output.store, platform=spec.output.store is None),
        *_session_token_env(config.output.store, job_names.credentials),
        *ca_env,
    ]
    mounts: list[Obj] = [
        {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "work", "mountPath": WORK_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
        *ca_mounts,
    ]
    volumes: list[Obj] = [
        {
            "name": "config",
            "downwardAPI": {
                "items": [
                    {"path": CONFIG_FILE, "fieldRef": {"fieldPath": f"metadata.annotations['{CONFIG_ANNOTATION}']"}}
                ]
            },
        },
        {"name": "work", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        *ca_volumes,
    ]
    for index, claim in enumerate(_dataset_claims(spec)):
        # The trainer reads pvc://<claim>/<path> at /mnt/pvc/<claim>/<path>.
        mounts.append({"name": f"dataset-{index}", "mountPath": f"/mnt/pvc/{claim}", "readOnly": True})
        volumes.append({"name": f"dataset-{index}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
    if base_location.scheme == "pvc":
        mounts.append({"name": "base-model", "mountPath": "/mnt/base-model", "readOnly": True})
        volumes.append(
            {"name": "base-model", "persistentVolumeClaim": {"claimName": base_location.authority, "readOnly": True}}
        )
    if gpus:
        # NCCL needs more shared memory than the container default of 64 MiB.
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})

    base_store = config.base_model.store
    base_env = store_env(base_store, platform=base.source.store is None)
    base_env += _session_token_env(base_store, job_names.credentials)
    fetch_env = _fetch_env(env, base_env) if base_store and base_store != config.output.store else env
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "securityContext": pod_security_context(),
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        # The trainer reports live progress into its progress ConfigMap; its account may do nothing else.
        "serviceAccountName": job_names.service_account,
        "automountServiceAccountToken": True,
        "initContainers": _model_fetch(base, config, config.image, fetch_env, mounts),
        "containers": [
            {
                "name": TRAINER_CONTAINER,
                "image": config.image,
                "imagePullPolicy": settings.image_pull_policy,
                "command": _trainer_command(spec, config),
                "env": env,
                "resources": resource_requirements(spec.resources.cpu, spec.resources.memory, gpus),
                "volumeMounts": mounts,
                "securityContext": container_security_context(),
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
        "volumes": volumes,
    }
    if spec.resources.node_selector:
        pod_spec["nodeSelector"] = dict(spec.resources.node_selector)
    if spec.resources.tolerations:
        pod_spec["tolerations"] = tolerations(spec.resources.tolerations)
    if spec.resources.priority_class_name:
        pod_spec["priorityClassName"] = spec.resources.priority_class_name
    if is_distributed(spec):
        pod_spec["subdomain"] = job_names.service

    job_spec: Obj = {
        "backoffLimit": spec.backoff_limit,
        "completions": spec.resources.nodes,
        "parallelism": spec.resources.nodes,
        "completionMode": "Indexed" if is_distributed(spec) else "NonIndexed",
        # Bad input fails the Job at once; preemption and eviction do not count against backoffLimit.
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": TRAINER_CONTAINER,
                        "operator": "In",
                        "values": [EXIT_INVALID_INPUT],
                    },
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                # Interrupted (SIGTERM) after writing a checkpoint: the retry resumes from it, so it is progress.
                {
                    "action": "Ignore",
                    "onExitCodes": {"containerName": TRAINER_CONTAINER, "operator": "In", "values": [EXIT_INTERRUPTED]},
                },
            ]
        },
        "template": {"metadata": _pod_metadata(ftj, spec, pod_labels, rendered_config(config)), "spec": pod_spec},
    }
    if spec.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": object_meta(ftj, job_names.job, COMPONENT),
        "spec": job_spec,
    }


def _fetch_env(env: list[Obj], base_env: list[Obj]) -> list[Obj]:
    """The weights' fetch reaches the base model's store: its settings replace the output store's (an env name
    twice is refused by the API server), and the output store's keys are not sent to another store."""
    dropped = {e["name"] for e in base_env} | set(SECRET_KEYS)
    return [*(e for e in env if e["name"] not in dropped), *base_env]


def _session_token_env(store: ObjectStore | None, secret: str) -> list[Obj]:
    """Minted credentials carry a session token beside the key pair (storage.sts.SECRET_KEYS)."""
    ref = store.credentials_secret_ref if store is not None else None
    if ref is None or ref.name != secret:
        return []
    return [{"name": SECRET_KEYS[2], "valueFrom": {"secretKeyRef": {"name": secret, "key": SECRET_KEYS[2]}}}]


def _pod_metadata(
    ftj: FineTuneJobObject, spec: FineTuneJobSpec, selector_labels: dict[str, str], config_text: str
) -> Obj:
    # Ours last: user labels cannot break the selectors, user annotations cannot replace the config.
    labels = {**spec.resources.pod_labels, **object_meta(ftj, "", COMPONENT)["labels"], **selector_labels}
    return {"labels": labels, "annotations": {**spec.resources.pod_annotations, CONFIG_ANNOTATION: config_text}}


def build_progress_config_map(ftj: FineTuneJobObject) -> Obj:
    """Where the trainer posts its live progress (contracts.trainer.PROGRESS_KEY). Created empty by the operator:
    a Role's resourceNames cannot restrict create, so the trainer only patches it. The operator's applies never
    name `data`, so server-side apply leaves the trainer's field alone."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": object_meta(ftj, names(ftj.name).progress, COMPONENT)}


def build_progress_rbac(ftj: FineTuneJobObject) -> list[Obj]:
    """A ServiceAccount that may patch its job's progress ConfigMap and nothing else: no pods (spec.image may run
    a tenant's own code with this token), no other ConfigMap, no Secret."""
    job_names = names(ftj.name)
    name = job_names.service_account
    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": object_meta(ftj, name, COMPONENT),
        "automountServiceAccountToken": False,
    }
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": object_meta(ftj, name, COMPONENT),
        "rules": [
            {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [job_names.progress], "verbs": ["patch"]}
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": object_meta(ftj, name, COMPONENT),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ftj.namespace}],
    }
    return [account, role, binding]


def build_rendezvous_service(ftj: FineTuneJobObject) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(ftj, names(ftj.name).service, COMPONENT),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"lorafleet.io/finetunejob": label_value(ftj.name)},
            "ports": [{"name": "rendezvous", "port": 29500, "targetPort": 29500}],
        },
    }


def desired_children(
    ftj: FineTuneJobObject, base_model: BaseModelObject | None, settings: OperatorSettings
) -> list[Obj]:
    """Everything a FineTuneJob owns, in apply order. RenderError while the inputs are not ready."""
    spec = ftj.spec
    if base_model is None:
        raise RenderError(
            Reason.BASE_MODEL_NOT_FOUND,
            f"BaseModel {spec.base_model_ref.name!r} does not exist in this namespace; the job starts once it does",
        )
    base = base_model.spec
    verified = base_model.status.digest if base_model.status is not None else None
    if verified and not base.source.digest:
        # Train on exactly the version the BaseModel verified (the fetch refuses any other), and record that
        # digest in the adapter's lineage.
        base = base.model_copy(update={"source": base.source.model_copy(update={"digest": verified})})
    config = trainer_config(ftj, base_model.name, base, settings)
    children = [build_progress_config_map(ftj), *build_progress_rbac(ftj)]
    if is_distributed(spec):
        children.append(build_rendezvous_service(ftj))
    if settings.network_policy:
        children.append(
            egress_network_policy(
                ftj,
                names(ftj.name).network_policy,
                COMPONENT,
                {"lorafleet.io/finetunejob": label_value(ftj.name)},
                settings.egress_cidrs,
                dns_namespace=settings.dns_namespace,
                dns_pod_labels=settings.dns_pod_labels,
            )
        )
    # The Job last: its pods start only once their progress ConfigMap, RBAC and egress policy exist, and a name
    # found held by someone else while creating stops the pass before any pod (controllers.base.execute_children).
    children.append(build_job(ftj, base, config, settings))
    return children
