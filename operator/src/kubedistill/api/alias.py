"""ModelAlias (kubedistill.io/v1alpha1): the stable model name an application sends, and what serves it.

A target is a job's student, an explicit GGUF (served by llama-server Deployments the operator runs)
or a provider model (routed straight to its API); the gateway routes `model=<alias>` to the primary,
a weighted canary and a fallback.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from kubedistill.api.models import (
    API_VERSION,
    Condition,
    Model,
    ModelId,
    Name,
    ObjectMeta,
    Quantization,
    ResourceRequirements,
    SecretKeyRef,
    StatusModel,
    Uri,
)
from kubedistill.api.recording import RecordingSpec


class ProviderTarget(Model):
    model: ModelId = Field(
        description="LiteLLM model string, provider/model, e.g. openai/gpt-4o or anthropic/claude-sonnet-4-5."
    )
    base_url: Uri | None = Field(
        default=None, alias="baseURL", description="OpenAI-compatible base URL; defaults to the provider's."
    )
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret (in the alias's namespace) holding the API key; copied only into the gateway's "
        "keys Secret, never into its config.",
    )


class AliasTarget(Model):
    distillation_job: Name | None = Field(default=None, description="Serve this job's student.")
    quantization: Quantization = Field(
        default="q4_k_m", description="GGUF quantisation, with distillationJob."
    )
    gguf_uri: Uri | None = Field(default=None, alias="ggufURI", description="Explicit GGUF file.")
    adapter_uri: Uri | None = Field(default=None, alias="adapterURI", description="Explicit LoRA adapter.")
    base_model: ModelId | None = Field(default=None, description="Base model of the explicit adapter.")
    provider: ProviderTarget | None = Field(
        default=None,
        description="A provider model, routed to its API (e.g. the teacher, before distillation).",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> AliasTarget:
        explicit = any(v is not None for v in (self.gguf_uri, self.adapter_uri, self.base_model))
        if [self.distillation_job is not None, explicit, self.provider is not None].count(True) != 1:
            raise ValueError(
                "set exactly one of distillationJob, explicit ggufURI/adapterURI/baseModel, or provider"
            )
        return self


class FallbackTarget(AliasTarget):
    """A target of its own class only so that admission messages name `fallback`."""


class CanaryTarget(AliasTarget):
    weight: int = Field(ge=0, le=100, description="Percent of requests sent to the canary (0-100).")


class ServerSpec(Model):
    replicas: int = Field(default=1, ge=1, le=64, description="llama-server replicas per served GGUF.")
    resources: ResourceRequirements | None = Field(
        default=None, description="Server container resources; defaults to the operator's."
    )
    node_selector: dict[str, Annotated[str, Field(max_length=253)]] | None = Field(
        default=None, description="Server Pod nodeSelector."
    )
    tolerations: list[dict[str, Any]] | None = Field(
        default=None, max_length=32, description="Server Pod tolerations."
    )
    ctx_size: int = Field(default=4096, ge=256, le=1_048_576, description="llama-server --ctx-size.")
    parallel: int = Field(default=4, ge=1, le=256, description="llama-server --parallel (request slots).")
    request_timeout_seconds: int = Field(
        default=120, ge=1, le=3600, description="Gateway timeout per request; the server drains this long."
    )
    image: Annotated[str, Field(max_length=512)] | None = Field(
        default=None, description="llama-server image override."
    )


class ModelAliasSpec(Model):
    target: AliasTarget = Field(description="What model=<alias> resolves to (the primary).")
    canary: CanaryTarget | None = Field(
        default=None, description="A second target taking `weight` percent of requests."
    )
    fallback: FallbackTarget | None = Field(
        default=None, description="Takes a request the primary (or canary) failed, typically the teacher."
    )
    server: ServerSpec = Field(default_factory=ServerSpec, description="Model-server settings.")
    recording: RecordingSpec | None = Field(
        default=None, description="Store requests and answers, redacted, as a dataset source (fromTraffic)."
    )


class Endpoint(StatusModel):
    url: Uri = Field(description="OpenAI-compatible base URL of the gateway, in-cluster.")
    model: ModelId = Field(description="The `model` to send.")


Role = Literal["primary", "canary", "fallback"]


class ServedTarget(StatusModel):
    role: Role = Field(description="primary, canary or fallback.")
    target: AliasTarget = Field(description="The target as the spec named it.")
    weight: int = Field(ge=0, le=100, description="Percent of requests (fallback: 0, only on failure).")
    server: Annotated[str, Field(max_length=63)] | None = Field(
        default=None, description="Model-server Deployment and Service (GGUF targets)."
    )
    ready_replicas: int = Field(default=0, ge=0, description="Ready server replicas.")
    deployment_id: Annotated[str, Field(max_length=512)] = Field(
        description="The gateway's id of this route (its x-litellm-model-id response header)."
    )


class AliasHistoryEntry(StatusModel):
    target: AliasTarget = Field(description="A previous target.")
    canary: CanaryTarget | None = Field(default=None, description="The canary served beside it, if any.")
    replaced_at: str | None = Field(default=None, description="When it was replaced (RFC 3339).")


class ModelAliasStatus(StatusModel):
    gguf_uri: Uri | None = Field(default=None, alias="ggufURI", description="Resolved GGUF.")
    adapter_uri: Uri | None = Field(default=None, alias="adapterURI", description="Resolved adapter.")
    model: ModelId | None = Field(default=None, description="Resolved base model.")
    endpoint: Endpoint | None = Field(default=None, description="Where to send requests, and as what model.")
    served: list[ServedTarget] = Field(
        default_factory=list, max_length=3, description="What the gateway routes to now."
    )
    conditions: list[Condition] = Field(
        default_factory=list, max_length=16, description="Ready (routed and served), Progressing (a swap)."
    )
    history: list[AliasHistoryEntry] = Field(
        default_factory=list,
        max_length=10,
        description="Previous serving states (target and canary), newest first: what `alias rollback` restores.",
    )
    observed_generation: int | None = Field(default=None, ge=0, description="Last generation resolved.")


class ModelAlias(Model):
    api_version: Literal["kubedistill.io/v1alpha1"] = API_VERSION
    kind: Literal["ModelAlias"] = "ModelAlias"
    metadata: ObjectMeta
    spec: ModelAliasSpec
    status: ModelAliasStatus | None = None
