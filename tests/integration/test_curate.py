"""curate end to end for each judge, on candidates produced by a real generate run (loopback teacher)."""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from data_stage_helpers import KEY, invocation, priced_catalog, result, run_stage, spec, start_stage

from kubedistill import store
from kubedistill_testing.fake_teacher import FakeTeacher
from kubedistill_trainer.judges import JudgeItem, judge_messages

LABELS = ["billing", "bug", "account", "feature"]
N_PROMPTS = 16


def label_of(i: int) -> str:
    return LABELS[i % 4]


def answers_for(i: int) -> list[str]:
    """Four teacher samples: JSON, the bare label, the label in a sentence, a wrong label.
    Every fifth prompt gets four wrong answers, which reference and jsonSchema judges reject."""
    label, wrong = label_of(i), label_of(i + 1)
    if i % 5 == 4:
        return ["no idea", "maybe later", "maybe later", wrong]
    return [json.dumps({"label": label}), label, f"The {label}.", wrong]


PROMPTS = {f"Ticket {i}: please help with my {label_of(i)} problem": answers_for(i) for i in range(N_PROMPTS)}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One generate run (4 samples per prompt) whose artifacts each test copies."""
    tmp = tmp_path_factory.mktemp("generated")
    rows = [{"id": f"t{i}", "prompt": prompt, "reference": label_of(i)} for i, prompt in enumerate(PROMPTS)]
    (tmp / "tickets.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with FakeTeacher(answers=PROMPTS, api_key=KEY) as teacher:
        catalog = priced_catalog(tmp / "catalog", teacher.base_url)
        inv = invocation(
            (tmp / "art").as_uri(),
            spec(
                dataset={"uri": (tmp / "tickets.jsonl").as_uri(), "testFraction": 0.3},
                generation={"nSamples": 4},
            ),
        )
        run = run_stage(
            tmp, inv, {"KUBEDISTILL_CATALOG_DIR": str(catalog), "KUBEDISTILL_TEACHER_API_KEY": KEY}
        )
        assert run.returncode == 0, run.output
    yield tmp / "art"


def curate(
    tmp_path: Path,
    generated: Path,
    judge: dict[str, Any],
    env: dict[str, str] | None = None,
    top_k: int = 2,
    **teacher: Any,
) -> tuple[Any, dict[str, Any]]:
    base = tmp_path / "art"
    if not base.exists():
        shutil.copytree(generated, base)
    job = spec(curation={"judge": judge, "topK": top_k}, generation={"nSamples": 4})
    job["teacher"].update(teacher)
    inv = invocation(base.as_uri(), job, stage="curate")
    return run_stage(tmp_path, inv, env), inv


def curated(inv: dict[str, Any], split: str = "train") -> dict[str, dict[str, Any]]:
    rows = store.read_jsonl(f"{inv['artifactBase']}/curate/curated/{split}.jsonl")
    return {r["id"]: r for r in rows}


def all_curated_ids(inv: dict[str, Any]) -> set[str]:
    return set(curated(inv, "train")) | set(curated(inv, "test"))


def test_reference_judge(generated: Path, tmp_path: Path) -> None:
    run, inv = curate(tmp_path, generated, {"reference": {}})
    assert run.returncode == 0, run.output
    kept = all_curated_ids(inv)
    assert kept == {f"t{i}" for i in range(N_PROMPTS) if i % 5 != 4}
    row = curated(inv, "train").get("t0") or curated(inv, "test")["t0"]
    assert row["chosen"] == ["billing", "The billing."]
    assert row["rejected"] == ['{"label": "billing"}', "bug"]
    assert row["scores"] == [pytest.approx(2 / 3), 1.0, 1.0, 0.0]
    assert row["reference"] == "billing" and row["prompt"].startswith("Ticket 0")
    res = result(inv)
    assert res["details"]["droppedPrompts"] == 3
    assert res["metrics"]["curated"] == 2 * len(curated(inv, "train"))
    assert res["artifacts"]["curatedURI"] == f"{inv['artifactBase']}/curate/curated/"
    hist = {k: v for k, v in res["details"]["histogram"].items() if v}
    # 13 prompts score [2/3, 1, 1, 0]; the 3 all-wrong prompts score 0 four times.
    assert hist == {"0.0-0.1": 13 + 12, "0.6-0.7": 13, "0.9-1.0": 26}
    assert all(r["split"] == "test" for r in curated(inv, "test").values())


def test_majority_judge_keeps_every_prompt(generated: Path, tmp_path: Path) -> None:
    run, inv = curate(tmp_path, generated, {"majority": {}}, top_k=1)
    assert run.returncode == 0, run.output
    assert all_curated_ids(inv) == {f"t{i}" for i in range(N_PROMPTS)}
    rows = curated(inv, "train") | curated(inv, "test")
    assert rows["t1"]["chosen"] == ["bug"] and len(rows["t1"]["rejected"]) == 3
    assert rows["t4"]["chosen"] == ["maybe later"]  # the modal answer, right or wrong


def test_json_schema_judge(generated: Path, tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"label": {"enum": LABELS}}, "required": ["label"]}
    run, inv = curate(tmp_path, generated, {"jsonSchema": {"schema": schema}})
    assert run.returncode == 0, run.output
    rows = curated(inv, "train") | curated(inv, "test")
    assert set(rows) == {f"t{i}" for i in range(N_PROMPTS) if i % 5 != 4}
    assert rows["t2"]["chosen"] == ['{"label": "account"}']  # top 2 asked, one passes
    assert rows["t2"]["scores"] == [1.0, 0.0, 0.0, 0.0]


def test_nothing_passing_fails_the_stage(generated: Path, tmp_path: Path) -> None:
    schema = {"type": "array"}
    run, inv = curate(tmp_path, generated, {"jsonSchema": {"schema": schema}})
    assert run.returncode == 1
    assert run.termination is not None and run.termination["reason"] == "NothingCurated"
    assert "nothing to train on" in run.termination["message"]
    assert curated(inv) == {}


def test_llm_judge_with_unparsable_replies_and_resume(generated: Path, tmp_path: Path) -> None:
    def judge(prompt: str, sample: int, request: dict[str, Any]) -> str:
        answer = prompt.split("ANSWER:\n", 1)[1].split("\n\nRUBRIC:", 1)[0]
        reference = prompt.rsplit("REFERENCE:\n", 1)[1]
        if answer.startswith("The "):
            return "I would rather not say."  # never parsable: counted, not chosen
        score = 1.0 if answer == reference else 0.6 if reference in answer else 0.0
        return f'Grade: {{"score": {score}, "reason": "compared with the reference"}}'

    with FakeTeacher(answers=judge, api_key="judge-key-0123456789") as server:
        env = {"KUBEDISTILL_JUDGE_API_KEY": "judge-key-0123456789", "KUBEDISTILL_TEACHER_API_KEY": KEY}
        llm = {"llm": {"model": "judge-1", "baseURL": server.base_url, "rubric": "The label must be exact."}}
        run, inv = curate(tmp_path, generated, llm, env, baseURL=server.base_url)
        assert run.returncode == 0, run.output
        calls = len(server.calls)
        unparsable = sum(1 for a in (x for v in PROMPTS.values() for x in v) if a.startswith("The "))
        # Each unparsable candidate was asked three times; every other candidate once.
        assert calls == 4 * N_PROMPTS + 2 * unparsable
        res = result(inv)
        assert res["details"]["unparsable"] == unparsable
        assert res["details"]["judgeCalls"] == calls
        assert "judge replies unparsable" in res["message"]
        rows = curated(inv, "train") | curated(inv, "test")
        assert rows["t0"]["chosen"] == ["billing", '{"label": "billing"}']
        assert rows["t0"]["scores"] == [0.6, 1.0, None, 0.0]
        assert "t4" not in rows

        rerun, _ = curate(tmp_path, generated, llm, env, baseURL=server.base_url)
        assert rerun.returncode == 0, rerun.output
        assert len(server.calls) == calls  # the score shards were reused: the judge is not paid twice
        assert "judge-key-0123456789" not in run.output + rerun.output


def test_llm_judge_sigterm_keeps_paid_scores(generated: Path, tmp_path: Path) -> None:
    def judge(prompt: str, sample: int, request: dict[str, Any]) -> str:
        return '{"score": 0.5, "reason": "fine"}'

    with FakeTeacher(answers=judge, latency=0.25) as server:
        shutil.copytree(generated, tmp_path / "art")
        job = spec(
            curation={"judge": {"llm": {"baseURL": server.base_url}}, "topK": 2}, generation={"nSamples": 4}
        )
        job["teacher"].update(baseURL=server.base_url, maxConcurrency=4)
        inv = invocation((tmp_path / "art").as_uri(), job, stage="curate")
        proc = start_stage(tmp_path, inv, {"KUBEDISTILL_TEACHER_API_KEY": KEY})
        deadline = time.monotonic() + 60
        while len(server.ok_calls()) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert proc.returncode == 1
        assert result(inv)["reason"] == "Interrupted"
        written = [
            r for u in store.list_uris(f"{inv['artifactBase']}/curate/scores/") for r in store.read_jsonl(u)
        ]
        assert len(written) == len(server.ok_calls()) < 4 * N_PROMPTS  # every paid score kept

        rerun = run_stage(tmp_path, inv, {"KUBEDISTILL_TEACHER_API_KEY": KEY})
        assert rerun.returncode == 0, rerun.output
        assert len(server.ok_calls()) == 4 * N_PROMPTS  # each candidate judged exactly once overall


def test_llm_judge_with_a_wrong_key_fails_fast(generated: Path, tmp_path: Path) -> None:
    with FakeTeacher(api_key="the-right-judge-key-123") as server:
        llm = {"llm": {"baseURL": server.base_url}}
        run, _ = curate(tmp_path, generated, llm, {"KUBEDISTILL_JUDGE_API_KEY": "a-wrong-judge-key-456"})
        assert run.returncode == 1 and run.termination is not None
        assert run.termination["reason"] == "TeacherAuthFailed"
        assert len(server.calls) <= 8  # the requests already sent, nothing after the first refusal
        assert "a-wrong-judge-key-456" not in run.output + json.dumps(run.termination)


def test_unreachable_judge_calls_are_retried_by_the_next_attempt(generated: Path, tmp_path: Path) -> None:
    prompt = next(iter(PROMPTS))
    failing = {
        judge_messages(JudgeItem(prompt, answer, reference="billing"), None)[1]["content"]
        for answer in PROMPTS[prompt]
    }

    def judge(prompt: str, sample: int, request: dict[str, Any]) -> str:
        return '{"score": 1, "reason": "ok"}'

    with FakeTeacher(answers=judge, fail_prompts=failing, retry_after=0.01) as server:
        llm = {"llm": {"baseURL": server.base_url}}
        run, inv = curate(tmp_path, generated, llm, baseURL=server.base_url)
        assert run.returncode == 1 and run.termination is not None
        assert run.termination["reason"] == "TeacherUnavailable"
        assert f"4 of {4 * N_PROMPTS} candidates could not be judged" in run.termination["message"]

        server.fail_prompts.clear()
        calls = len(server.calls)
        rerun, _ = curate(tmp_path, generated, llm, baseURL=server.base_url)
        assert rerun.returncode == 0, rerun.output
        assert sorted(c.prompt for c in server.calls[calls:]) == sorted(failing)
        assert "t0" in curated(inv, "train") | curated(inv, "test")
