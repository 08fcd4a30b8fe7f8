"""generate with `teacher.mode: batch`: `python -m kubedistill_trainer generate` against the loopback
teacher's Batch API (files, batches, output and error files)."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from data_stage_helpers import (
    KEY,
    PRICE_IN,
    PRICE_OUT,
    invocation,
    result,
    run_stage,
    shard_rows,
    spec,
    start_stage,
)

from kubedistill import store
from kubedistill.api.models import DistillationJobSpec
from kubedistill.catalog import load_catalog
from kubedistill.dataset import load
from kubedistill_testing.fake_teacher import FakeTeacher
from kubedistill_trainer.budget import worst_case_cost
from kubedistill_trainer.teacher import estimate_tokens

BATCH_FACTOR = 0.5


def catalog_env(
    directory: Path, base_url: str, *, supports_n: bool = True, batch_api: str | None = "openai"
) -> dict[str, str]:
    """Env pricing `acme/teacher-1` at `base_url`, with (or without) a batch API."""
    directory.mkdir(parents=True, exist_ok=True)
    batch = f", batchAPI: {batch_api}, batchPriceFactor: {BATCH_FACTOR}" if batch_api else ""
    (directory / "teachers.yaml").write_text(
        f"providers:\n  acme: {{baseURL: '{base_url}', supportsN: {str(supports_n).lower()}{batch}}}\n"
        f"teachers:\n  - {{id: acme/teacher-1, inputPerMTok: {PRICE_IN}, outputPerMTok: {PRICE_OUT},"
        " priceDate: '2026-11-01'}\n"
    )
    return {"KUBEDISTILL_CATALOG_DIR": str(directory), "KUBEDISTILL_TEACHER_API_KEY": KEY}


def sync_cost(tokens_in: int, tokens_out: int) -> float:
    return (tokens_in * PRICE_IN + tokens_out * PRICE_OUT) / 1e6


def seeded_answer(prompt: str, sample: int, request: dict[str, Any]) -> str:
    """Depends on the request's seed, and on the sample only within one request with n."""
    within = sample if int(request.get("n") or 1) > 1 else 0
    return f"{prompt} answered with seed {request.get('seed')} ({within})"


@pytest.fixture
def teacher(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[FakeTeacher, dict[str, str]]]:
    """A fake teacher with a batch API (FakeTeacher kwargs by indirect parametrisation)."""
    kwargs = dict(getattr(request, "param", {}))
    batch_api = kwargs.pop("catalog", "openai")  # the catalog says n works: the server may disagree
    with FakeTeacher(api_key=KEY, **kwargs) as fake:
        yield fake, catalog_env(tmp_path / "catalog", fake.base_url, batch_api=batch_api)


def batch_spec(prompts: list[str], **sections: Any) -> dict[str, Any]:
    return spec(dataset={"prompts": prompts}, **{"teacher": {"mode": "batch"}, **sections})


@pytest.mark.parametrize("supports_n", [True, False])
def test_batch_mode_gives_the_candidates_of_sync_mode_once_at_the_batch_price(
    supports_n: bool, tmp_path: Path
) -> None:
    prompts = [f"Ticket {i}: my parcel is late" for i in range(200)]
    rows = {}
    for mode in ("sync", "batch"):
        with FakeTeacher(seeded_answer, api_key=KEY, supports_n=supports_n) as fake:
            env = catalog_env(tmp_path / mode / "catalog", fake.base_url, supports_n=supports_n)
            inv = invocation(
                (tmp_path / mode / "art").as_uri(),
                spec(
                    dataset={"prompts": prompts},
                    teacher={"mode": mode},
                    generation={"nSamples": 3, "seed": 7},
                ),
            )
            run = run_stage(tmp_path / mode, inv, env)
            assert run.returncode == 0, run.output
            rows[mode] = {r["id"]: r["candidates"] for r in shard_rows(inv)}
            res = result(inv)
            tokens_in, tokens_out = fake.usage_totals()
            kinds = {c.kind for c in fake.calls}
            if mode == "batch":
                assert kinds == {"batch"} and len(fake.batch_api.created()) == 1
                paid = BATCH_FACTOR * sync_cost(tokens_in, tokens_out)
                assert res["metrics"]["teacherCostTotal"] == pytest.approx(paid)
                assert res["metrics"]["teacherSavingUSD"] == pytest.approx(paid)
                assert res["details"]["teacherMode"] == "batch"
                assert res["details"]["batches"] == [
                    {"id": "batch_000001", "status": "completed", "requests": 200 if supports_n else 600}
                    | {
                        "total": 200 if supports_n else 600,
                        "completed": 200 if supports_n else 600,
                        "failed": 0,
                    }
                ]
                assert "(batch, $" in res["message"] and "saved against sync prices" in res["message"]
            else:
                assert kinds == {"ok"} and fake.batch_api.created() == []
                assert res["metrics"]["teacherCostTotal"] == pytest.approx(sync_cost(tokens_in, tokens_out))
            assert res["metrics"]["teacherCalls"] == (200 if supports_n else 600)
            assert res["metrics"]["teacherCostTotal"] == pytest.approx(
                sum(r["costUSD"] for r in shard_rows(inv))
            )
    assert len(rows["batch"]) == 200
    assert rows["batch"] == rows["sync"]


@pytest.mark.parametrize("teacher", [dict(completion_delay=120.0)], indirect=True)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_stopped_while_the_batch_runs_resumes_polling_without_a_second_batch(
    sig: signal.Signals, teacher: tuple[FakeTeacher, dict[str, str]], tmp_path: Path
) -> None:
    fake, env = teacher
    base = (tmp_path / "art").as_uri()
    prompts = [f"question {i}" for i in range(50)]
    inv = invocation(base, batch_spec(prompts))

    proc = start_stage(tmp_path, inv, env)
    deadline = time.monotonic() + 60
    detail = ""
    while "in_progress" not in detail and time.monotonic() < deadline:
        time.sleep(0.1)
        if store.exists(f"{base}/generate/progress.json"):
            detail = store.read_json(f"{base}/generate/progress.json")["detail"]
    proc.send_signal(sig)
    proc.communicate(timeout=30)
    assert detail.startswith("Generating — 0/50 prompts answered; batch batch_000001 in_progress: "), detail
    state = store.read_json(f"{base}/generate/batch/batch-00000.json")
    assert (state["batch_id"], state["input_file_id"], state["collected"]) == (
        "batch_000001",
        "file-000001",
        False,
    )
    if sig == signal.SIGTERM:  # stops polling at once; the batch goes on at the provider
        assert proc.returncode == 1 and result(inv)["reason"] == "Interrupted"
        assert result(inv)["message"].endswith("a rerun polls the batches already submitted")
    else:
        assert not store.exists(f"{base}/generate/result.json")

    fake.batch_api.completion_delay = 0.0  # the provider finishes while no pod is running
    run = run_stage(tmp_path, inv, env)

    assert run.returncode == 0, run.output
    assert [e["op"] for e in fake.batch_api.log] == ["upload", "create_batch"]
    assert sorted(r["prompt"] for r in shard_rows(inv)) == sorted(prompts)
    assert len([c for c in fake.calls if c.kind == "batch"]) == 50
    assert store.read_json(f"{base}/generate/batch/batch-00000.json")["collected"] is True

    again = run_stage(tmp_path, inv, env)  # everything answered: nothing is submitted
    assert again.returncode == 0 and len(fake.batch_api.log) == 2


def test_a_batch_created_but_not_recorded_is_found_by_its_input_file(
    teacher: tuple[FakeTeacher, dict[str, str]], tmp_path: Path
) -> None:
    fake, env = teacher
    base = (tmp_path / "art").as_uri()
    prompts = [f"question {i}" for i in range(20)]
    inv = invocation(base, batch_spec(prompts))
    assert run_stage(tmp_path, inv, env).returncode == 0
    # As if the pod died after creating the batch, before recording its id or writing any shard.
    state_uri = f"{base}/generate/batch/batch-00000.json"
    state = store.read_json(state_uri)
    store.write_json(state_uri, state | {"batch_id": None, "status": "uploaded", "collected": False})
    store.delete_prefix(f"{base}/generate/candidates/")

    run = run_stage(tmp_path, inv, env)

    assert run.returncode == 0, run.output
    assert fake.batch_api.created() == ["batch_000001"]
    assert sorted(r["prompt"] for r in shard_rows(inv)) == sorted(prompts)
    assert store.read_json(state_uri)["batch_id"] == "batch_000001"


FAIL_ONCE = {f"question {i}": 1 for i in range(30)} | {f"question {i}": 2 for i in range(5)}


@pytest.mark.parametrize("teacher", [dict(batch_failures=FAIL_ONCE)], indirect=True)
def test_failed_requests_are_retried_in_a_follow_up_batch_then_synchronously(
    teacher: tuple[FakeTeacher, dict[str, str]], tmp_path: Path
) -> None:
    fake, env = teacher
    prompts = [f"question {i}" for i in range(60)]
    inv = invocation((tmp_path / "art").as_uri(), batch_spec(prompts))

    run = run_stage(tmp_path, inv, env)

    assert run.returncode == 0, run.output
    # 30 failed in the first batch: a second batch; 5 of them failed again: few enough to ask at once.
    assert [b["requests"] for b in fake.batch_api.log if b["op"] == "create_batch"] == [60, 30]
    assert sorted(c.prompt for c in fake.calls if c.kind == "ok") == sorted(f"question {i}" for i in range(5))
    rows = shard_rows(inv)
    assert sorted(r["prompt"] for r in rows) == sorted(prompts)
    assert all(len(r["candidates"]) == 2 for r in rows)
    res = result(inv)
    assert res["details"]["retriedSync"] == 5 and res["metrics"]["candidates"] == 120
    tokens = {kind: [c for c in fake.calls if c.kind == kind] for kind in ("batch", "ok")}
    expected = sum(
        sync_cost(c.prompt_tokens, c.completion_tokens) * (BATCH_FACTOR if kind == "batch" else 1.0)
        for kind, calls in tokens.items()
        for c in calls
    )
    assert res["metrics"]["teacherCostTotal"] == pytest.approx(expected)


@pytest.mark.parametrize("teacher", [dict(expire_batches=1, stray_results=2)], indirect=True)
def test_expired_batch_and_results_for_unknown_requests(
    teacher: tuple[FakeTeacher, dict[str, str]], tmp_path: Path
) -> None:
    fake, env = teacher
    prompts = [f"question {i}" for i in range(60)]
    inv = invocation((tmp_path / "art").as_uri(), batch_spec(prompts))

    run = run_stage(tmp_path, inv, env)

    assert run.returncode == 0, run.output
    res = result(inv)
    assert [(b["status"], b["requests"], b["completed"]) for b in res["details"]["batches"]] == [
        ("expired", 60, 30 + 2),
        ("completed", 30, 30 + 2),
    ]
    assert sorted(r["prompt"] for r in shard_rows(inv)) == sorted(prompts)
    assert res["details"]["unknownResults"] == 4
    assert "4 batch results for unknown requests ignored" in res["message"]
    # Stray lines are billed by the provider: their usage is counted, not their answers.
    batch_calls = [c for c in fake.calls if c.kind == "batch"]
    assert res["metrics"]["teacherCalls"] == len(batch_calls) + 4


@pytest.mark.parametrize("teacher", [dict(supports_n=False)], indirect=True)
def test_requests_the_provider_refuses_fail_the_stage_with_its_reason(
    teacher: tuple[FakeTeacher, dict[str, str]], tmp_path: Path
) -> None:
    fake, env = teacher  # the catalog says n is supported; this server refuses n > 1
    inv = invocation((tmp_path / "art").as_uri(), batch_spec([f"q{i}" for i in range(10)]))

    run = run_stage(tmp_path, inv, env)

    assert run.returncode == 1
    assert run.termination is not None and run.termination["reason"] == "TeacherRejected"
    assert "refused 10 requests of batch batch_000001" in run.termination["message"]
    assert "n > 1 is not supported" in run.termination["message"]
    assert len(fake.batch_api.created()) == 1


def test_budget_splits_the_job_into_batches_and_is_never_overspent(
    teacher: tuple[FakeTeacher, dict[str, str]], tmp_path: Path
) -> None:
    fake, env = teacher
    prompts = [f"budget question {i}" for i in range(60)]
    job = batch_spec(prompts)
    catalog = load_catalog(environ=env)
    teacher_model = catalog.resolve_teacher("acme/teacher-1")
    parsed = DistillationJobSpec.model_validate(job)
    gen = parsed.generation
    longest = max(
        estimate_tokens(
            r.teacher_messages(gen.system_prompt, gen.few_shot_turns()), teacher_model.chars_per_token
        )
        for r in load(parsed.dataset).rows
    )
    worst = worst_case_cost(teacher_model, longest, gen) * BATCH_FACTOR
    budget = 20.5 * worst
    job["budget"] = {"maxTeacherCostUSD": budget}
    inv = invocation((tmp_path / "art").as_uri(), job)

    run = run_stage(tmp_path, inv, env)

    sizes = [b["requests"] for b in fake.batch_api.log if b["op"] == "create_batch"]
    assert sizes[0] == 20 and len(sizes) >= 2  # split: each batch sized to what is left
    res = result(inv)
    spent = res["metrics"]["teacherCostTotal"]
    assert spent <= budget
    assert spent == pytest.approx(BATCH_FACTOR * sync_cost(*fake.usage_totals()))
    assert len(shard_rows(inv)) == res["details"]["answered"] == sum(sizes)
    if run.returncode:
        assert run.termination is not None and run.termination["reason"] == "BudgetExceeded"
    else:
        assert sum(sizes) == 60

    too_small = invocation(
        (tmp_path / "small").as_uri(), {**job, "budget": {"maxTeacherCostUSD": 0.5 * worst}}
    )
    created = len(fake.batch_api.created())
    small = run_stage(tmp_path, too_small, env)
    assert small.returncode == 1 and small.termination is not None
    assert small.termination["reason"] == "BudgetExceeded"
    assert len(fake.batch_api.created()) == created and result(too_small)["metrics"]["teacherCostTotal"] == 0


@pytest.mark.parametrize(("prompts", "mode"), [(100, "batch"), (99, "sync")])
def test_auto_mode_uses_the_batch_api_from_100_requests_on(
    prompts: int, mode: str, teacher: tuple[FakeTeacher, dict[str, str]], tmp_path: Path
) -> None:
    fake, env = teacher
    inv = invocation(
        (tmp_path / "art").as_uri(), batch_spec([f"q{i}" for i in range(prompts)], teacher={"mode": "auto"})
    )

    run = run_stage(tmp_path, inv, env)

    assert run.returncode == 0, run.output
    assert result(inv)["details"]["teacherMode"] == mode
    assert len(fake.batch_api.created()) == (mode == "batch")


def test_batch_mode_for_a_provider_without_a_batch_api_is_refused(tmp_path: Path) -> None:
    with FakeTeacher(api_key=KEY) as fake:
        env = catalog_env(tmp_path / "catalog", fake.base_url, batch_api=None)
        inv = invocation((tmp_path / "art").as_uri(), batch_spec(["a", "b"]))
        run = run_stage(tmp_path, inv, env)
        assert fake.calls == [] and fake.batch_api.log == []
    assert run.returncode == 1 and run.termination is not None
    assert run.termination["reason"] == "BatchUnsupported"
    assert (
        "teacher.mode batch: the catalog lists no batch API for acme/teacher-1" in run.termination["message"]
    )
    assert json.dumps(run.termination).count(KEY) == 0


def test_anthropic_message_batches_give_the_candidates_of_sync_mode_at_the_batch_price(
    tmp_path: Path,
) -> None:
    prompts = [f"Ticket {i}: refund please" for i in range(40)]
    rows = {}
    for mode in ("sync", "batch"):
        with FakeTeacher(api_key=KEY, supports_n=False) as fake:
            env = catalog_env(
                tmp_path / mode / "catalog", fake.base_url, supports_n=False, batch_api="anthropic"
            )
            inv = invocation((tmp_path / mode / "art").as_uri(), batch_spec(prompts, teacher={"mode": mode}))
            run = run_stage(tmp_path / mode, inv, env)
            assert run.returncode == 0, run.output
            # Anthropic has no seed: the samples of a prompt are the same, in whichever order they came.
            rows[mode] = {r["id"]: sorted(r["candidates"]) for r in shard_rows(inv)}
            metrics = result(inv)["metrics"]
            factor = BATCH_FACTOR if mode == "batch" else 1.0
            assert metrics["teacherCostTotal"] == pytest.approx(factor * sync_cost(*fake.usage_totals()))
            assert metrics["teacherCalls"] == 80
        if mode == "batch":
            assert fake.batch_api.created() == ["msgbatch_000001"] and {c.kind for c in fake.calls} == {
                "batch"
            }
    assert rows["batch"] == rows["sync"] and len(rows["batch"]) == 40


@pytest.mark.parametrize(
    "teacher",
    [
        dict(
            supports_n=False, batch_failures={"q1": 1}, expire_batches=1, stray_results=1, catalog="anthropic"
        )
    ],
    indirect=True,
)
def test_anthropic_errored_and_expired_requests_are_retried_and_strays_counted(
    teacher: tuple[FakeTeacher, dict[str, str]], tmp_path: Path
) -> None:
    _, env = teacher
    prompts = [f"q{i}" for i in range(30)]
    inv = invocation((tmp_path / "art").as_uri(), batch_spec(prompts))

    run = run_stage(tmp_path, inv, env)

    assert run.returncode == 0, run.output
    res = result(inv)
    # 60 requests; the first batch expires after 30 (one of them errored): 31 retried in a second batch.
    assert [(b["id"], b["status"], b["requests"]) for b in res["details"]["batches"]] == [
        ("msgbatch_000001", "ended", 60),
        ("msgbatch_000002", "ended", 31),
    ]
    assert sorted(r["prompt"] for r in shard_rows(inv)) == sorted(prompts)
    assert res["details"]["unknownResults"] == 2 and res["metrics"]["candidates"] == 60
