"""What the SDK answers without a cluster: the estimate of a job and the teacher and student catalogs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kubedistill import dataset as ds
from kubedistill.api.models import DistillationJobSpec
from kubedistill.catalog import Catalog
from kubedistill.domain.estimate import estimate as estimate_spec
from kubedistill.sdk.mapping import estimate_body, estimate_dict

# Named, because `Distiller.list` shadows the builtin inside the client's class body.
Dicts = list[dict[str, Any]]


def estimate(
    catalog: Catalog,
    student_model: str,
    num_prompts: int = 500,
    n_samples: int = 4,
    teacher_model: str = "openai/gpt-4o",
    *,
    max_tokens: int | None = None,
    training_steps: int = 100,
    judge: str | Mapping[str, Any] = "llm",
    system_prompt: str | None = None,
    rows: Sequence[Mapping[str, Any]] | None = None,
    mean_prompt_chars: int = 400,
) -> dict[str, Any]:
    """Teacher dollars and GPU minutes before anything runs; offline.

    Token counts come from `rows` when given (the real dataset), else from `num_prompts`
    prompts of `mean_prompt_chars` characters.
    """
    spec = DistillationJobSpec.model_validate(
        estimate_body(
            student_model,
            num_prompts,
            n_samples,
            teacher_model,
            max_tokens,
            training_steps,
            judge,
            system_prompt,
        )
    )
    parsed = (
        ds.rows_from_json(rows)
        if rows is not None
        else [ds.Row(id=str(i), prompt="x" * mean_prompt_chars) for i in range(num_prompts)]
    )
    report = estimate_spec(spec, parsed, catalog)
    return estimate_dict(report, catalog, teacher_model)


def teacher_models(catalog: Catalog) -> Dicts:
    out = []
    for t in catalog.teachers.values():
        resolved = catalog.resolve_teacher(t.id)
        out.append(
            {
                "id": t.id,
                "provider": resolved.provider,
                "base_url": resolved.base_url,
                "input_per_m_tok": t.input_per_m_tok,
                "output_per_m_tok": t.output_per_m_tok,
                "price_date": t.price_date,
            }
        )
    return out


def student_models(catalog: Catalog) -> Dicts:
    return [
        {
            "id": s.id,
            "hf_id": s.hf_id,
            "params": f"{s.params_b:g}B",
            "params_b": s.params_b,
            "min_vram_gb": s.min_vram_gb,
            "typical_training_minutes": s.typical_training_minutes,
            "lora_target_modules": catalog.lora_targets(s.id),
        }
        for s in catalog.students.values()
    ]
