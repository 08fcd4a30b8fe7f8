"""ModelAlias (kubedistill.io/v1alpha1): the stable model name an application sends, and what serves it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kubedistill.api.models import (
    API_VERSION,
    Condition,
    Model,
    ModelId,
    Name,
    ObjectMeta,
    Quantization,
    Uri,
)


class AliasTarget(Model):
    distillation_job: Name | None = Field(default=None, description="Serve this job's student.")
    quantization: Quantization = Field(
        default="q4_k_m", description="GGUF quantisation, with distillationJob."
    )
    gguf_uri: Uri | None = Field(default=None, alias="ggufURI", description="Explicit GGUF file.")
    adapter_uri: Uri | None = Field(default=None, alias="adapterURI", description="Explicit LoRA adapter.")
    base_model: ModelId | None = Field(default=None, description="Base model of the explicit adapter.")

    @model_validator(mode="after")
    def _job_or_explicit(self) -> AliasTarget:
        explicit = any(v is not None for v in (self.gguf_uri, self.adapter_uri, self.base_model))
        if (self.distillation_job is None) == (not explicit):
            raise ValueError("set either distillationJob or explicit ggufURI/adapterURI/baseModel")
        return self


class ModelAliasSpec(Model):
    target: AliasTarget = Field(description="What model=<alias> resolves to.")


class AliasHistoryEntry(Model):
    target: AliasTarget = Field(description="A previous target.")
    replaced_at: str | None = Field(default=None, description="When it was replaced (RFC 3339).")


class ModelAliasStatus(Model):
    gguf_uri: Uri | None = Field(default=None, alias="ggufURI", description="Resolved GGUF.")
    adapter_uri: Uri | None = Field(default=None, alias="adapterURI", description="Resolved adapter.")
    model: ModelId | None = Field(default=None, description="Resolved base model.")
    conditions: list[Condition] = Field(default_factory=list, max_length=16, description="Ready.")
    history: list[AliasHistoryEntry] = Field(default_factory=list, max_length=10, description="Last targets.")
    observed_generation: int | None = Field(default=None, ge=0, description="Last generation resolved.")


class ModelAlias(Model):
    api_version: Literal["kubedistill.io/v1alpha1"] = API_VERSION
    kind: Literal["ModelAlias"] = "ModelAlias"
    metadata: ObjectMeta
    spec: ModelAliasSpec
    status: ModelAliasStatus | None = None
