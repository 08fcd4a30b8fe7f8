"""The batch/v1 Job of one stage attempt (and, for a large invocation, the ConfigMap holding it).

The stage contract (api/stage.py): the whole job as JSON in KUBEDISTILL_JOB (or a mounted file),
secrets only as `valueFrom.secretKeyRef` env vars, result in the termination message. Pods run
hardened: non-root, no privilege escalation, no capabilities, RuntimeDefault seccomp, read-only
root filesystem with a writable /tmp (and a file:// artifact root mounted from the node), and no
service-account token (stages never call the API).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlparse

from kubedistill.api.models import (
    API_VERSION,
    DistillationJob,
    DistillationJobSpec,
    ResourceRequirements,
    SecretKeyRef,
    Stage,
)
from kubedistill.api.stage import (
    JOB_ENV,
    JOB_FILE_ENV,
    JUDGE_API_KEY_ENV,
    S3_ACCESS_KEY_ENV,
    S3_ENDPOINT_ENV,
    S3_SECRET_KEY_ENV,
    TEACHER_API_KEY_ENV,
    JobRef,
    StageInvocation,
)
from kubedistill.builders.scaling import scale_out
from kubedistill.dataset import DATASET_FILE_ENV
from kubedistill.domain.naming import artifact_base, child_job_name, child_labels, invocation_configmap_name
from kubedistill.domain.queueing import QUEUE_LABEL, queue_name
from kubedistill.domain.scaling import stage_completions
from kubedistill.recorder import parse_timestamp
from kubedistill.settings import GPU_RESOURCE, Settings
from kubedistill.traffic import with_defaults

DATASET_DIR = "/var/run/kubedistill/dataset"
DATASET_FILE = "dataset.jsonl"
INVOCATION_DIR = "/etc/kubedistill"
INVOCATION_FILE = "job.json"
CONTAINER = "stage"
RUN_AS = 1000
# Stages that call the teacher (generate), an LLM judge (curate) or both (evaluate).
TEACHER_STAGES = frozenset({Stage.GENERATE, Stage.CURATE, Stage.EVALUATE})
JUDGE_STAGES = frozenset({Stage.CURATE, Stage.EVALUATE})


def owner_reference(job: DistillationJob) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "DistillationJob",
        "name": job.metadata.name,
        "uid": job.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def artifact_root(job: DistillationJob, settings: Settings) -> str:
    """Where this job's artifacts live: the spec's bucket, else the operator's, else its file:// root."""
    storage = job.spec.storage
    bucket = storage.bucket or settings.storage_bucket
    if storage.bucket is None and bucket is None and settings.artifact_root:
        return settings.artifact_root
    if bucket is None:
        raise ValueError(
            "no artifact storage: set spec.storage.bucket or the operator's KUBEDISTILL_STORAGE_BUCKET"
        )
    prefix = (storage.prefix if storage.prefix is not None else settings.storage_prefix).strip("/")
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"


def operator_root(settings: Settings) -> str | None:
    """The operator's own storage root (s3://bucket/prefix, else its file:// root): where aliases
    record by default."""
    if settings.storage_bucket is None:
        return settings.artifact_root
    prefix = settings.storage_prefix.strip("/")
    return f"s3://{settings.storage_bucket}/{prefix}" if prefix else f"s3://{settings.storage_bucket}"


def _created(job: DistillationJob) -> datetime:
    stamp = (job.metadata.model_extra or {}).get("creationTimestamp")
    return parse_timestamp(stamp) if isinstance(stamp, str) else datetime.now(UTC)


def stage_spec(job: DistillationJob, settings: Settings) -> DistillationJobSpec:
    """The spec a stage runs with: a fromTraffic window fixed at the job's creation and its
    recordings prefix filled in, so every stage and attempt reads the same requests."""
    spec = job.spec
    traffic = spec.dataset.from_traffic
    root = operator_root(settings)
    if traffic is None or (traffic.uri is None and root is None):
        return spec
    filled = with_defaults(traffic, root or "", job.metadata.namespace or "default", _created(job))
    return spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"from_traffic": filled})})


def build_invocation(job: DistillationJob, stage: Stage, attempt: int, settings: Settings) -> StageInvocation:
    meta = job.metadata
    namespace = meta.namespace or "default"
    return StageInvocation(
        job=JobRef(name=meta.name, namespace=namespace, uid=meta.uid or ""),
        spec=stage_spec(job, settings),
        stage=stage,
        artifact_base=artifact_base(artifact_root(job, settings), namespace, meta.name, meta.uid or ""),
        attempt=attempt,
    )


def _judge_secret(job: DistillationJob, stage: Stage) -> SecretKeyRef | None:
    judge = job.spec.curation.judge
    if stage == Stage.EVALUATE and job.spec.evaluation.judge is not None:
        judge = job.spec.evaluation.judge
    return judge.llm.api_key_secret_ref if judge.llm is not None else None


def _storage_secret(job: DistillationJob, settings: Settings) -> str | None:
    return job.spec.storage.credentials_secret_ref or settings.storage_secret


def referenced_secrets(
    job: DistillationJob, stage: Stage, settings: Settings
) -> list[tuple[str, str | None]]:
    """(Secret name, key) pairs the stage's pod needs; key None means the two S3 keys."""
    refs: list[tuple[str, str | None]] = []
    teacher = job.spec.teacher.api_key_secret_ref
    if stage in TEACHER_STAGES and teacher is not None:
        refs.append((teacher.name, teacher.key))
    judge = _judge_secret(job, stage)
    if stage in JUDGE_STAGES and judge is not None:
        refs.append((judge.name, judge.key))
    storage = _storage_secret(job, settings)
    if storage is not None:
        refs.append((storage, None))
    return refs


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _env(
    job: DistillationJob, stage: Stage, settings: Settings, invocation_env: dict[str, str]
) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(settings.stage_env.items())]
    env += [{"name": "HOME", "value": "/tmp"}, {"name": "PYTHONUNBUFFERED", "value": "1"}]
    env += [{"name": k, "value": v} for k, v in invocation_env.items()]
    teacher = job.spec.teacher.api_key_secret_ref
    if stage in TEACHER_STAGES and teacher is not None:
        env.append(_secret_env(TEACHER_API_KEY_ENV, teacher.name, teacher.key))
    judge = _judge_secret(job, stage)
    if stage in JUDGE_STAGES and judge is not None:
        env.append(_secret_env(JUDGE_API_KEY_ENV, judge.name, judge.key))
    endpoint = job.spec.storage.endpoint or settings.storage_endpoint
    if endpoint:
        env.append({"name": S3_ENDPOINT_ENV, "value": endpoint})
    storage = _storage_secret(job, settings)
    if storage is not None:
        env.append(_secret_env(S3_ACCESS_KEY_ENV, storage, S3_ACCESS_KEY_ENV))
        env.append(_secret_env(S3_SECRET_KEY_ENV, storage, S3_SECRET_KEY_ENV))
    if job.spec.dataset.config_map_ref is not None:
        env.append({"name": DATASET_FILE_ENV, "value": f"{DATASET_DIR}/{DATASET_FILE}"})
    return env


def _resources(job: DistillationJob, stage: Stage, settings: Settings) -> tuple[dict[str, Any], int]:
    overrides = job.spec.resources.for_stage(stage)
    base = overrides.resources if overrides is not None and overrides.resources is not None else None
    # An override that sets nothing keeps the defaults: every pod has requests (a queue counts them).
    if base is not None and not (base.requests or base.limits):
        base = None
    resources = (base or settings.stage_resources.get(stage) or ResourceRequirements()).to_k8s()
    gpus = (
        overrides.gpus
        if overrides is not None and overrides.gpus is not None
        else settings.default_gpus[stage]
    )
    if gpus > 0:
        # Extended resources must have requests == limits; setting the limit alone implies the request.
        resources.setdefault("limits", {})[GPU_RESOURCE] = str(gpus)
        resources.get("requests", {}).pop(GPU_RESOURCE, None)
    return resources, gpus


def _placement(job: DistillationJob, stage: Stage, settings: Settings, gpus: int) -> dict[str, Any]:
    overrides = job.spec.resources.for_stage(stage)
    placement: dict[str, Any] = {}
    node_selector = overrides.node_selector if overrides is not None else None
    tolerations = overrides.tolerations if overrides is not None else None
    if gpus > 0:
        node_selector = node_selector if node_selector is not None else settings.gpu_node_selector
        tolerations = tolerations if tolerations is not None else settings.gpu_tolerations
    if node_selector:
        placement["nodeSelector"] = dict(node_selector)
    if tolerations:
        placement["tolerations"] = list(tolerations)
    if overrides is not None and overrides.affinity:
        placement["affinity"] = overrides.affinity
    if overrides is not None and overrides.priority_class_name:
        placement["priorityClassName"] = overrides.priority_class_name
    return placement


def build_stage_manifests(
    job: DistillationJob,
    stage: Stage,
    attempt: int,
    settings: Settings,
    *,
    active_deadline_seconds: int | None = None,
) -> list[dict[str, Any]]:
    """The manifests for one stage attempt: [ConfigMap (only for a large invocation)], [headless Service
    (distributed training)], Job — in creation order."""
    meta = job.metadata
    name = child_job_name(meta.name, stage, attempt, stage_completions(job.spec, stage))
    labels = child_labels(meta.name, stage, attempt)
    owner = owner_reference(job)
    invocation = build_invocation(job, stage, attempt, settings).model_dump_json(
        by_alias=True, exclude_none=True
    )
    manifests: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]

    if len(invocation.encode()) > settings.max_env_invocation_bytes:
        cm_name = invocation_configmap_name(meta.name, stage, attempt)
        manifests.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": cm_name,
                    "namespace": meta.namespace,
                    "labels": labels,
                    "ownerReferences": [owner],
                },
                "data": {INVOCATION_FILE: invocation},
            }
        )
        volumes.append({"name": "invocation", "configMap": {"name": cm_name}})
        mounts.append({"name": "invocation", "mountPath": INVOCATION_DIR, "readOnly": True})
        invocation_env = {JOB_FILE_ENV: f"{INVOCATION_DIR}/{INVOCATION_FILE}"}
    else:
        invocation_env = {JOB_ENV: invocation}

    dataset_ref = job.spec.dataset.config_map_ref
    if dataset_ref is not None:
        volumes.append(
            {
                "name": "dataset",
                "configMap": {
                    "name": dataset_ref.name,
                    "items": [{"key": dataset_ref.key, "path": DATASET_FILE}],
                },
            }
        )
        mounts.append({"name": "dataset", "mountPath": DATASET_DIR, "readOnly": True})

    root = artifact_root(job, settings)
    if root.startswith("file://"):
        # A file:// root is a directory of the node's: mounted, or the read-only root filesystem refuses it.
        path = unquote(urlparse(root).path)
        volumes.append({"name": "artifacts", "hostPath": {"path": path, "type": "DirectoryOrCreate"}})
        mounts.append({"name": "artifacts", "mountPath": path})

    resources, gpus = _resources(job, stage, settings)
    overrides = job.spec.resources.for_stage(stage)
    image = overrides.image if overrides is not None and overrides.image else settings.trainer_image
    container = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": settings.image_pull_policy,
        # No command: the image's entrypoint (python -m kubedistill_trainer) takes the stage as its argument,
        # so an image override may bring its own runtime.
        "args": [stage.value],
        "env": _env(job, stage, settings, invocation_env),
        "resources": resources,
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
        **_placement(job, stage, settings, gpus),
    }
    if settings.service_account:
        pod_spec["serviceAccountName"] = settings.service_account
    queue = queue_name(job.spec.queue_name, settings.queue_name)
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,
        "completions": 1,
        "parallelism": 1,
        # A queued Job starts suspended (Kueue's documented path, webhook or not); only Kueue unsuspends it.
        "suspend": queue is not None or bool(job.spec.suspend),
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    if active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = active_deadline_seconds
    job_manifest = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": meta.namespace,
            "labels": {**labels, QUEUE_LABEL: queue} if queue is not None else labels,
            "ownerReferences": [owner],
        },
        "spec": job_spec,
    }
    return [*manifests, *scale_out(job, stage, settings, job_manifest), job_manifest]
