"""Teacher and student catalogs: data files (teachers.yaml, students.yaml) plus a small loader.

    cat = load_catalog()                          # packaged files, then env KUBEDISTILL_CATALOG_DIR
    cat = load_catalog(data=configmap.data)       # a ConfigMap's {"teachers.yaml": ..., ...}
    t = cat.resolve_teacher("openai/gpt-4o")      # base URL, API model name, prices, supportsN, batchAPI
    s = cat.student("qwen3-0.6b")                 # HF id, size, VRAM, LoRA targets, chat family

Overrides merge into the packaged catalog by id (providers by name), so a ConfigMap that adds one
model or refreshes one price does not have to repeat the rest.

Teacher ids are `<provider>/<model as the provider names it>`. A model that is not in the catalog
still resolves when its provider is known (base URL from the provider) or a base URL is given; its
price is then unknown and counted as 0, with a note saying so. `local/<name>` is a model served on
this machine (local mode supplies the base URL); it is free.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

CATALOG_DIR_ENV = "KUBEDISTILL_CATALOG_DIR"
BatchAPI = Literal["openai", "anthropic"]
TEACHERS_FILE = "teachers.yaml"
STUDENTS_FILE = "students.yaml"


class _Entry(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Provider(_Entry):
    base_url: str | None = Field(alias="baseURL")
    supports_n: bool = False
    chars_per_token: float = 4.0
    free: bool = False
    max_tokens_param: str = "max_tokens"
    batch_api: BatchAPI | None = Field(default=None, alias="batchAPI")
    batch_price_factor: float = Field(default=0.5, gt=0, le=1)
    cache_min_tokens: int | None = Field(default=None, ge=1)


class Teacher(_Entry):
    id: str
    input_per_m_tok: float = Field(ge=0)
    output_per_m_tok: float = Field(ge=0)
    price_date: str
    supports_n: bool | None = None
    chars_per_token: float | None = None
    supports_temperature: bool = True
    cached_input_per_m_tok: float | None = Field(default=None, ge=0)
    batch_price_factor: float | None = Field(default=None, gt=0, le=1)


class Student(_Entry):
    id: str
    hf_id: str
    params_b: float = Field(gt=0)
    min_vram_gb: float = Field(gt=0, alias="minVramGB")
    typical_training_minutes: float = Field(gt=0)
    chat_family: str
    chars_per_token: float = Field(gt=0)
    lora_target_modules: list[str] | None = None


class ThroughputPoint(_Entry):
    params_b: float = Field(gt=0)
    tokens_per_second: float = Field(gt=0)


class ResolvedTeacher(BaseModel):
    """Everything the client and the estimate need about one teacher model."""

    id: str
    provider: str | None
    api_model: str
    base_url: str | None
    input_per_m_tok: float
    output_per_m_tok: float
    price_date: str | None
    supports_n: bool
    chars_per_token: float
    known_price: bool
    note: str = ""
    max_tokens_param: str = Field(default="max_tokens", description="max_completion_tokens for OpenAI.")
    supports_temperature: bool = Field(default=True, description="False for reasoning models (fixed at 1).")
    cached_input_per_m_tok: float | None = Field(
        default=None, description="Price of input tokens read from the cache; None: the input price."
    )
    batch_api: BatchAPI | None = Field(default=None, description="The provider's batch API, if it has one.")
    batch_price_factor: float = Field(default=1.0, description="Batch price / synchronous price.")
    cache_min_tokens: int | None = Field(
        default=None,
        description="Shortest prompt prefix the provider caches by itself; None: no automatic cache.",
    )

    @property
    def cached_input_price(self) -> float:
        """USD per million cached input tokens: the input price where the catalog lists no discount."""
        return self.input_per_m_tok if self.cached_input_per_m_tok is None else self.cached_input_per_m_tok

    def cost(
        self, input_tokens: int, output_tokens: int, *, cached_tokens: int = 0, batch: bool = False
    ) -> float:
        """`input_tokens` includes the `cached_tokens` (as providers report them), which are billed at
        the cached price; a batch request is billed at `batch_price_factor` of the whole."""
        uncached = max(0, input_tokens - cached_tokens)
        dollars = (
            uncached * self.input_per_m_tok
            + min(cached_tokens, input_tokens) * self.cached_input_price
            + output_tokens * self.output_per_m_tok
        ) / 1e6
        return dollars * self.batch_price_factor if batch else dollars


class Catalog(BaseModel):
    providers: dict[str, Provider]
    teachers: dict[str, Teacher]
    students: dict[str, Student]
    default_lora_target_modules: list[str]
    training_throughput: list[ThroughputPoint]

    def resolve_teacher(self, model: str, base_url: str | None = None) -> ResolvedTeacher:
        provider_name, _, rest = model.partition("/")
        provider = self.providers.get(provider_name) if rest else None
        api_model = rest if provider is not None else model
        url = base_url or (provider.base_url if provider else None)
        entry = self.teachers.get(model)
        if entry is not None and provider is not None:
            return ResolvedTeacher(
                id=model,
                provider=provider_name,
                api_model=api_model,
                base_url=url,
                input_per_m_tok=entry.input_per_m_tok,
                output_per_m_tok=entry.output_per_m_tok,
                price_date=entry.price_date,
                supports_n=provider.supports_n if entry.supports_n is None else entry.supports_n,
                chars_per_token=entry.chars_per_token or provider.chars_per_token,
                known_price=True,
                max_tokens_param=provider.max_tokens_param,
                supports_temperature=entry.supports_temperature,
                cached_input_per_m_tok=entry.cached_input_per_m_tok,
                batch_api=provider.batch_api,
                batch_price_factor=entry.batch_price_factor or provider.batch_price_factor,
                cache_min_tokens=provider.cache_min_tokens,
            )
        free = provider is not None and provider.free
        return ResolvedTeacher(
            id=model,
            provider=provider_name if provider else None,
            api_model=api_model,
            base_url=url,
            input_per_m_tok=0.0,
            output_per_m_tok=0.0,
            price_date=None,
            supports_n=provider.supports_n if provider else False,
            chars_per_token=provider.chars_per_token if provider else 4.0,
            known_price=free,
            note=""
            if free
            else f"{model} is not in the teacher catalog: its price is unknown and counted as 0",
            max_tokens_param=provider.max_tokens_param if provider else "max_tokens",
            batch_api=provider.batch_api if provider else None,
            cache_min_tokens=provider.cache_min_tokens if provider else None,
        )

    def student(self, model: str) -> Student | None:
        """By catalog id or by Hugging Face id."""
        if model in self.students:
            return self.students[model]
        return next((s for s in self.students.values() if s.hf_id == model), None)

    def lora_targets(self, model: str) -> list[str]:
        entry = self.student(model)
        return list(entry.lora_target_modules or self.default_lora_target_modules) if entry else []

    def training_tokens_per_second(self, params_b: float) -> float:
        """Linear interpolation over the throughput table; beyond its largest row, inverse to size."""
        points = sorted(self.training_throughput, key=lambda p: p.params_b)
        if params_b <= points[0].params_b:
            return points[0].tokens_per_second
        for lo, hi in itertools.pairwise(points):
            if params_b <= hi.params_b:
                t = (params_b - lo.params_b) / (hi.params_b - lo.params_b)
                return lo.tokens_per_second + t * (hi.tokens_per_second - lo.tokens_per_second)
        return points[-1].tokens_per_second * points[-1].params_b / params_b


def _packaged(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge an override document: providers by name, teachers/students by id, scalars replace."""
    out = dict(base)
    for key, value in override.items():
        if key == "providers":
            out[key] = {**base.get(key, {}), **value}
        elif key in ("teachers", "students"):
            by_id = {e["id"]: e for e in base.get(key, [])}
            by_id.update({e["id"]: e for e in value})
            out[key] = list(by_id.values())
        else:
            out[key] = value
    return out


def build_catalog(teachers_doc: dict[str, Any], students_doc: dict[str, Any]) -> Catalog:
    return Catalog(
        providers={k: Provider.model_validate(v) for k, v in teachers_doc.get("providers", {}).items()},
        teachers={t.id: t for t in map(Teacher.model_validate, teachers_doc.get("teachers", []))},
        students={s.id: s for s in map(Student.model_validate, students_doc.get("students", []))},
        default_lora_target_modules=students_doc.get("defaultLoraTargetModules", []),
        training_throughput=[
            ThroughputPoint.model_validate(p) for p in students_doc.get("trainingThroughput", [])
        ],
    )


def load_catalog(
    directory: str | Path | None = None,
    data: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Catalog:
    """The packaged catalog, overridden by `directory` (else env KUBEDISTILL_CATALOG_DIR), then `data`."""
    env = os.environ if environ is None else environ
    docs = {name: yaml.safe_load(_packaged(name)) or {} for name in (TEACHERS_FILE, STUDENTS_FILE)}
    directory = directory or env.get(CATALOG_DIR_ENV)
    overrides: list[Mapping[str, str]] = []
    if directory:
        found = {n: Path(directory) / n for n in docs}
        overrides.append({n: p.read_text(encoding="utf-8") for n, p in found.items() if p.is_file()})
    if data:
        overrides.append(data)
    for override in overrides:
        for name, text in override.items():
            if name in docs:
                docs[name] = _merge(docs[name], yaml.safe_load(text) or {})
    return build_catalog(docs[TEACHERS_FILE], docs[STUDENTS_FILE])
