"""curate in buckets: every prompt is curated once, in whichever bucket its id hashes to, with the first
of its rows when a retried prompt appears in two shards, and no more than a bucket in memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubedistill import store
from kubedistill.api.models import DistillationJobSpec, Stage
from kubedistill.api.stage import JobRef, StageInvocation
from kubedistill_trainer import curate


def invocation(base: Path) -> StageInvocation:
    spec = DistillationJobSpec.model_validate(
        {
            "teacher": {"model": "openai/gpt-4o-mini"},
            "student": {"model": "qwen3-0.6b"},
            "dataset": {"prompts": ["x"]},
            "generation": {"nSamples": 3},
            "curation": {"judge": {"majority": {}}, "topK": 1},
        }
    )
    return StageInvocation(
        job=JobRef(name="j", namespace="n", uid="u"),
        spec=spec,
        stage=Stage.CURATE,
        artifact_base=base.as_uri(),
    )


def candidate(i: int, answer: str) -> dict[str, Any]:
    return {
        "id": f"p{i}",
        "split": "test" if i % 10 == 0 else "train",
        "prompt": f"question {i}",
        "candidates": [answer, answer, "other"],
    }


def test_buckets_curate_every_prompt_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(curate, "BUCKET_ROWS", 40)
    shards = tmp_path / "generate" / "candidates"
    shards.mkdir(parents=True)
    for shard in range(6):
        rows = [candidate(i, f"first {i}") for i in range(shard * 50, shard * 50 + 50)]
        (shards / f"shard-{shard:05d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # A retried prompt in a later shard: the first answer kept wins, as when reading all at once.
    (shards / "shard-00006.jsonl").write_text(json.dumps(candidate(7, "second 7")) + "\n")

    result = curate.run(invocation(tmp_path))
    assert result.ok, result.message
    assert result.details["buckets"] == 18  # ceil(7 shards × 100 rows / 40)
    assert result.details["prompts"] == 300 and result.details["droppedPrompts"] == 0
    rows = {
        r["id"]: r
        for split in ("train", "test")
        for r in store.read_jsonl((tmp_path / "curate" / "curated" / f"{split}.jsonl").as_uri())
    }
    assert len(rows) == 300 and rows["p7"]["chosen"] == ["first 7"]
    assert sum(r["split"] == "test" for r in rows.values()) == result.details["testPrompts"] == 30
    assert result.metrics.curated == 270
    # Each candidate scored once: the retried prompt's second row is not judged.
    assert sum(result.details["histogram"].values()) == 900
    progress = json.loads((tmp_path / "curate" / "progress.json").read_text())
    assert progress["done"] == progress["total"] == 3 * 301


def test_every_row_of_a_prompt_lands_in_one_bucket() -> None:
    assert {curate.bucket_of("p7", 8) for _ in range(3)} == {curate.bucket_of("p7", 8)}
    spread = {curate.bucket_of(f"p{i}", 8) for i in range(200)}
    assert spread == set(range(8))
