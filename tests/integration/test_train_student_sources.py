"""A student given as a GGUF file (how the quick start ships SmolLM2): transformers dequantises it,
train puts LoRA on it, export merges and converts it back."""

from __future__ import annotations

from pathlib import Path

import pytest
from model_stage_helpers import curated_rows, invocation, job_spec

from kubedistill import store
from kubedistill.api.models import Stage
from kubedistill.local.tiny_model import tiny_llama
from kubedistill_trainer import export, models, runtime, train

pytestmark = pytest.mark.slow


def test_resolve_student_sources(tmp_path: Path) -> None:
    gguf = tmp_path / "m" / "x.gguf"
    assert models.resolve_student(gguf.as_uri()) == models.StudentSource(str(gguf.parent), "x.gguf")
    assert models.resolve_student(str(tmp_path)) == models.StudentSource(str(tmp_path))
    assert models.resolve_student("smollm2-135m").path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.resolve_student("someone/some-model").path == "someone/some-model"
    assert models.lora_targets("qwen3-0.6b", None)[:2] == ["q_proj", "k_proj"]
    assert models.lora_targets("someone/some-model", None) == "all-linear"
    assert models.lora_targets("qwen3-0.6b", ["q_proj"]) == ["q_proj"]


def test_gguf_student_trains_and_exports(tmp_path: Path) -> None:
    student_dir = tmp_path / "student"
    student_dir.mkdir()
    export.convert_to_gguf(tiny_llama(), tmp_path / "f16.gguf", export.converter_dir(), "f16")
    export.quantize(tmp_path / "f16.gguf", student_dir / "tiny-q8_0.gguf", "q8_0")

    base = (tmp_path / "job").as_uri()
    store.write_jsonl(f"{base}/curate/curated/train.jsonl", curated_rows(4))
    spec = job_spec(
        (student_dir / "tiny-q8_0.gguf").as_uri(), training={"steps": 2}, export={"quantizations": ["q4_k_m"]}
    )

    trained = runtime.execute(train.run, invocation(base, Stage.TRAIN, spec))
    assert trained.ok, trained.message
    assert trained.details["steps"] == 2 and trained.metrics.student_loss_final is not None

    exported = runtime.execute(export.run, invocation(base, Stage.EXPORT, spec))
    assert exported.ok, exported.message
    assert store.exists(f"{exported.artifacts.merged_uri}/model.safetensors")
    assert exported.details["q4_k_m"]["smokeTokens"] == export.SMOKE_TOKENS
