"""generate end to end: `python -m kubedistill_trainer generate` against the loopback teacher, with a
real S3 server (rclone) or file:// artifacts."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from data_stage_helpers import (
    KEY,
    PRICE_IN,
    PRICE_OUT,
    assert_secret_absent,
    invocation,
    priced_catalog,
    result,
    run_stage,
    shard_rows,
    spec,
    start_stage,
)

from kubedistill import store
from kubedistill_testing.fake_teacher import FakeTeacher, count_tokens, prompt_tokens
from kubedistill_testing.s3 import RcloneS3, free_port


def cost(tokens_in: int, tokens_out: int) -> float:
    return (tokens_in * PRICE_IN + tokens_out * PRICE_OUT) / 1e6


@pytest.fixture(scope="module")
def s3() -> Iterator[RcloneS3]:
    with RcloneS3() as server:
        server.create_bucket("artifacts")
        yield server


@pytest.fixture
def teacher(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[FakeTeacher, dict[str, str]]]:
    """A fake teacher (kwargs by indirect parametrisation) and the env that prices it via the catalog."""
    with FakeTeacher(api_key=KEY, **getattr(request, "param", {})) as fake:
        catalog = priced_catalog(tmp_path / "catalog", fake.base_url)
        yield fake, {"KUBEDISTILL_CATALOG_DIR": str(catalog), "KUBEDISTILL_TEACHER_API_KEY": KEY}


def test_end_to_end_on_s3_with_invalid_rows(
    s3: RcloneS3, teacher: tuple[FakeTeacher, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, env = teacher
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    rows = [
        json.dumps({"id": f"r{i}", "prompt": f"Question {i}: why?", "reference": "because"})
        for i in range(30)
    ]
    rows += ["{oops", json.dumps({"id": "r0", "prompt": "dup"}), json.dumps({"id": "x", "messages": []})]
    store.write_text("s3://artifacts/data/prompts.jsonl", "\n".join(rows))
    base = "s3://artifacts/runs/e2e"
    inv = invocation(base, spec(dataset={"uri": "s3://artifacts/data/prompts.jsonl", "testFraction": 0.2}))

    run = run_stage(tmp_path, inv, {**env, **s3.env()})

    assert run.returncode == 0, run.output
    res = result(inv)
    assert run.termination == {k: v for k, v in res.items() if k != "details"} | {"details": {}}
    assert res["ok"] and "3 invalid dataset rows skipped" in res["message"]
    tokens_in, tokens_out = fake.usage_totals()
    # Per-request latency as the stage saw it; this server reports no llama.cpp timings, so no rates.
    p50, p95 = res["metrics"].pop("teacherLatencyP50Sec"), res["metrics"].pop("teacherLatencyP95Sec")
    assert 0 < p50 <= p95 and res["details"]["teacherTimedRequests"] == 0
    assert res["metrics"] == {
        "teacherCalls": 30,
        "teacherInputTokens": tokens_in,
        "teacherOutputTokens": tokens_out,
        "teacherCostTotal": pytest.approx(cost(tokens_in, tokens_out)),
        "candidates": 60,
    }
    assert res["artifacts"] == {
        "datasetURI": f"{base}/generate/dataset/",
        "candidatesURI": f"{base}/generate/candidates/",
    }
    train = store.read_jsonl(f"{base}/generate/dataset/train.jsonl")
    test = store.read_jsonl(f"{base}/generate/dataset/test.jsonl")
    assert len(train) + len(test) == 30 and 0 < len(test) < 15
    rejected = store.read_jsonl(f"{base}/generate/dataset/rejected.jsonl")
    assert [(r["line"], r["reason"].split(" (")[0]) for r in rejected] == [
        (31, "not valid JSON"),
        (32, "duplicate id 'r0'"),
        (33, "messages must be a non-empty list"),
    ]
    candidates = shard_rows(inv)
    assert sorted(r["id"] for r in candidates) == sorted(f"r{i}" for i in range(30))
    test_ids = {r["id"] for r in test}
    assert all(r["split"] == ("test" if r["id"] in test_ids else "train") for r in candidates)
    assert all(len(r["candidates"]) == 2 and r["reference"] == "because" for r in candidates)
    progress = store.read_json(f"{base}/generate/progress.json")
    assert (progress["done"], progress["total"]) == (30, 30)
    assert progress["costUSD"] == pytest.approx(cost(tokens_in, tokens_out))
    assert_secret_absent(KEY, [run.output, json.dumps(run.termination)], base)


@pytest.mark.parametrize("teacher", [dict(latency=0.05)], indirect=True)
def test_killed_halfway_rerun_never_asks_an_answered_prompt_again(
    teacher: tuple[FakeTeacher, dict[str, str]], tmp_path: Path
) -> None:
    fake, env = teacher
    base = (tmp_path / "art").as_uri()
    prompts = [f"prompt number {i}" for i in range(300)]
    inv = invocation(base, spec(dataset={"prompts": prompts}, teacher={"maxConcurrency": 2}))

    proc = start_stage(tmp_path, inv, env)
    deadline = time.monotonic() + 60
    while not store.list_uris(f"{base}/generate/candidates/") and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not store.exists(f"{base}/generate/result.json"), "the stage finished before it was killed"
    kept = {r["prompt"] for r in shard_rows(inv)}
    calls_before = len(fake.calls)
    assert 0 < len(kept) < 300

    run = run_stage(tmp_path, inv, env)

    assert run.returncode == 0, run.output
    asked_again = [c.prompt for c in fake.calls[calls_before:]]
    assert not kept & set(asked_again)
    rows = shard_rows(inv)
    assert sorted(r["prompt"] for r in rows) == sorted(prompts)  # each prompt kept exactly once
    res = result(inv)
    assert res["details"]["answeredThisAttempt"] == 300 - len(kept)
    assert res["metrics"]["teacherCalls"] == sum(r["usage"]["calls"] for r in rows) == 300
    assert res["metrics"]["teacherCostTotal"] == pytest.approx(sum(r["costUSD"] for r in rows))


@pytest.mark.parametrize(
    "teacher", [dict(fail_rate=0.2, failures=("429", "500", "timeout"), hang_seconds=3.0)], indirect=True
)
def test_twenty_percent_failures_still_produce_everything_and_cost_once(
    teacher: tuple[FakeTeacher, dict[str, str]], tmp_path: Path
) -> None:
    fake, env = teacher
    base = (tmp_path / "art").as_uri()
    prompts = [f"q{i}" for i in range(60)]
    inv = invocation(
        base, spec(dataset={"prompts": prompts}, teacher={"timeoutSeconds": 0.5}, generation={"nSamples": 3})
    )

    run = run_stage(tmp_path, inv, env)

    assert run.returncode == 0, run.output
    assert {"429", "500", "timeout"} <= {c.kind for c in fake.calls}
    failed = [c for c in fake.calls if c.status != 200]
    assert len(failed) >= 5
    res = result(inv)
    tokens_in, tokens_out = fake.usage_totals()
    assert res["metrics"]["teacherCalls"] == len(fake.ok_calls()) == 60
    assert (res["metrics"]["teacherInputTokens"], res["metrics"]["teacherOutputTokens"]) == (
        tokens_in,
        tokens_out,
    )
    assert res["metrics"]["teacherCostTotal"] == pytest.approx(cost(tokens_in, tokens_out))
    assert res["metrics"]["candidates"] == 180
    rows = shard_rows(inv)
    assert sorted(r["prompt"] for r in rows) == sorted(prompts)
    assert all(len(r["candidates"]) == 3 for r in rows)
    assert sum(res["details"]["retries"].values()) == len(failed)


@pytest.mark.parametrize("teacher", [dict(latency=0.01)], indirect=True)
def test_budget_stop_keeps_answers_and_a_higher_budget_resumes(
    teacher: tuple[FakeTeacher, dict[str, str]], tmp_path: Path
) -> None:
    fake, env = teacher
    base = (tmp_path / "art").as_uri()
    prompts = [f"budget question {i}" for i in range(60)]
    per_prompt = [
        cost(
            prompt_tokens([{"role": "user", "content": p}]),
            sum(count_tokens(f"Answer {s} to: {p}") for s in range(2)),
        )
        for p in prompts
    ]
    budget = 0.4 * sum(per_prompt)
    inv = invocation(
        base,
        spec(
            dataset={"prompts": prompts}, teacher={"maxConcurrency": 4}, budget={"maxTeacherCostUSD": budget}
        ),
    )

    run = run_stage(tmp_path, inv, env)

    assert run.returncode == 1
    assert run.termination is not None and run.termination["reason"] == "BudgetExceeded"
    assert "raise budget.maxTeacherCostUSD and rerun" in run.termination["message"]
    res = result(inv)
    spent = res["metrics"]["teacherCostTotal"]
    assert spent <= budget
    kept = shard_rows(inv)
    # In-flight reservations (two prompts per slot) leave some budget unspent, never an overspend.
    assert 5 <= len(kept) < 60 and res["details"]["answered"] == len(kept)
    assert spent == pytest.approx(cost(*fake.usage_totals()))

    # The same budget again: at most what in-flight reservations left unused, never over the budget.
    again = run_stage(tmp_path, inv, env)
    assert again.returncode == 1 and again.termination is not None
    assert again.termination["reason"] == "BudgetExceeded"
    assert result(inv)["metrics"]["teacherCostTotal"] <= budget
    kept = shard_rows(inv)
    calls = len(fake.calls)

    inv["spec"]["budget"]["maxTeacherCostUSD"] = 2 * sum(per_prompt)
    final = run_stage(tmp_path, inv, env)
    assert final.returncode == 0, final.output
    assert len(fake.calls) - calls == 60 - len(kept)
    assert sorted(c.prompt for c in fake.calls) == sorted(prompts)  # nobody asked twice
    assert result(inv)["metrics"]["teacherCostTotal"] == pytest.approx(sum(per_prompt))


def test_mostly_invalid_dataset_fails_with_a_clear_reason(
    teacher: tuple[FakeTeacher, dict[str, str]], tmp_path: Path
) -> None:
    fake, env = teacher
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join([json.dumps({"id": "a", "prompt": "ok"}), "nope", "{}", "[]"]))
    base = (tmp_path / "art").as_uri()
    inv = invocation(base, spec(dataset={"uri": data.as_uri()}))

    run = run_stage(tmp_path, inv, env)

    assert run.returncode == 1
    assert run.termination is not None and run.termination["reason"] == "DatasetInvalid"
    assert "3 of 4 dataset rows are invalid (75% > 50% allowed); first: line 2" in run.termination["message"]
    assert fake.calls == []
    assert result(inv)["reason"] == "DatasetInvalid"


def test_unreachable_store_is_reported_without_secrets(
    s3: RcloneS3, teacher: tuple[FakeTeacher, dict[str, str]], tmp_path: Path
) -> None:
    _, env = teacher
    port = free_port()
    inv = invocation("s3://artifacts/runs/unreachable", spec(dataset={"prompts": ["a", "b"]}))

    run = run_stage(tmp_path, inv, {**env, **s3.env(), "KUBEDISTILL_S3_ENDPOINT": f"http://127.0.0.1:{port}"})

    assert run.returncode == 1
    assert run.termination is not None and run.termination["reason"] == "StoreUnreachable"
    assert f"127.0.0.1:{port}" in run.termination["message"]
    for secret in (KEY, s3.secret_key, s3.access_key):
        assert secret not in run.output and secret not in json.dumps(run.termination)


def test_wrong_teacher_key_fails_fast_and_is_never_printed(
    teacher: tuple[FakeTeacher, dict[str, str]], tmp_path: Path
) -> None:
    fake, env = teacher
    wrong = "sk-wrong-1234567890abcdefghij"
    base = (tmp_path / "art").as_uri()
    inv = invocation(base, spec(dataset={"prompts": [f"p{i}" for i in range(20)]}))

    run = run_stage(tmp_path, inv, {**env, "KUBEDISTILL_TEACHER_API_KEY": wrong})

    assert run.returncode == 1
    assert run.termination is not None and run.termination["reason"] == "TeacherAuthFailed"
    assert "refused the API key (HTTP 401)" in run.termination["message"]
    assert len(fake.calls) <= 8  # the in-flight ones, not a retry storm
    assert_secret_absent(wrong, [run.output, json.dumps(run.termination)], base)


@pytest.mark.parametrize("teacher", [{"latency": 0.2}], indirect=True)
def test_sigterm_keeps_every_paid_answer(teacher: tuple[FakeTeacher, dict[str, str]], tmp_path: Path) -> None:
    fake, env = teacher
    base = (tmp_path / "art").as_uri()
    inv = invocation(
        base, spec(dataset={"prompts": [f"p{i}" for i in range(400)]}, teacher={"maxConcurrency": 8})
    )

    proc = start_stage(tmp_path, inv, env)
    deadline = time.monotonic() + 60
    while len(fake.ok_calls()) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)

    assert proc.returncode == 1
    res = result(inv)
    assert res["reason"] == "Interrupted" and "a rerun asks only the missing ones" in res["message"]
    kept = sorted(r["prompt"] for r in shard_rows(inv))
    assert kept == sorted(c.prompt for c in fake.ok_calls())  # every answer paid for was written
    assert 20 <= len(kept) < 400


@pytest.mark.parametrize(
    "teacher", [{"fail_prompts": {"q3", "q7", "q11"}, "retry_after": 0.01}], indirect=True
)
def test_prompts_failing_after_retries_are_left_for_the_next_attempt(
    teacher: tuple[FakeTeacher, dict[str, str]], tmp_path: Path
) -> None:
    fake, env = teacher
    base = (tmp_path / "art").as_uri()
    prompts = [f"q{i}" for i in range(30)]
    inv = invocation(base, spec(dataset={"prompts": prompts}))

    run = run_stage(tmp_path, inv, env)

    assert run.returncode == 1 and run.termination is not None
    assert run.termination["reason"] == "TeacherUnavailable"
    assert "3 prompts failed after retries; 27/30 answered and kept" in run.termination["message"]
    assert sorted(r["prompt"] for r in shard_rows(inv)) == sorted(set(prompts) - fake.fail_prompts)
    assert sum(1 for c in fake.calls if c.prompt == "q3") == 9  # the first try and 8 retries

    fake.fail_prompts.clear()
    calls = len(fake.calls)
    final = run_stage(tmp_path, inv, env)
    assert final.returncode == 0, final.output
    assert sorted(c.prompt for c in fake.calls[calls:]) == ["q11", "q3", "q7"]


@pytest.mark.parametrize(
    "teacher", [{"fail_prompts": {f"q{i}" for i in range(100)}, "retry_after": 0.01}], indirect=True
)
def test_a_teacher_that_always_fails_stops_the_stage_early(
    teacher: tuple[FakeTeacher, dict[str, str]], tmp_path: Path
) -> None:
    fake, env = teacher
    inv = invocation((tmp_path / "art").as_uri(), spec(dataset={"prompts": [f"q{i}" for i in range(100)]}))

    run = run_stage(tmp_path, inv, env)

    assert run.returncode == 1 and run.termination is not None
    assert run.termination["reason"] == "TeacherUnavailable"
    assert "16 prompts in a row failed" in run.termination["message"]
    # The prompts already started (two per slot) end at their next attempt; nothing new starts.
    assert len({c.prompt for c in fake.calls}) <= 16 + 2 * 8
