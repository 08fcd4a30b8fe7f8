"""Sharded generate: three `python -m kubedistill_trainer generate` pods (JOB_COMPLETION_INDEX 0..2, as
an Indexed Job runs them) against one loopback teacher failing 20% of requests; one pod is killed
mid-way and rerun alone. The fake teacher's call log proves the rerun asked nothing already kept,
and curate reads every pod's candidates."""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from data_stage_helpers import KEY, invocation, priced_catalog, run_stage, spec, start_stage

from kubedistill import store
from kubedistill.api.stage import StageResult, part_uri
from kubedistill.dataset import shard_of, text_id
from kubedistill.domain.parts import merge_results
from kubedistill_testing.fake_teacher import FakeTeacher

SHARDS = 3
# Enough that a pod cannot answer all of its ~80 before its first shard (1 s) is seen and it is killed.
PROMPTS = [f"sharded question {i}" for i in range(240)]


@pytest.fixture
def teacher(tmp_path: Path) -> Iterator[tuple[FakeTeacher, dict[str, str]]]:
    with FakeTeacher(
        api_key=KEY, latency=0.05, fail_rate=0.2, failures=("429", "500", "timeout"), hang_seconds=2.0
    ) as fake:
        catalog = priced_catalog(tmp_path / "catalog", fake.base_url)
        yield fake, {"KUBEDISTILL_CATALOG_DIR": str(catalog), "KUBEDISTILL_TEACHER_API_KEY": KEY}


def _pod_env(env: dict[str, str], index: int) -> dict[str, str]:
    return {**env, "JOB_COMPLETION_INDEX": str(index)}


def _part_rows(base: str, index: int) -> list[dict[str, Any]]:
    uris = store.list_uris(f"{base}/generate/candidates/part-{index:04d}/")
    return [row for uri in uris for row in store.read_jsonl(uri)]


def _part_result(base: str, index: int) -> StageResult:
    return StageResult.model_validate(store.read_json(f"{part_uri(base + '/generate', index)}/result.json"))


def test_three_shards_with_failures_and_a_killed_pod_answer_every_prompt_once(
    teacher: tuple[FakeTeacher, dict[str, str]], tmp_path: Path
) -> None:
    fake, env = teacher
    base = (tmp_path / "art").as_uri()
    inv = invocation(
        base,
        spec(
            dataset={"prompts": PROMPTS},
            teacher={"maxConcurrency": 6, "timeoutSeconds": 0.5},
            generation={"nSamples": 3, "shards": SHARDS},
        ),
    )
    for i in range(SHARDS):
        (tmp_path / f"pod-{i}").mkdir()
    pods = {i: start_stage(tmp_path / f"pod-{i}", inv, _pod_env(env, i)) for i in range(SHARDS)}

    # Pod 1 dies once it has kept some answers (SIGKILL: nothing flushed on the way out).
    deadline = time.monotonic() + 60
    while not _part_rows(base, 1):
        assert time.monotonic() < deadline and pods[1].poll() is None, "pod 1 kept nothing"
        time.sleep(0.02)
    pods[1].send_signal(signal.SIGKILL)
    pods[1].communicate()
    for i in (0, 2):
        _, err = pods[i].communicate(timeout=120)
        assert pods[i].returncode == 0, err[-3000:]
    kept = {row["prompt"] for row in _part_rows(base, 1)}
    assert not store.exists(f"{part_uri(base + '/generate', 1)}/result.json"), (
        "pod 1 finished before the kill"
    )
    owned_by_1 = {p for p in PROMPTS if shard_of(text_id(p), SHARDS) == 1}
    assert 0 < len(kept) < len(owned_by_1)
    calls_before = len(fake.calls)

    rerun = run_stage(tmp_path / "pod-1", inv, _pod_env(env, 1))

    assert rerun.returncode == 0, rerun.output
    asked_again = {c.prompt for c in fake.calls[calls_before:]}
    assert asked_again and not kept & asked_again, "the rerun asked the teacher again for a kept answer"
    assert asked_again <= owned_by_1
    # Every prompt kept exactly once, by the pod that owns it, with nSamples answers.
    for i in range(SHARDS):
        assert all(shard_of(row["id"], SHARDS) == i for row in _part_rows(base, i))
    rows = [row for i in range(SHARDS) for row in _part_rows(base, i)]
    assert Counter(row["prompt"] for row in rows) == Counter(PROMPTS)
    assert all(len(row["candidates"]) == 3 for row in rows)
    assert {"429", "500", "timeout"} <= {c.kind for c in fake.calls}

    # The parts add up to the whole, cost counted once (the rerun's result covers its earlier answers).
    parts = [_part_result(base, i) for i in range(SHARDS)]
    assert all(p.ok and p.details["shards"] == SHARDS for p in parts)
    assert sum(p.details["prompts"] for p in parts) == len(PROMPTS)
    merged = merge_results(parts)
    assert merged.ok
    assert merged.metrics.teacher_calls == len(PROMPTS)
    assert merged.metrics.candidates == 3 * len(PROMPTS)
    assert merged.metrics.teacher_cost_total == pytest.approx(sum(r["costUSD"] for r in rows))
    assert _part_result(base, 1).details["answeredThisAttempt"] == len(owned_by_1) - len(kept)

    # Curate reads every pod's candidates.
    curate_inv = {**inv, "stage": "curate"}
    curated = run_stage(tmp_path, curate_inv, env)
    assert curated.returncode == 0, curated.output
    kept_rows = [
        *store.read_jsonl(f"{base}/curate/curated/train.jsonl"),
        *store.read_jsonl(f"{base}/curate/curated/test.jsonl"),
    ]
    assert sorted(r["prompt"] for r in kept_rows) == sorted(PROMPTS)


def test_more_shards_than_prompts_is_refused(
    teacher: tuple[FakeTeacher, dict[str, str]], tmp_path: Path
) -> None:
    _, env = teacher
    base = (tmp_path / "art").as_uri()
    store.write_jsonl(f"{base}/data.jsonl", [{"id": f"r{i}", "prompt": f"p{i}"} for i in range(2)])
    # A dataset URI: admission cannot count its prompts, so the stage must.
    inv = invocation(base, spec(dataset={"uri": f"{base}/data.jsonl"}, generation={"shards": SHARDS}))
    run = run_stage(tmp_path, inv, _pod_env(env, 0))
    assert run.returncode == 1
    assert run.termination is not None and run.termination["reason"] == "TooManyShards"
    assert "spec.generation.shards (3) exceeds the 2 prompts" in run.termination["message"]


def test_a_sharded_pod_without_its_index_fails_clearly(
    teacher: tuple[FakeTeacher, dict[str, str]], tmp_path: Path
) -> None:
    _, env = teacher
    inv = invocation(
        (tmp_path / "art").as_uri(), spec(dataset={"prompts": PROMPTS}, generation={"shards": 2})
    )
    run = run_stage(tmp_path, inv, env)
    assert run.returncode == 1 and run.termination is not None
    assert run.termination["reason"] == "InvalidInvocation" and "Indexed Job" in run.termination["message"]
