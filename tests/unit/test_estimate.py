"""The estimate: hand-computed figures, and within ±15% of a real (loopback) generate run's cost."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubedistill import dataset
from kubedistill.api.models import DistillationJobSpec, Stage
from kubedistill.api.stage import JobRef, StageInvocation
from kubedistill.catalog import load_catalog
from kubedistill.domain.estimate import estimate
from kubedistill_testing.fake_teacher import FakeTeacher
from kubedistill_trainer import generate


def job(**sections: Any) -> DistillationJobSpec:
    doc: dict[str, Any] = {
        "teacher": {"model": "openai/gpt-4o-mini"},
        "student": {"model": "smollm2-135m"},
        "dataset": {"prompts": ["x"]},
        "generation": {"nSamples": 4, "maxTokens": 100},
        "curation": {"judge": {"majority": {}}},
    }
    doc.update(sections)
    return DistillationJobSpec.model_validate(doc)


ROWS = [dataset.Row(id="r", prompt="abcd" * 10)]  # 40 characters


def test_hand_computed_figures() -> None:
    report = estimate(job(), ROWS, load_catalog(environ={}))
    e = report.estimate
    # 40 chars / 4 = 10 tokens, + 4 for the message, + 2 for the request; n=4 in one request.
    assert (e.prompts, e.teacher_calls, e.input_tokens, e.output_tokens) == (1, 1, 16, 400)
    assert e.teacher_cost_usd == pytest.approx((16 * 0.15 + 400 * 0.60) / 1e6)
    assert e.judge_cost_usd == 0 and e.fits_budget
    # Student: 40 / 3.8 → 11 + 6 = 17 prompt tokens + 100 output; 100 steps × 4 × 2 sequences, +1/3 reference.
    tps = 60000 - (0.135 - 0.1) / 0.4 * 42000
    assert e.gpu_minutes == pytest.approx(100 * 4 * 117 * 2 * (4 / 3) / tps / 60, abs=0.006)
    b = report.breakdown
    assert b["outputTokensFrom"] == "maxTokens" and b["tokenCounting"] == "4.0 chars/token"
    assert b["priceDate"] and b["supportsN"] is True


def test_provider_without_n_pays_input_per_sample_and_measured_output() -> None:
    spec = job(teacher={"model": "anthropic/claude-sonnet-4-0"})
    e = estimate(spec, ROWS, load_catalog(environ={}), measured_output_tokens=25).estimate
    # 40 / 3.5 → 11 + 6 = 17 input tokens, four requests.
    assert (e.teacher_calls, e.input_tokens, e.output_tokens) == (4, 68, 100)
    assert e.teacher_cost_usd == pytest.approx((68 * 3 + 100 * 15) / 1e6)


def test_tokenizer_budget_llm_judge_and_num_prompts() -> None:
    class WordTokenizer:
        def encode(self, text: str) -> list[str]:
            return text.split()

    rows = [dataset.Row(id=str(i), prompt="one two three four") for i in range(10)]
    spec = job(
        dataset={"prompts": ["x"], "numPrompts": 5},
        budget={"maxTeacherCostUSD": 0.0002},
        curation={"judge": {"llm": {"rubric": "exact"}}},
    )
    report = estimate(spec, rows, load_catalog(environ={}), tokenizer=WordTokenizer())
    e = report.estimate
    assert e.prompts == 5 and e.input_tokens == 5 * (4 + 6)
    assert report.breakdown["tokenCounting"] == "tokenizer"
    assert e.judge_cost_usd > 0 and report.breakdown["judgeModel"] == "openai/gpt-4o-mini"
    assert not e.fits_budget  # 5 × 400 output tokens × $0.60/M = $0.0012 > $0.0002
    unknown = estimate(
        job(teacher={"model": "my-model", "baseURL": "http://x/v1"}), rows, load_catalog(environ={})
    )
    assert unknown.estimate.teacher_cost_usd == 0 and "price is unknown" in unknown.breakdown["priceNote"]


WORDS = [
    "ticket",
    "refund",
    "login",
    "crash",
    "invoice",
    "slow",
    "password",
    "export",
    "billing",
    "account",
    "error",
    "feature",
]


def prompt(i: int) -> str:
    digest = hashlib.sha256(str(i).encode()).digest()
    return " ".join(WORDS[b % len(WORDS)] for b in digest[: 5 + digest[0] % 20]) + "?"


def answer(p: str, sample: int, request: dict[str, Any]) -> str:
    size = 3 + (len(p) + sample) % 17
    return " ".join(WORDS[(len(p) * 7 + k + sample) % len(WORDS)] for k in range(size)) + "."


def run_generate(base: Path, prompts: list[str], spec: DistillationJobSpec) -> dict[str, Any]:
    spec = spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"prompts": prompts})})
    inv = StageInvocation(
        job=JobRef(name="j", namespace="n", uid="u"),
        spec=spec,
        stage=Stage.GENERATE,
        artifact_base=base.as_uri(),
    )
    result = generate.run(inv)
    assert result.ok, result.message
    return result.to_k8s()


def test_within_15_percent_of_a_loopback_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeTeacher(answers=answer) as teacher:
        (tmp_path / "teachers.yaml").write_text(
            f"providers:\n  acme: {{baseURL: '{teacher.base_url}', supportsN: true, charsPerToken: 4.0}}\n"
            "teachers:\n  - {id: acme/t, inputPerMTok: 3.0, outputPerMTok: 15.0, priceDate: '2026-11-01'}\n"
        )
        monkeypatch.setenv("KUBEDISTILL_CATALOG_DIR", str(tmp_path))
        spec = job(
            teacher={"model": "acme/t"},
            generation={
                "nSamples": 3,
                "maxTokens": 64,
                "systemPrompt": "Classify the ticket; answer briefly.",
            },
        )
        pilot = run_generate(tmp_path / "pilot", [prompt(i) for i in range(1000, 1030)], spec)
        measured = pilot["metrics"]["teacherOutputTokens"] / (30 * 3)
        prompts = [prompt(i) for i in range(120)]
        actual = run_generate(tmp_path / "run", prompts, spec)["metrics"]["teacherCostTotal"]

    rows = dataset.load(
        spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"prompts": prompts})}).dataset
    ).rows
    report = estimate(spec, rows, load_catalog(), measured_output_tokens=measured)
    assert report.breakdown["outputTokensFrom"] == "measured"
    assert actual > 0
    assert abs(report.estimate.teacher_cost_usd - actual) / actual <= 0.15, (report.estimate, actual)


QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart"
LABELS = ("billing", "bug", "account", "feature_request", "shipping")


def label(prompt: str, sample: int, request: dict[str, Any]) -> str:
    return LABELS[
        int(hashlib.sha256(f"{prompt}{request.get('seed')}".encode()).hexdigest(), 16) % len(LABELS)
    ]


def test_with_caching_and_batch_mode_within_15_percent_of_the_quick_start_shaped_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The quick start's job (instruction, twenty few-shot turns, 200 tickets × 3 samples) at a priced
    teacher with a batch API and a prompt cache: the estimate predicts the cached share of the input
    and the batch price, and lands within 15% of what the server's usage costs."""
    quickstart = yaml.safe_load((QUICKSTART / "job.yaml").read_text())["spec"]
    tickets = [json.loads(line) for line in (QUICKSTART / "tickets.jsonl").read_text().splitlines()]
    with FakeTeacher(answers=label, supports_n=False, cache_min_tokens=256) as teacher:
        (tmp_path / "teachers.yaml").write_text(
            f"providers:\n  acme: {{baseURL: '{teacher.base_url}', supportsN: false, batchAPI: openai,"
            " cacheMinTokens: 256}\n"
            "teachers:\n  - {id: acme/t, inputPerMTok: 3.0, cachedInputPerMTok: 0.3, outputPerMTok: 15.0,"
            " priceDate: '2026-11-01'}\n"
        )
        monkeypatch.setenv("KUBEDISTILL_CATALOG_DIR", str(tmp_path))
        spec = DistillationJobSpec.model_validate(
            quickstart
            | {"teacher": {"model": "acme/t", "mode": "batch"}, "student": {"model": "smollm2-135m"}}
        )
        pilot = run_generate(tmp_path / "pilot", [t["prompt"] for t in tickets[200:230]], spec)
        measured = pilot["metrics"]["teacherOutputTokens"] / (30 * 3)
        prompts = [t["prompt"] for t in tickets[:200]]
        teacher.cached_tokens_total = 0
        actual = run_generate(tmp_path / "run", prompts, spec)["metrics"]
        assert len(teacher.batch_api.created()) == 2  # one batch per run, nothing synchronous
        assert {c.kind for c in teacher.calls} == {"batch"}

    rows = dataset.load(
        spec.dataset.model_copy(update={"uri": None, "num_prompts": None, "prompts": prompts})
    ).rows
    report = estimate(spec, rows, load_catalog(), measured_output_tokens=measured)
    e = report.estimate
    assert (e.teacher_mode, report.breakdown["teacherMode"]) == ("batch", "batch")
    assert actual["teacherCachedInputTokens"] > 0.8 * actual["teacherInputTokens"]
    assert (
        abs(e.cached_input_tokens - actual["teacherCachedInputTokens"]) / actual["teacherCachedInputTokens"]
        <= 0.15
    )
    assert abs(e.teacher_cost_usd - actual["teacherCostTotal"]) / actual["teacherCostTotal"] <= 0.15, (
        e,
        actual,
    )
    # Without the cache and the batch price the same job costs several times as much.
    assert report.breakdown["teacherCostAtSyncPriceUSD"] > 3 * e.teacher_cost_usd
