"""Operator settings, read once at startup from the environment (and optionally a ConfigMap's data).

Every knob has a default that suits a GPU cluster with S3; a CPU-only cluster sets
``KUBEDISTILL_DEFAULT_TRAIN_GPUS=0``. Values here are never secret: credentials are named by
Secret, never held.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from kubedistill.api.models import GPU_STAGES, LABEL_VALUE_PATTERN, STAGES, ResourceRequirements, Stage

PREFIX = "KUBEDISTILL_"
DEFAULT_IMAGE = "ghcr.io/kubedistill/trainer:0.1.0"
# A per-stage image override receives the namespace's storage credentials: only these prefixes pass.
DEFAULT_IMAGE_PREFIXES = ("ghcr.io/kubedistill/",)
# llama.cpp's own server image (ENTRYPOINT /app/llama-server) and LiteLLM's proxy image, pinned.
DEFAULT_SERVER_IMAGE = "ghcr.io/ggml-org/llama.cpp:server"
DEFAULT_GATEWAY_IMAGE = "ghcr.io/berriai/litellm:main-v1.106.12-stable"
GATEWAY_NAME = "kubedistill-gateway"
GPU_RESOURCE = "nvidia.com/gpu"

# Measured by bench/dataset_scale.py (peak RSS of each stage process; docs/memory.md): the estimate
# streams its dataset (under 65 MB up to a million rows, tokenizer or not; the 1 Gi limit leaves
# room for a student without tokenizer.json, counted through transformers and torch, ~650 MB);
# curate holds one bucket of candidates at a time (63 MB at 250k prompts × 4, as at 10k).
_DEFAULT_RESOURCES: dict[Stage, ResourceRequirements] = {
    Stage.ESTIMATE: ResourceRequirements(
        requests={"cpu": "250m", "memory": "256Mi"}, limits={"cpu": "1", "memory": "1Gi"}
    ),
    Stage.GENERATE: ResourceRequirements(
        requests={"cpu": "500m", "memory": "1Gi"}, limits={"cpu": "2", "memory": "2Gi"}
    ),
    Stage.CURATE: ResourceRequirements(
        requests={"cpu": "500m", "memory": "256Mi"}, limits={"cpu": "2", "memory": "1Gi"}
    ),
    Stage.TRAIN: ResourceRequirements(requests={"cpu": "2", "memory": "16Gi"}, limits={"memory": "32Gi"}),
    Stage.EXPORT: ResourceRequirements(requests={"cpu": "2", "memory": "8Gi"}, limits={"memory": "16Gi"}),
    Stage.EVALUATE: ResourceRequirements(requests={"cpu": "1", "memory": "4Gi"}, limits={"memory": "8Gi"}),
}


def _default_gpu_tolerations() -> list[dict[str, Any]]:
    return [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]


@dataclass(frozen=True)
class StorageScope:
    """Where one namespace (or every namespace carrying one label) keeps its data, and with what Secret.

    Its URIs must lie under `s3://<bucket>/<prefix>/`; its stage pods get `secret` (a Secret of that
    name in their own namespace) and, for IRSA or Pod Identity, run as `service_account`.
    """

    bucket: str
    prefix: str = ""
    secret: str | None = None
    endpoint: str | None = None
    service_account: str | None = None
    namespace: str | None = None
    label: tuple[str, str] | None = None

    @property
    def root(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}/" if self.prefix else f"s3://{self.bucket}/"

    def matches(self, namespace: str, labels: Mapping[str, str]) -> bool:
        if self.namespace is not None:
            return self.namespace == namespace
        return self.label is not None and labels.get(self.label[0]) == self.label[1]


@dataclass(frozen=True)
class Settings:
    """What the operator needs besides the DistillationJob itself."""

    trainer_image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    service_account: str | None = None
    # Resources of each stage unless spec.resources.<stage> says otherwise.
    stage_resources: Mapping[Stage, ResourceRequirements] = field(
        default_factory=lambda: dict(_DEFAULT_RESOURCES)
    )
    train_gpus: int = 1
    gpu_tolerations: list[dict[str, Any]] = field(default_factory=_default_gpu_tolerations)
    gpu_node_selector: dict[str, str] = field(default_factory=dict)
    # Artifacts: s3://<bucket>/<prefix>/<ns>/<job>/<uid> unless the spec names its own bucket; a
    # file:// artifact_root serves single-node clusters and tests.
    storage_bucket: str | None = None
    storage_prefix: str = "kubedistill"
    storage_endpoint: str | None = None
    storage_secret: str | None = None
    artifact_root: str | None = None
    # Multi-team clusters (docs/multi-team.md): with scopes, every namespace's URIs are confined to its
    # scope (or to a shared read-only prefix); a namespace without one gets `<bucket>/<prefix>/<ns>/`
    # with the shared Secret only when the default scope is allowed.
    storage_scopes: tuple[StorageScope, ...] = ()
    allow_default_scope: bool = False
    shared_read_uris: tuple[str, ...] = ()
    allowed_image_prefixes: tuple[str, ...] = DEFAULT_IMAGE_PREFIXES
    # file:// (and bare paths) name the pod's own filesystem: meaningful only where every pod shares one,
    # which a file:// artifact root says (single-node clusters, tests). None: follow the artifact root.
    allow_file_uris: bool | None = None
    # Plain (non-secret) env for every stage container, e.g. HTTPS_PROXY or HF_HUB_OFFLINE.
    stage_env: dict[str, str] = field(default_factory=dict)
    namespaces: tuple[str, ...] = ()
    progress_interval_s: float = 10.0
    retry_backoff_base_s: float = 10.0
    retry_backoff_max_s: float = 600.0
    # A ConfigMap holding the invocation above this size keeps the Pod spec small (env limit ~1 MiB total).
    max_env_invocation_bytes: int = 32 * 1024
    peering: str | None = None
    # Kueue LocalQueue for jobs whose spec names none; None: stage Jobs bypass Kueue.
    queue_name: str | None = None
    # Serving (ModelAlias): llama-server Deployments per served GGUF, one LiteLLM gateway per operator.
    # Off unless configured (the chart turns it on): without it an alias only resolves its target.
    gateway_enabled: bool = False
    gateway_namespace: str = "default"
    gateway_image: str = DEFAULT_GATEWAY_IMAGE
    gateway_replicas: int = 1
    gateway_master_key_secret: str | None = None
    gateway_master_key_key: str = "master-key"
    gateway_resources: ResourceRequirements = field(
        default_factory=lambda: ResourceRequirements(
            requests={"cpu": "200m", "memory": "512Mi"}, limits={"memory": "2Gi"}
        )
    )
    server_image: str = DEFAULT_SERVER_IMAGE
    server_resources: ResourceRequirements = field(
        default_factory=lambda: ResourceRequirements(
            requests={"cpu": "1", "memory": "1Gi"}, limits={"memory": "8Gi"}
        )
    )

    @property
    def default_gpus(self) -> Mapping[Stage, int]:
        return {stage: (self.train_gpus if stage in GPU_STAGES else 0) for stage in STAGES}

    @property
    def file_uris_allowed(self) -> bool:
        if self.allow_file_uris is not None:
            return self.allow_file_uris
        return bool(self.artifact_root and self.artifact_root.startswith("file:"))

    @property
    def uses_namespace_labels(self) -> bool:
        return any(scope.label is not None for scope in self.storage_scopes)

    def backoff_s(self, failed_attempts: int) -> float:
        """Delay before the next attempt after `failed_attempts` failures: base, 2·base, 4·base…"""
        if failed_attempts <= 0:
            return 0.0
        return float(min(self.retry_backoff_max_s, self.retry_backoff_base_s * 2 ** (failed_attempts - 1)))


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _json_object(name: str, value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{PREFIX}{name} is not valid JSON: {exc.msg}") from None


def _bool(name: str, value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"{PREFIX}{name}={value!r} is not a boolean")


def _scope(entry: Any) -> StorageScope:
    """One entry of KUBEDISTILL_STORAGE_SCOPES: {namespace | namespaceSelector: {matchLabels: {k: v}},
    bucket, prefix?, secret?, endpoint?, serviceAccount?}."""
    where = f"{PREFIX}STORAGE_SCOPES entry {entry!r}"
    if not isinstance(entry, dict) or not entry.get("bucket"):
        raise ValueError(f"{where} needs a bucket")
    labels = ((entry.get("namespaceSelector") or {}).get("matchLabels")) or {}
    if bool(entry.get("namespace")) == bool(labels) or len(labels) > 1:
        # One label keeps the admission policy's bindings exact (docs/multi-team.md).
        raise ValueError(f"{where} needs either namespace or namespaceSelector.matchLabels with one label")
    return StorageScope(
        bucket=str(entry["bucket"]),
        prefix=str(entry.get("prefix") or "").strip("/"),
        secret=entry.get("secret") or None,
        endpoint=entry.get("endpoint") or None,
        service_account=entry.get("serviceAccount") or None,
        namespace=entry.get("namespace") or None,
        label=next(((str(k), str(v)) for k, v in labels.items()), None),
    )


def from_mapping(values: Mapping[str, str], base: Settings | None = None) -> Settings:
    """Settings from `KUBEDISTILL_*` keys (env vars or a ConfigMap's data); unknown keys are ignored."""
    settings = base or Settings()
    get = {k[len(PREFIX) :]: v for k, v in values.items() if k.startswith(PREFIX)}
    updates: dict[str, Any] = {}
    simple = {
        "TRAINER_IMAGE": ("trainer_image", str),
        "IMAGE_PULL_POLICY": ("image_pull_policy", str),
        "SERVICE_ACCOUNT": ("service_account", str),
        "DEFAULT_TRAIN_GPUS": ("train_gpus", int),
        "STORAGE_BUCKET": ("storage_bucket", str),
        "STORAGE_PREFIX": ("storage_prefix", str),
        "STORAGE_ENDPOINT": ("storage_endpoint", str),
        "STORAGE_SECRET": ("storage_secret", str),
        "ARTIFACT_ROOT": ("artifact_root", str),
        "PROGRESS_INTERVAL_S": ("progress_interval_s", float),
        "RETRY_BACKOFF_BASE_S": ("retry_backoff_base_s", float),
        "RETRY_BACKOFF_MAX_S": ("retry_backoff_max_s", float),
        "MAX_ENV_INVOCATION_BYTES": ("max_env_invocation_bytes", int),
        "PEERING": ("peering", str),
        "QUEUE_NAME": ("queue_name", str),
        "GATEWAY_NAMESPACE": ("gateway_namespace", str),
        "GATEWAY_IMAGE": ("gateway_image", str),
        "GATEWAY_REPLICAS": ("gateway_replicas", int),
        "GATEWAY_MASTER_KEY_SECRET": ("gateway_master_key_secret", str),
        "GATEWAY_MASTER_KEY_KEY": ("gateway_master_key_key", str),
        "SERVER_IMAGE": ("server_image", str),
    }
    for key, (attr, convert) in simple.items():
        if get.get(key):
            try:
                updates[attr] = convert(get[key])
            except ValueError:
                raise ValueError(f"{PREFIX}{key}={get[key]!r} is not a valid {convert.__name__}") from None
    queue = updates.get("queue_name")
    if queue is not None and (len(queue) > 63 or not re.match(LABEL_VALUE_PATTERN, queue)):
        raise ValueError(f"{PREFIX}QUEUE_NAME={queue!r} is not a valid label value (a Kueue LocalQueue name)")
    if get.get("GATEWAY_ENABLED"):
        updates["gateway_enabled"] = get["GATEWAY_ENABLED"].strip().lower() in ("1", "true", "yes")
    for key, attr in (("GATEWAY_RESOURCES", "gateway_resources"), ("SERVER_RESOURCES", "server_resources")):
        if get.get(key):
            updates[attr] = ResourceRequirements.model_validate(_json_object(key, get[key]))
    if get.get("NAMESPACES"):
        updates["namespaces"] = _csv(get["NAMESPACES"])
    if get.get("STORAGE_SCOPES"):
        scopes = _json_object("STORAGE_SCOPES", get["STORAGE_SCOPES"])
        if not isinstance(scopes, list):
            raise ValueError(f"{PREFIX}STORAGE_SCOPES must be a JSON list")
        updates["storage_scopes"] = tuple(_scope(entry) for entry in scopes)
    for key, attr in (("ALLOW_DEFAULT_SCOPE", "allow_default_scope"), ("ALLOW_FILE_URIS", "allow_file_uris")):
        if get.get(key):
            updates[attr] = _bool(key, get[key])
    if get.get("SHARED_READ_URIS"):
        updates["shared_read_uris"] = _csv(get["SHARED_READ_URIS"])
    if "ALLOWED_IMAGE_PREFIXES" in get:
        updates["allowed_image_prefixes"] = _csv(get["ALLOWED_IMAGE_PREFIXES"])
    if get.get("GPU_TOLERATIONS"):
        updates["gpu_tolerations"] = _json_object("GPU_TOLERATIONS", get["GPU_TOLERATIONS"])
    if get.get("GPU_NODE_SELECTOR"):
        updates["gpu_node_selector"] = _json_object("GPU_NODE_SELECTOR", get["GPU_NODE_SELECTOR"])
    if get.get("STAGE_ENV"):
        updates["stage_env"] = {
            str(k): str(v) for k, v in _json_object("STAGE_ENV", get["STAGE_ENV"]).items()
        }
    resources = dict(settings.stage_resources)
    for stage in STAGES:
        key = f"{stage.value.upper()}_RESOURCES"
        if get.get(key):
            resources[stage] = ResourceRequirements.model_validate(_json_object(key, get[key]))
    updates["stage_resources"] = resources
    known = {f.name for f in fields(Settings)}
    return replace(settings, **{k: v for k, v in updates.items() if k in known})


def from_env() -> Settings:
    return from_mapping(os.environ)
