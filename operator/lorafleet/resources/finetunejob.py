"""Desired children of a FineTuneJob: the trainer config, the training Job and, when distributed, a headless
Service for the torchrun rendezvous; plus an egress NetworkPolicy."""

from __future__ import annotations

import json
from dataclasses import dataclass

from lorafleet.api.basemodel import BaseModelSpec
from lorafleet.api.finetunejob import FineTuneJobSpec
from lorafleet.config import OperatorSettings
from lorafleet.resources.common import (
    Obj,
    ca_bundle_volume,
    child_name,
    container_security_context,
    egress_network_policy,
    object_meta,
    offline_env,
    pod_security_context,
    resource_requirements,
    store_env,
    tolerations,
)
from lorafleet.resources.stores import RenderError, resolve_store, resolve_store_uri
from lorafleet.trainer.config import (
    CONFIG_FILE,
    BaseModelLocation,
    DistributedSettings,
    JobIdentity,
    OutputTarget,
    TrainerConfig,
)
from lorafleet.trainer.errors import EXIT_INTERRUPTED, EXIT_INVALID_INPUT  # docs/trainer.md
from lorafleet.uris import parse

COMPONENT = "trainer"
CONFIG_MOUNT = "/etc/lorafleet/trainer"
WORK_DIR = "/work"
MODEL_DIR = "/work/base-model"
TRAINER_CONTAINER = "trainer"
# Time the trainer gets after SIGTERM to write a checkpoint.
TERMINATION_GRACE_SECONDS = 120


@dataclass(frozen=True)
class FineTuneJobNames:
    config: str
    job: str
    service: str
    network_policy: str
    service_account: str


def names(ftj_name: str) -> FineTuneJobNames:
    return FineTuneJobNames(
        config=child_name(ftj_name, "trainer"),
        job=child_name(ftj_name, "train"),
        service=child_name(ftj_name, "rdzv"),
        network_policy=child_name(ftj_name, "egress"),
        service_account=child_name(ftj_name, "trainer"),
    )


def is_distributed(spec: FineTuneJobSpec) -> bool:
    return spec.resources.nodes > 1 or spec.resources.gpus_per_node > 1


def trainer_config(
    ftj: Obj, spec: FineTuneJobSpec, base_name: str, base: BaseModelSpec, settings: OperatorSettings
) -> TrainerConfig:
    """Render the trainer's config; RenderError when something the cluster must provide is missing."""
    meta = ftj["metadata"]
    base_location = parse(base.source.uri)
    base_store = (
        resolve_store(base.source.store, settings, "BaseModel spec.source.store")
        if base_location.scheme == "s3"
        else None
    )
    output_uri = resolve_store_uri(spec.output.uri, settings, "spec.output.uri")
    output_store = resolve_store(spec.output.store, settings, "spec.output.store")
    nodes, gpus = spec.resources.nodes, spec.resources.gpus_per_node
    job_names = names(meta["name"])
    return TrainerConfig(
        job=JobIdentity(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"]),
        base_model=BaseModelLocation(
            name=base_name,
            uri=base.source.uri,
            digest=base.source.digest,
            store=base_store,
            local_dir=MODEL_DIR if base_location.scheme != "pvc" else f"/mnt/base-model/{base_location.path}",
            allow_public_download=base.source.allow_public_download,
        ),
        dataset=spec.dataset,
        method=spec.method,
        lora=spec.lora,
        training=spec.training,
        output=OutputTarget(
            adapter_name=spec.output.adapter_name,
            version=spec.output.version,
            uri=output_uri,
            store=output_store,
            checkpoint_uri=f"{output_uri}/checkpoints/{meta['namespace']}/{meta['name']}-{meta['uid'][:8]}",
        ),
        distributed=DistributedSettings(
            nodes=nodes,
            processes_per_node=max(gpus, 1),
            backend="nccl" if gpus else "gloo",
            strategy=spec.resources.strategy,
            master_addr=f"{job_names.job}-0.{job_names.service}" if is_distributed(spec) else None,
        ),
        image=spec.image or (settings.trainer_image if gpus else settings.trainer_cpu_image),
        work_dir=WORK_DIR,
    )


def build_config_map(ftj: Obj, config: TrainerConfig) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(ftj, names(ftj["metadata"]["name"]).config, COMPONENT),
        "data": {CONFIG_FILE: json.dumps(config.model_dump(mode="json", by_alias=True), indent=2, sort_keys=True)},
    }


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
    uris = [spec.dataset.uri, spec.dataset.eval_uri]
    return list(dict.fromkeys(parse(u).authority for u in uris if u and u.startswith("pvc://")))


def build_job(
    ftj: Obj, spec: FineTuneJobSpec, base: BaseModelSpec, config: TrainerConfig, settings: OperatorSettings
) -> Obj:
    meta = ftj["metadata"]
    job_names = names(meta["name"])
    gpus = spec.resources.gpus_per_node
    pod_labels = {"lorafleet.io/finetunejob": meta["name"]}
    base_location = parse(base.source.uri)

    ca_volumes, ca_mounts, ca_env = ca_bundle_volume(config.output.store)
    env: list[Obj] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "HOME", "value": WORK_DIR},
        {"name": "HF_HOME", "value": f"{WORK_DIR}/hf"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *offline_env(base.source.allow_public_download),
        *store_env(config.output.store),
        *ca_env,
    ]
    mounts: list[Obj] = [
        {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "work", "mountPath": WORK_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
        *ca_mounts,
    ]
    volumes: list[Obj] = [
        {"name": "config", "configMap": {"name": job_names.config}},
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
    fetch_env = [*env, *store_env(base_store)] if base_store and base_store != config.output.store else env
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "securityContext": pod_security_context(),
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        # The trainer reports live progress on its own Pod (annotation lorafleet.io/progress); its account may
        # do nothing else.
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
        "template": {"metadata": _pod_metadata(ftj, spec, pod_labels), "spec": pod_spec},
    }
    if spec.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": object_meta(ftj, job_names.job, COMPONENT),
        "spec": job_spec,
    }


def _pod_metadata(ftj: Obj, spec: FineTuneJobSpec, selector_labels: dict[str, str]) -> Obj:
    # Ours last: user labels cannot break the selectors.
    labels = {**spec.resources.pod_labels, **object_meta(ftj, "", COMPONENT)["labels"], **selector_labels}
    metadata: Obj = {"labels": labels}
    if spec.resources.pod_annotations:
        metadata["annotations"] = dict(spec.resources.pod_annotations)
    return metadata


def build_progress_rbac(ftj: Obj) -> list[Obj]:
    """A ServiceAccount that may only read and patch pods of its namespace (to post its progress)."""
    meta = ftj["metadata"]
    name = names(meta["name"]).service_account
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
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]}],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": object_meta(ftj, name, COMPONENT),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": meta["namespace"]}],
    }
    return [account, role, binding]


def build_rendezvous_service(ftj: Obj) -> Obj:
    meta = ftj["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(ftj, names(meta["name"]).service, COMPONENT),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"lorafleet.io/finetunejob": meta["name"]},
            "ports": [{"name": "rendezvous", "port": 29500, "targetPort": 29500}],
        },
    }


def desired_children(ftj: Obj, base_model: Obj | None, settings: OperatorSettings) -> list[Obj]:
    """Everything a FineTuneJob owns, in apply order. RenderError while the inputs are not ready."""
    spec = FineTuneJobSpec.model_validate(ftj["spec"])
    if base_model is None:
        raise RenderError(
            "BaseModelNotFound",
            f"BaseModel {spec.base_model_ref.name!r} does not exist in this namespace; the job starts once it does",
        )
    base = BaseModelSpec.model_validate(base_model["spec"])
    verified = (base_model.get("status") or {}).get("digest")
    if verified and not base.source.digest:
        # Train on exactly the version the BaseModel verified (the fetch refuses any other), and record that
        # digest in the adapter's lineage.
        base = base.model_copy(update={"source": base.source.model_copy(update={"digest": verified})})
    config = trainer_config(ftj, spec, base_model["metadata"]["name"], base, settings)
    children = [build_config_map(ftj, config), *build_progress_rbac(ftj)]
    if is_distributed(spec):
        children.append(build_rendezvous_service(ftj))
    children.append(build_job(ftj, spec, base, config, settings))
    if settings.network_policy:
        meta = ftj["metadata"]
        children.append(
            egress_network_policy(
                ftj,
                names(meta["name"]).network_policy,
                COMPONENT,
                {"lorafleet.io/finetunejob": meta["name"]},
                settings.egress_cidrs,
            )
        )
    return children
