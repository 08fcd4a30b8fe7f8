"""`--preset smoke`: the same job with a few rows and steps, a scripted teacher and the tiny student."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kubedistill.api.jobfile import JobInvalid
from kubedistill.api.models import DistillationJobSpec
from kubedistill.local.plan import LOCAL_PREFIX
from kubedistill.merge import deep_merge

SMOKE_OVERRIDES: dict[str, Any] = {
    "dataset": {"numPrompts": 60},
    "generation": {"nSamples": 2, "maxTokens": 8},
    "curation": {"topK": 1},
    "training": {"steps": 6, "batchSize": 4, "checkpointEvery": 3, "maxSeqLength": 128},
    "export": {"gguf": True, "quantizations": ["q4_k_m"]},
    "evaluation": {"maxRows": 8},
}


PRESETS = ("smoke",)


def apply_preset(spec: DistillationJobSpec, preset: str | None) -> DistillationJobSpec:
    """`smoke`: the same job, a few rows and steps: what CI runs in a couple of minutes."""
    if preset is None:
        return spec
    if preset != "smoke":
        raise JobInvalid([f"--preset: unknown preset {preset!r}; known: {', '.join(PRESETS)}"])
    doc = deep_merge(spec.to_k8s(), SMOKE_OVERRIDES)
    if doc["generation"]["nSamples"] < doc["curation"]["topK"]:
        doc["curation"]["topK"] = doc["generation"]["nSamples"]
    return DistillationJobSpec.model_validate(doc)


@contextmanager
def smoke_teacher(spec: DistillationJobSpec) -> Iterator[str]:
    """A loopback scripted teacher that answers each row with its reference (for --preset smoke)."""
    from kubedistill import dataset
    from kubedistill.local.scripted_teacher import ScriptedTeacher

    rows = dataset.load(spec.dataset).rows
    answers = {r.prompt_text(): r.reference or "other" for r in rows}
    with ScriptedTeacher(answers=answers, models=(spec.teacher.model.removeprefix(LOCAL_PREFIX),)) as teacher:
        yield str(teacher.base_url)


def smoke_student() -> Path:
    from kubedistill.local.tiny_model import tiny_llama

    return tiny_llama()
