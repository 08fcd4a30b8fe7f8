"""Operator settings, read once at startup from the environment (and optionally a ConfigMap's data).

Every knob has a default that suits a GPU cluster with S3; a CPU-only cluster sets
``KUBEDISTILL_DEFAULT_TRAIN_GPUS=0``. Values here are never secret: credentials are named by
Secret, never held.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from kubedistill.api.models import GPU_STAGES, STAGES, ResourceRequirements, Stage

PREFIX = "KUBEDISTILL_"
DEFAULT_IMAGE = "ghcr.io/kubedistill/trainer:0.1.0"
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
    # Plain (non-secret) env for every stage container, e.g. HTTPS_PROXY or HF_HUB_OFFLINE.
    stage_env: dict[str, str] = field(default_factory=dict)
    namespaces: tuple[str, ...] = ()
    progress_interval_s: float = 10.0
    retry_backoff_base_s: float = 10.0
    retry_backoff_max_s: float = 600.0
    # A ConfigMap holding the invocation above this size keeps the Pod spec small (env limit ~1 MiB total).
    max_env_invocation_bytes: int = 32 * 1024
    peering: str | None = None
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
    if get.get("GATEWAY_ENABLED"):
        updates["gateway_enabled"] = get["GATEWAY_ENABLED"].strip().lower() in ("1", "true", "yes")
    for key, attr in (("GATEWAY_RESOURCES", "gateway_resources"), ("SERVER_RESOURCES", "server_resources")):
        if get.get(key):
            updates[attr] = ResourceRequirements.model_validate(_json_object(key, get[key]))
    if get.get("NAMESPACES"):
        updates["namespaces"] = _csv(get["NAMESPACES"])
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
