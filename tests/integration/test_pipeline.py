"""The whole chain on one machine: generate → curate → train → export → evaluate, each stage its own
process as in a pod, against the loopback teacher, ending with q4_k_m and q8_0 GGUFs llama.cpp runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import pytest
from model_stage_helpers import invocation, job_spec, run_stage

from kubedistill import store
from kubedistill.api.models import STAGES, Stage
from kubedistill.local.tiny_model import tiny_llama
from kubedistill_testing.fake_teacher import FakeTeacher
from kubedistill_testing.s3 import RcloneS3

pytestmark = pytest.mark.slow

N_PROMPTS = 16


def _teacher_answer(prompt: str, sample: int, request: dict[str, Any]) -> str:
    """Two right answers per prompt, then a wrong one and a refusal: curation has something to reject."""
    n = int(prompt.split()[2])
    return [
        f"The answer is {2 * n}.",
        f"The answer is {2 * n}.",
        f"The answer is {2 * n + 1}.",
        "I do not know.",
    ][sample % 4]


@pytest.fixture(params=["file", "s3"])
def artifact_base(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, str | None]]:
    """file:// (local mode) or a real S3 server (rclone) as the stage pods see it: (base URI, secret)."""
    if request.param == "file":
        yield (tmp_path / "artifacts").as_uri(), None
        return
    with RcloneS3() as s3:
        s3.create_bucket("artifacts")
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        yield "s3://artifacts/tests/tiny/0000", s3.secret_key


def test_generate_to_evaluate_ends_with_runnable_ggufs(
    tmp_path: Path, artifact_base: tuple[str, str | None]
) -> None:
    student = tiny_llama()
    base, secret = artifact_base
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
            assert secret is None or (secret not in log and secret not in result.model_dump_json())
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
            out: Any = llm.create_chat_completion(
                [{"role": "user", "content": "What is 3 plus 3?"}], max_tokens=5
            )
            assert out["usage"]["completion_tokens"] >= 1
        finally:
            llm.close()

    evaluation = results[Stage.EVALUATE]
    assert evaluation.details["student"] == "llama.cpp q4_k_m"
    assert evaluation.details["rows"] == len(test_rows)
    assert evaluation.metrics.teacher_eval_score == 1.0
    assert evaluation.metrics.eval_score is not None and evaluation.metrics.retention is not None
    assert len(store.read_jsonl(evaluation.artifacts.eval_uri or "")) == len(test_rows)
