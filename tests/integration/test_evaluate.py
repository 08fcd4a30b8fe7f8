"""The evaluate stage: the tiny student answers held-out prompts (llama.cpp GGUF or transformers)
and a judge scores it beside the teacher's best candidate."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from model_stage_helpers import invocation, job_spec, run_stage
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from kubedistill import store
from kubedistill.api.models import Stage
from kubedistill.local.tiny_model import tiny_llama
from kubedistill_testing.fake_teacher import FakeTeacher
from kubedistill_trainer import evaluate, export, runtime

pytestmark = pytest.mark.slow

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def student() -> Path:
    return tiny_llama()


@pytest.fixture(scope="module")
def q4_gguf(student: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gguf")
    export.convert_to_gguf(student, out / "f16.gguf", export.converter_dir(), "f16")
    export.quantize(out / "f16.gguf", out / "model-q4_k_m.gguf", "q4_k_m")
    return out / "model-q4_k_m.gguf"


def heldout_rows(n: int) -> list[dict[str, Any]]:
    return [
        {
            "id": f"t{i}",
            "split": "test",
            "prompt": f"What is {i} times 3?",
            "reference": f"The answer is {3 * i}.",
            "chosen": [f"The answer is {3 * i}.", f"{3 * i}"],
            "rejected": [f"It is {i}."],
        }
        for i in range(n)
    ]


def _spec(student: Path, **sections: Any) -> Any:
    return job_spec(student, generation={"maxTokens": MAX_TOKENS}, **sections)


def test_gguf_student_scored_with_reference_judge(tmp_path: Path, student: Path, q4_gguf: Path) -> None:
    base = (tmp_path / "job").as_uri()
    store.write_jsonl(f"{base}/curate/curated/test.jsonl", heldout_rows(5))
    store.put_file(q4_gguf, f"{base}/export/gguf/model-q4_k_m.gguf")
    spec = _spec(student, curation={"judge": {"reference": {}}})

    result, log = run_stage(invocation(base, Stage.EVALUATE, spec), tmp_path)
    assert result.ok, f"{result.message}\n{log[-2000:]}"
    assert result.details["student"] == "llama.cpp q4_k_m"
    assert result.metrics.teacher_eval_score == 1.0  # the teacher's best answer is the reference
    assert result.metrics.eval_score is not None and 0.0 <= result.metrics.eval_score < 1.0
    assert result.metrics.retention == pytest.approx(result.metrics.eval_score, abs=1e-4)
    rows = store.read_jsonl(result.artifacts.eval_uri or "")
    assert [r["id"] for r in rows] == [f"t{i}" for i in range(5)]
    assert all(
        r["teacherScore"] == 1.0 and r["teacherAnswer"] == f"The answer is {3 * i}."
        for i, r in enumerate(rows)
    )
    # llama.cpp may run a token or two past max_tokens to finish a UTF-8 character, so no upper bound.
    assert all(r["completionTokens"] > 0 and r["latencySec"] > 0 for r in rows)
    mean = sum(r["studentScore"] for r in rows) / 5
    assert result.metrics.eval_score == pytest.approx(mean, abs=1e-4)
    details = result.details
    # llama.cpp's own timings, prompt processing and decoding apart, in the details and the metrics.
    assert details["studentTimedRequests"] == 5
    assert details["studentPromptTokensPerSecond"] > 0 and details["studentDecodeTokensPerSecond"] > 0
    latencies = sorted(r["latencySec"] for r in rows)
    assert details["studentLatencyP50Sec"] == pytest.approx(latencies[2], abs=1e-4)
    assert details["studentLatencyP95Sec"] == pytest.approx(latencies[4], abs=1e-4)
    assert result.metrics.student_decode_tokens_per_second == details["studentDecodeTokensPerSecond"]
    assert result.metrics.student_latency_p95_sec == details["studentLatencyP95Sec"]
    assert details["studentTokensPerCall"] == pytest.approx(
        sum(r["completionTokens"] for r in rows) / 5, abs=0.01
    )
    assert 0 <= details["agreementF1"] <= 1 and details["rows"] == 5


@pytest.fixture
def judge() -> Iterator[FakeTeacher]:
    """An LLM judge that grades the teacher's phrasing 0.9 and cannot parse anything else."""

    def grade(prompt: str, sample: int, request: dict[str, Any]) -> str:
        answer = prompt.split("ANSWER:\n", 1)[1].split("\n\n", 1)[0]
        if answer.startswith("The answer is"):
            return json.dumps({"score": 0.9, "reason": "correct"})
        return "I would rather not grade this."

    with FakeTeacher(grade) as fake:
        yield fake


def test_adapter_student_with_llm_judge_counts_unparsable_as_zero(
    tmp_path: Path, student: Path, judge: FakeTeacher
) -> None:
    base = (tmp_path / "job").as_uri()
    store.write_jsonl(f"{base}/curate/curated/test.jsonl", heldout_rows(3))
    adapter = get_peft_model(
        AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    adapter.save_pretrained(str(tmp_path / "adapter"))
    store.put_tree(tmp_path / "adapter", f"{base}/train/adapter")
    spec = _spec(student, teacher={"model": "fake-teacher", "baseURL": judge.base_url})

    result = runtime.execute(evaluate.run, invocation(base, Stage.EVALUATE, spec))
    assert result.ok, result.message
    assert result.details["student"] == "transformers base+adapter"
    assert result.metrics.teacher_eval_score == pytest.approx(0.9)
    assert result.metrics.eval_score == 0.0 and result.metrics.retention == 0.0
    assert result.details["unscoredStudent"] == 3 and result.details["unscoredTeacher"] == 0
    # Teacher answers: one call each; student answers: three attempts each before giving up.
    assert result.details["judgeCalls"] == 3 + 3 * 3 == len(judge.ok_calls())
    rows = store.read_jsonl(result.artifacts.eval_uri or "")
    assert all("unparsable" in r["studentReason"] for r in rows)

    # A rerun (a restarted pod) reuses the answers and the judge's scores: no new judge call.
    calls = len(judge.calls)
    again = runtime.execute(evaluate.run, invocation(base, Stage.EVALUATE, spec))
    assert again.ok and again.details["answersReused"] and not result.details["answersReused"]
    assert len(judge.calls) == calls
    assert again.metrics == result.metrics


def test_baseline_scores_the_untrained_student(tmp_path: Path, student: Path) -> None:
    base = (tmp_path / "job").as_uri()
    store.write_jsonl(f"{base}/curate/curated/test.jsonl", heldout_rows(2))
    spec = _spec(student, curation={"judge": {"reference": {}}})
    out = evaluate.baseline(invocation(base, Stage.EVALUATE, spec))
    assert out["rows"] == 2
    assert 0.0 <= out["baselineScore"] < 1.0
    assert 0 < out["studentTokensPerCall"] <= MAX_TOKENS
    assert not store.exists(f"{base}/evaluate/eval.jsonl")


def test_missing_heldout_rows_fail_clearly(tmp_path: Path, student: Path) -> None:
    base = (tmp_path / "job").as_uri()
    result = runtime.execute(evaluate.run, invocation(base, Stage.EVALUATE, _spec(student)))
    assert not result.ok and result.reason == "MissingInput" and "curate" in result.message


def test_visible_answer_drops_a_leading_think_block_only() -> None:
    assert evaluate.visible_answer("<think>\n\n</think>\n\nThe answer is 4.") == "The answer is 4."
    assert evaluate.visible_answer("4 <think>kept</think>") == "4 <think>kept</think>"


def test_merged_student_when_no_gguf_was_exported(tmp_path: Path, student: Path) -> None:
    base = (tmp_path / "job").as_uri()
    store.write_jsonl(f"{base}/curate/curated/test.jsonl", heldout_rows(2))
    store.put_tree(student, f"{base}/export/merged")
    spec = _spec(student, curation={"judge": {"majority": {}}}, export={"gguf": False})
    result = runtime.execute(evaluate.run, invocation(base, Stage.EVALUATE, spec))
    assert result.ok, result.message
    assert result.details["student"] == "transformers merged"
    # Majority: the teacher's modal answer among "The answer is 3i.", "3i", "It is i." is its best one.
    assert result.metrics.teacher_eval_score == 1.0
    assert result.details["rows"] == 2

    disabled = _spec(student, evaluation={"enabled": False})
    skipped = runtime.execute(evaluate.run, invocation(base, Stage.EVALUATE, disabled))
    assert skipped.ok and skipped.details == {"skipped": True} and skipped.metrics.eval_score is None
