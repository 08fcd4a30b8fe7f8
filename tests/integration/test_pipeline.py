"""The whole chain on one machine: generate → curate → train → export → evaluate, each stage its own
process as in a pod, against the loopback teacher, ending with q4_k_m and q8_0 GGUFs llama.cpp runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from model_stage_helpers import invocation, job_spec, run_stage

from kubedistill import store
from kubedistill.api.models import STAGES, Stage
from kubedistill.testing.fake_teacher import FakeTeacher
from kubedistill.testing.tiny_model import tiny_llama

pytestmark = pytest.mark.slow

llama_cpp = pytest.importorskip("llama_cpp")

N_PROMPTS = 16


def _teacher_answer(prompt: str, sample: int, request: dict[str, Any]) -> str:
    """Two right answers per prompt, then a wrong one and a refusal: curation has something to reject."""
    n = int(prompt.split()[2])
    return [
        f"The answer is {2 * n}.",
        f"The answer is {2 * n}.",
        f"The answer is {n + 1}.",
        "I do not know.",
    ][sample % 4]


def test_generate_to_evaluate_ends_with_runnable_ggufs(tmp_path: Path) -> None:
    student = tiny_llama()
    base = (tmp_path / "artifacts").as_uri()
    rows = [
        {"id": f"p{i}", "prompt": f"What is {i} plus {i}?", "reference": f"The answer is {2 * i}."}
        for i in range(N_PROMPTS)
    ]
    store.write_jsonl(f"{base}-input/prompts.jsonl", rows)

    with FakeTeacher(_teacher_answer) as teacher:
        spec = job_spec(
            student,
            teacher={"model": "fake-teacher", "baseURL": teacher.base_url},
            dataset={"uri": f"{base}-input/prompts.jsonl", "testFraction": 0.25},
            generation={"nSamples": 4, "maxTokens": 12},
            curation={"judge": {"reference": {}}, "topK": 2},
            training={"steps": 4, "checkpointEvery": 2, "batchSize": 2},
        )
        results = {}
        for stage in STAGES:
            result, log = run_stage(invocation(base, stage, spec), tmp_path)
            assert result.ok, f"{stage.value}: {result.reason}: {result.message}\n{log[-3000:]}"
            results[stage] = result
        teacher_calls = len(teacher.ok_calls())

    # Every prompt answered nSamples times, held-out prompts included; every call counted once.
    assert results[Stage.GENERATE].metrics.candidates == 4 * N_PROMPTS
    assert results[Stage.GENERATE].metrics.teacher_calls == teacher_calls
    train_rows = store.read_jsonl(f"{base}/curate/curated/train.jsonl")
    test_rows = store.read_jsonl(f"{base}/curate/curated/test.jsonl")
    assert len(train_rows) + len(test_rows) == N_PROMPTS and test_rows
    assert all(len(r["chosen"]) == 2 and len(r["rejected"]) == 2 for r in train_rows)

    train = results[Stage.TRAIN]
    assert train.details["steps"] == 4 and train.details["promptsWithRejected"] == len(train_rows)
    assert train.metrics.student_loss_final is not None

    ggufs = results[Stage.EXPORT].artifacts.gguf_uris or {}
    assert set(ggufs) == {"q4_k_m", "q8_0"}
    for quant, uri in ggufs.items():
        path = tmp_path / f"{quant}.gguf"
        store.get_file(uri, path)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, verbose=False)
        try:
            out = llm.create_chat_completion([{"role": "user", "content": "What is 3 plus 3?"}], max_tokens=5)
            assert out["usage"]["completion_tokens"] >= 1
        finally:
            llm.close()

    evaluation = results[Stage.EVALUATE]
    assert evaluation.details["student"] == "llama.cpp q4_k_m"
    assert evaluation.details["rows"] == len(test_rows)
    assert evaluation.metrics.teacher_eval_score == 1.0
    assert evaluation.metrics.eval_score is not None and evaluation.metrics.retention is not None
    assert len(store.read_jsonl(evaluation.artifacts.eval_uri or "")) == len(test_rows)
