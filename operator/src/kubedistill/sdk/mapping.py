"""The SDK's pure half: the seed's keywords → a DistillationJob body, and objects → the dicts the SDK
returns (summary, artifacts, alias). No I/O: tested on its own, and used by the CLI's tables too."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from kubedistill.api.models import API_VERSION, GROUP, Phase
from kubedistill.catalog import Catalog
from kubedistill.errors import Invalid, NotFound
from kubedistill.merge import deep_merge

DATASETS_URI_ENV = "KUBEDISTILL_DATASETS_URI"


DATASET_KEY = "dataset.jsonl"


DISPLAY_NAME_ANNOTATION = f"{GROUP}/display-name"


DEFAULT_QUANTIZATIONS = ("q4_k_m", "q8_0")


_COARSE: dict[str, str] = {
    Phase.SUCCEEDED: "succeeded",
    Phase.FAILED: "failed",
    Phase.SUSPENDED: "suspended",
    Phase.PENDING: "pending",
    Phase.ESTIMATING: "pending",
}


TERMINAL = frozenset({"succeeded", "failed"})


def job_id(name: str) -> str:
    """A DNS-1123 name from a display name: lowercase, runs of other characters become one '-'."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:63].strip("-")
    if not slug:
        raise Invalid(f"metadata.name: {name!r} has no letter or digit to build a name from")
    return slug


def coarse_status(phase: str | None) -> str:
    if not phase:
        return "pending"
    return _COARSE.get(phase, "running")


def dataset_spec(
    dataset_id: str, configmap_keys: Sequence[str] | None, datasets_uri: str | None
) -> dict[str, Any]:
    """`spec.dataset` for a dataset id (see the module docstring for the order)."""
    if "://" in dataset_id:
        return {"uri": dataset_id}
    if configmap_keys is not None:
        keys = list(configmap_keys)
        key = keys[0] if len(keys) == 1 else DATASET_KEY
        if key not in keys:
            raise Invalid(
                f"ConfigMap {dataset_id} has keys {keys}: name one {DATASET_KEY!r} or keep only one"
            )
        return {"configMapRef": {"name": dataset_id, "key": key}}
    if datasets_uri:
        return {"uri": f"{datasets_uri.rstrip('/')}/{dataset_id}.jsonl"}
    raise NotFound(
        f"dataset {dataset_id!r}: no ConfigMap of that name, and no datasets_uri "
        f"(or env {DATASETS_URI_ENV}) to look for {dataset_id}.jsonl in"
    )


def _secret_ref(value: str | tuple[str, str] | None) -> dict[str, str] | None:
    """`"name/key"` or `(name, key)` → a secretKeyRef; the key's value never passes through here."""
    if value is None:
        return None
    name, key = value if isinstance(value, tuple) else value.split("/", 1) if "/" in value else (value, "")
    if not key:
        raise Invalid(f"spec.teacher.apiKeySecretRef: {value!r} must be 'secret-name/key'")
    return {"name": name, "key": key}


def _judge(judge: str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(judge, str):
        return {judge: {}}
    return dict(judge)


def job_body(
    name: str,
    dataset: Mapping[str, Any],
    teacher_model: str,
    student_model: str,
    *,
    num_prompts: int | None = 500,
    n_samples: int = 4,
    training_steps: int = 100,
    bond_beta: float = 0.5,
    bond_gamma: float = 0.1,
    export_gguf: bool = True,
    quantization_types: Sequence[str] = DEFAULT_QUANTIZATIONS,
    top_k: int = 2,
    judge: str | Mapping[str, Any] = "llm",
    teacher_base_url: str | None = None,
    teacher_api_key_secret: str | tuple[str, str] | None = None,
    system_prompt: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    test_fraction: float | None = None,
    alias: str | None = None,
    min_eval_score: float | None = None,
    max_teacher_cost_usd: float | None = None,
    labels: Mapping[str, str] | None = None,
    spec_overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The DistillationJob object `Distiller.create` submits: the seed's keywords → the CRD's fields."""
    teacher: dict[str, Any] = {"model": teacher_model}
    if teacher_base_url:
        teacher["baseURL"] = teacher_base_url
    ref = _secret_ref(teacher_api_key_secret)
    if ref:
        teacher["apiKeySecretRef"] = ref
    generation: dict[str, Any] = {"nSamples": n_samples}
    for key, value in (
        ("systemPrompt", system_prompt),
        ("maxTokens", max_tokens),
        ("temperature", temperature),
    ):
        if value is not None:
            generation[key] = value
    data = dict(dataset)
    if num_prompts is not None:
        data["numPrompts"] = num_prompts
    if test_fraction is not None:
        data["testFraction"] = test_fraction
    spec: dict[str, Any] = {
        "teacher": teacher,
        "student": {"model": student_model},
        "dataset": data,
        "generation": generation,
        "curation": {"judge": _judge(judge), "topK": top_k},
        "training": {"steps": training_steps, "bondBeta": bond_beta, "bondGamma": bond_gamma},
        "export": {"gguf": export_gguf, "quantizations": list(quantization_types)},
    }
    promotion = {k: v for k, v in (("alias", alias), ("minEvalScore", min_eval_score)) if v is not None}
    if promotion:
        spec["promotion"] = promotion
    if max_teacher_cost_usd is not None:
        spec["budget"] = {"maxTeacherCostUSD": max_teacher_cost_usd}
    if spec_overrides:
        spec = deep_merge(spec, spec_overrides)
    metadata: dict[str, Any] = {"name": job_id(name)}
    if metadata["name"] != name:
        metadata["annotations"] = {DISPLAY_NAME_ANNOTATION: name}
    if labels:
        metadata["labels"] = dict(labels)
    return {"apiVersion": API_VERSION, "kind": "DistillationJob", "metadata": metadata, "spec": spec}


def summary(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A job object as the dict `create`, `get`, `list` and `wait` return."""
    meta, status = obj.get("metadata", {}), obj.get("status") or {}
    phase = status.get("phase")
    progress = status.get("progress") or {}
    return {
        "id": meta.get("name"),
        "name": meta.get("annotations", {}).get(DISPLAY_NAME_ANNOTATION, meta.get("name")),
        "namespace": meta.get("namespace"),
        "uid": meta.get("uid"),
        "status": coarse_status(phase),
        "phase": phase,
        "stage": progress.get("stage"),
        "progress": progress.get("percent", 0.0),
        "detail": progress.get("detail"),
        "message": _ready_message(status),
        "teacher_model": obj.get("spec", {}).get("teacher", {}).get("model"),
        "student_model": obj.get("spec", {}).get("student", {}).get("model"),
        "created_at": meta.get("creationTimestamp"),
        "completed_at": status.get("completionTime"),
        "metrics": status.get("metrics") or {},
    }


def _ready_message(status: Mapping[str, Any]) -> str | None:
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    for kind in ("Failed", "Ready"):
        if kind in conditions and conditions[kind].get("message"):
            return str(conditions[kind]["message"])
    return None


def artifacts_view(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The seed's `artifacts()` shape from a job's status."""
    status = obj.get("status") or {}
    arts, metrics = status.get("artifacts") or {}, status.get("metrics") or {}
    return {
        "adapter_path": arts.get("adapterURI"),
        "merged_path": arts.get("mergedURI"),
        "gguf_paths": dict(arts.get("ggufURIs") or {}),
        "eval_path": arts.get("evalURI"),
        "dataset_path": arts.get("datasetURI"),
        "metrics": {
            "teacher_cost_total": metrics.get("teacherCostTotal"),
            "teacher_saving_usd": metrics.get("teacherSavingUSD"),
            "student_loss_final": metrics.get("studentLossFinal"),
            "training_time_sec": metrics.get("trainingTimeSec"),
            "eval_score": metrics.get("evalScore"),
            "teacher_eval_score": metrics.get("teacherEvalScore"),
            "retention": metrics.get("retention"),
            "teacher_calls": metrics.get("teacherCalls"),
            "curated": metrics.get("curated"),
        },
    }


def alias_target(
    adapter_path: str | None,
    gguf_path: str | None,
    base_model: str | None,
    distillation_job: str | None,
    provider: str | None = None,
    base_url: str | None = None,
    api_key_secret: str | None = None,
) -> dict[str, Any]:
    """A ModelAlias target; `api_key_secret` is `SECRET/KEY`, a Secret in the alias's namespace."""
    if distillation_job:
        return {"distillationJob": distillation_job}
    if provider:
        spec: dict[str, Any] = {"model": provider}
        if base_url:
            spec["baseURL"] = base_url
        if api_key_secret:
            name, _, key = api_key_secret.partition("/")
            spec["apiKeySecretRef"] = {"name": name, "key": key or "api-key"}
        return {"provider": spec}
    target = {"ggufURI": gguf_path, "adapterURI": adapter_path, "baseModel": base_model}
    return {k: v for k, v in target.items() if v}


def estimate_body(
    student_model: str,
    num_prompts: int,
    n_samples: int,
    teacher_model: str,
    max_tokens: int | None,
    training_steps: int,
    judge: str | Mapping[str, Any],
    system_prompt: str | None,
) -> dict[str, Any]:
    generation: dict[str, Any] = {"nSamples": n_samples}
    if max_tokens is not None:
        generation["maxTokens"] = max_tokens
    if system_prompt:
        generation["systemPrompt"] = system_prompt
    return {
        "teacher": {"model": teacher_model},
        "student": {"model": student_model},
        "dataset": {"prompts": ["x"], "numPrompts": num_prompts},
        "generation": generation,
        "curation": {"judge": _judge(judge), "topK": min(2, n_samples)},
        "training": {"steps": training_steps},
    }


def estimate_dict(report: Any, catalog: Catalog, teacher_model: str) -> dict[str, Any]:
    e = report.estimate
    teacher = catalog.resolve_teacher(teacher_model)
    return {
        "estimated_cost": round(e.teacher_cost_usd + e.judge_cost_usd, 6),
        "teacher_cost": round(e.teacher_cost_usd, 6),
        "judge_cost": round(e.judge_cost_usd, 6),
        "teacher_calls": e.teacher_calls,
        "teacher_mode": e.teacher_mode,
        "input_tokens": e.input_tokens,
        "cached_input_tokens": e.cached_input_tokens,
        "output_tokens": e.output_tokens,
        "gpu_minutes": e.gpu_minutes,
        "train_nodes": e.train_nodes,
        "train_processes_per_node": e.train_processes_per_node,
        "generation_shards": e.generation_shards,
        "sufficient": e.fits_budget,
        "tier": "local" if teacher.provider == "local" else "api",
        "is_sandbox": False,
        "breakdown": report.breakdown,
    }


def alias_view(obj: Mapping[str, Any]) -> dict[str, Any]:
    status, spec = obj.get("status") or {}, obj.get("spec") or {}
    conditions = status.get("conditions") or []
    ready: Mapping[str, Any] = next((c for c in conditions if c.get("type") == "Ready"), {})
    progressing: Mapping[str, Any] = next((c for c in conditions if c.get("type") == "Progressing"), {})
    return {
        "id": obj.get("metadata", {}).get("name"),
        "target": obj.get("spec", {}).get("target", {}),
        "gguf_path": status.get("ggufURI"),
        "adapter_path": status.get("adapterURI"),
        "model": status.get("model"),
        "ready": ready.get("status") == "True",
        "message": ready.get("message"),
        "progressing": progressing.get("status") == "True",
        "progress_reason": progressing.get("reason"),
        "progress_message": progressing.get("message"),
        "canary": spec.get("canary"),
        "fallback": spec.get("fallback"),
        "endpoint": status.get("endpoint"),
        "served": [
            {
                "role": s.get("role"),
                "weight": s.get("weight"),
                "ready_replicas": s.get("readyReplicas", 0),
                "deployment_id": s.get("deploymentId"),
                "target": s.get("target"),
            }
            for s in status.get("served") or []
        ],
        "history": [
            {"target": h.get("target"), "canary": h.get("canary"), "replaced_at": h.get("replacedAt")}
            for h in status.get("history") or []
        ],
    }


def _replacing(current: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch's value that turns `current` into `wanted`: null removes the keys `wanted` lacks."""
    return {**dict.fromkeys(current or {}), **wanted}


def rollback_patch(spec: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch that restores a history entry's serving state: its target, and its canary or none."""
    canary = entry.get("canary")
    return {
        "spec": {
            "target": _replacing(spec.get("target"), entry["target"]),
            "canary": _replacing(spec.get("canary"), canary) if canary else None,
        }
    }
