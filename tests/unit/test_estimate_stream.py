"""The streamed estimate (estimate stage, `kubedistill estimate -f`): the same figures as the in-memory
one, the same invalid-row rule, bounded sampling with its margin, and the stage program itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubedistill import dataset, estimating
from kubedistill.api.models import DistillationJobSpec, Stage
from kubedistill.api.stage import JobRef, StageInvocation
from kubedistill.catalog import load_catalog
from kubedistill.domain.estimate import Counters, SampledTally, estimate
from kubedistill_trainer import estimate as estimate_stage
from kubedistill_trainer.runtime import execute


def job(uri: str, **sections: Any) -> DistillationJobSpec:
    doc: dict[str, Any] = {
        "teacher": {"model": "openai/gpt-4o-mini"},
        "student": {"model": "smollm2-135m"},
        "dataset": {"uri": uri},
        "generation": {"nSamples": 4, "maxTokens": 100},
        "curation": {"judge": {"llm": {"rubric": "short and right"}}},
    }
    doc.update(sections)
    return DistillationJobSpec.model_validate(doc)


class WordTokenizer:
    """A tokenizer that costs something to call: one token per word."""

    def encode(self, text: str) -> list[str]:
        return text.split()


def words(i: int) -> str:
    return " ".join(["word"] * (3 + i % 17))


def write(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path.as_uri()


def test_streamed_figures_equal_the_in_memory_ones(tmp_path: Path) -> None:
    lines = [json.dumps({"id": str(i), "prompt": words(i), "reference": "ok"}) for i in range(300)]
    lines[10] = "{not json"
    lines[20] = json.dumps({"id": "5", "prompt": "a duplicate id"})
    lines[30] = ""
    uri = write(tmp_path / "d.jsonl", lines)
    spec = job(uri, dataset={"uri": uri, "numPrompts": 250})
    catalog = load_catalog(environ={})
    streamed, counts = estimating.estimate_dataset(spec, catalog)
    in_memory = estimate(spec, dataset.load(spec.dataset).rows, catalog)
    assert streamed.estimate == in_memory.estimate
    assert streamed.estimate.prompts == 250 and streamed.estimate.judge_cost_usd > 0
    assert (counts.valid, counts.rejected) == (297, 2)
    assert streamed.breakdown["counting"] == {
        "mode": "exact",
        "rows": 250,
        "rowsCounted": 250,
        "inputTokensMargin95": 0.0,
    }
    # The first bad line is named by number and reason; the line itself is not kept.
    assert counts.first_rejected is not None and counts.first_rejected.line == 11
    assert counts.first_rejected.raw == ""


@pytest.mark.parametrize(("bad_every", "fails"), [(20, False), (2, False), (3, True)])
def test_the_invalid_share_rule_is_the_generate_stages(tmp_path: Path, bad_every: int, fails: bool) -> None:
    """5% bad lines are counted and skipped; past half the job is refused with the same message as
    `dataset.check_invalid_share` gives on the whole file."""
    lines = [
        "garbage"
        if i % bad_every == 0 or (fails and i % bad_every == 1)
        else json.dumps({"prompt": f"p {i}"})
        for i in range(400)
    ]
    spec = job(write(tmp_path / "d.jsonl", lines))
    parsed = dataset.parse_lines(lines)
    if fails:
        with pytest.raises(dataset.DatasetInvalid) as streamed:
            estimating.estimate_dataset(spec, load_catalog(environ={}))
        with pytest.raises(dataset.DatasetInvalid) as whole:
            dataset.check_invalid_share(parsed)
        assert str(streamed.value) == str(whole.value) and "line 1: not valid JSON" in str(streamed.value)
        return
    report, counts = estimating.estimate_dataset(spec, load_catalog(environ={}))
    assert counts.rejected == len(parsed.rejected) == 400 // bad_every
    assert report.breakdown["datasetRows"] == {"valid": 400 - counts.rejected, "invalid": counts.rejected}


def test_a_missing_or_non_utf8_dataset_is_named(tmp_path: Path) -> None:
    with pytest.raises(dataset.DatasetInvalid, match="does not exist"):
        estimating.estimate_dataset(job((tmp_path / "none.jsonl").as_uri()), load_catalog(environ={}))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(dataset.DatasetInvalid, match=r"is not UTF-8 text \(line 2\)"):
        estimating.estimate_dataset(job((tmp_path / "latin1.jsonl").as_uri()), load_catalog(environ={}))


def test_a_sample_stands_for_the_rows_it_was_drawn_from() -> None:
    """Past `exact_rows`, a seeded uniform sample: the total lands within its own 95% margin of the
    exact count, the margin is reported, and the same rows give the same figure."""
    spec = job("file:///unused.jsonl")
    counters = Counters(spec, load_catalog(environ={}), WordTokenizer())
    rows = [dataset.Row(id=str(i), prompt=words(i * 7919)) for i in range(20_000)]
    exact = SampledTally(counters, exact_rows=None)
    sampled = SampledTally(counters, exact_rows=1000, sample_rows=500)
    again = SampledTally(counters, exact_rows=1000, sample_rows=500)
    for row in rows:
        exact.add(row)
        sampled.add(row)
        again.add(row)
    truth, guess = exact.result(), sampled.result()
    assert truth.exact and truth.counted == 20_000 and truth.teacher_margin95 == 0
    assert not guess.exact and guess.counted == 1500 and guess.rows == 20_000
    assert 0 < guess.teacher_margin95 < 0.05 * guess.teacher
    assert abs(guess.teacher - truth.teacher) <= guess.teacher_margin95
    assert again.result() == guess
    # Never more rows held than the sample: bounded memory whatever the row count.
    assert len(sampled._sample) == 500


def test_with_a_tokenizer_a_large_dataset_is_sampled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(estimating, "EXACT_ROWS_WITH_TOKENIZER", 100)
    monkeypatch.setattr(estimating, "SAMPLE_ROWS", 50)
    lines = [json.dumps({"id": i, "prompt": words(i)}) for i in range(1000)]
    spec = job(write(tmp_path / "d.jsonl", lines))
    report, _ = estimating.estimate_dataset(spec, load_catalog(environ={}), tokenizer=WordTokenizer())
    counting = report.breakdown["counting"]
    assert counting["mode"] == "sample" and counting["rowsCounted"] == 150 and counting["rows"] == 1000
    assert 0 < counting["inputTokensMargin95"] < 0.2
    assert report.breakdown["tokenCounting"] == "tokenizer"


def test_seen_ids_find_duplicates_across_merges() -> None:
    seen = dataset.SeenIds(batch=8, chunk=5)
    assert all(seen.add(f"id-{i}") for i in range(100))
    assert not any(seen.add(f"id-{i}") for i in (0, 7, 8, 63, 99))
    assert "id-42" in seen and "id-100" not in seen
    assert len(seen) == 100 and seen.add("id-100")
    assert len(seen._chunks) == 20  # 96 merged hashes in chunks of 5, 5 more still recent


def test_the_stage_reports_the_estimate_and_its_progress(tmp_path: Path) -> None:
    lines = [json.dumps({"id": i, "prompt": words(i)}) for i in range(50)] + ["{broken"]
    spec = job(write(tmp_path / "d.jsonl", lines), budget={"maxTeacherCostUSD": 0.000001})
    inv = StageInvocation(
        job=JobRef(name="j", namespace="n", uid="u"),
        spec=spec,
        stage=Stage.ESTIMATE,
        artifact_base=(tmp_path / "art").as_uri(),
    )
    result = execute(estimate_stage.run, inv)
    assert result.ok, result.message
    assert result.estimate is not None and result.estimate.prompts == 50
    # The stage reports; the operator decides about the budget (BudgetExceeded), never the stage.
    assert result.estimate.fits_budget is False
    assert "50 prompts" in result.message and "1 invalid rows skipped" in result.message
    assert json.loads(result.termination_message())["estimate"]["prompts"] == 50
    progress = json.loads((tmp_path / "art" / "estimate" / "progress.json").read_text())
    assert progress["done"] == progress["total"] == 100 and "51 rows read" in progress["detail"]


def test_the_stage_fails_with_the_datasets_reason(tmp_path: Path) -> None:
    inv = StageInvocation(
        job=JobRef(name="j", namespace="n", uid="u"),
        spec=job(write(tmp_path / "d.jsonl", ["nope", "nope"])),
        stage=Stage.ESTIMATE,
        artifact_base=(tmp_path / "art").as_uri(),
    )
    result = execute(estimate_stage.run, inv)
    assert not result.ok and result.reason == "DatasetInvalid"
    assert "no valid rows (2 invalid; first: line 1" in result.message


def test_a_local_student_directory_gives_its_tokenizer(tmp_path: Path) -> None:
    assert estimate_stage.local_model_dir("qwen3-0.6b") is None
    assert estimate_stage.local_model_dir(tmp_path.as_uri()) is None
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert estimate_stage.local_model_dir(tmp_path.as_uri()) == tmp_path
    assert estimate_stage.local_model_dir("s3://models/student") is None


def test_the_light_tokenizer_counts_as_transformers_does() -> None:
    """The estimate stage counts without importing transformers (and torch): same template text,
    same token ids as transformers' own tokenizer of the same directory."""
    from transformers import AutoTokenizer

    from kubedistill.local.tiny_model import tiny_llama

    directory = tiny_llama()
    light, full = estimate_stage.LightTokenizer(directory), AutoTokenizer.from_pretrained(str(directory))
    assert isinstance(estimate_stage.local_tokenizer(directory.as_uri()), estimate_stage.LightTokenizer)
    conversation = [
        {"role": "system", "content": "Answer with one label."},
        {"role": "user", "content": "Example"},
        {"role": "assistant", "content": "billing"},
        {"role": "user", "content": "Café crashed — ünïcode ✓\n\nsince the update"},
    ]
    rendered = light.apply_chat_template(conversation, add_generation_prompt=True)
    assert rendered == full.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert light.encode(rendered, add_special_tokens=False) == full.encode(rendered, add_special_tokens=False)
    assert light.encode("plain text") == full.encode("plain text")
