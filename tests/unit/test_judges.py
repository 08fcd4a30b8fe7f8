"""Judges: text normalisation, each judge kind, tolerant LLM reply parsing, the LLM judge over loopback."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from kubedistill.api.models import DistillationJobSpec, JudgeSpec
from kubedistill_testing.fake_teacher import FakeTeacher
from kubedistill_trainer.curate import prompt_text
from kubedistill_trainer.judges import (
    JudgeItem,
    judge_client,
    modal_answer,
    normalize,
    parse_judge_reply,
    score,
    token_f1,
)


def run(judge: dict[str, Any], items: list[JudgeItem]) -> list[Any]:
    return asyncio.run(score(JudgeSpec.model_validate(judge), items))


def test_normalize_and_token_f1() -> None:
    assert normalize("  The Answer, is: 42!  ") == "answer is 42"
    assert token_f1("The cat sat.", "a cat sat") == 1.0
    assert token_f1("cat sat on mat", "cat sat") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0


def test_modal_answer_breaks_ties_by_first_seen() -> None:
    assert modal_answer(["Billing.", "bug", "billing", "Bug!"]) == "billing"
    assert modal_answer(["x", "y", "y"]) == "y"
    assert modal_answer([]) is None


def test_reference_judge() -> None:
    scores = run(
        {"reference": {}},
        [
            JudgeItem("q", "The Billing", reference="billing"),
            JudgeItem("q", "billing issue", reference="billing"),
            JudgeItem("q", "bug", reference="billing"),
            JudgeItem("q", "bug"),
        ],
    )
    assert [s.value for s in scores] == [1.0, pytest.approx(2 / 3), 0.0, None]
    assert scores[0].reason == "exact match" and scores[3].reason == "row has no reference"
    assert [s.passed for s in scores] == [True, True, False, False]


def test_majority_judge_scores_against_the_modal_peer() -> None:
    peers = ["billing", "Billing.", "bug", "billing account"]
    scores = run({"majority": {}}, [JudgeItem("q", p, peers=peers) for p in peers])
    assert [s.value for s in scores] == [1.0, 1.0, 0.0, pytest.approx(2 / 3)]
    assert run({"majority": {}}, [JudgeItem("q", "x")])[0].value is None


def test_json_schema_judge() -> None:
    schema = {
        "type": "object",
        "properties": {"label": {"enum": ["billing", "bug"]}},
        "required": ["label"],
    }
    scores = run(
        {"jsonSchema": {"schema": schema}},
        [
            JudgeItem("q", '{"label": "bug"}'),
            JudgeItem("q", '```json\n{"label": "billing"}\n```'),
            JudgeItem("q", '{"label": "other"}'),
            JudgeItem("q", "label: bug"),
        ],
    )
    assert [s.value for s in scores] == [1.0, 1.0, 0.0, 0.0]
    assert "schema violation" in scores[2].reason and scores[3].reason == "answer is not JSON"


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"score": 0.8, "reason": "good"}', (0.8, "good")),
        ('```json\n{"score": 1, "reason": "exact"}\n```', (1.0, "exact")),
        ('Sure! Here is my grade: {"score": "0.25", "reason": "partly"} Hope it helps.', (0.25, "partly")),
        ('{"score": 7, "reason": "out of ten"}', (0.7, "out of ten")),
        ('{"rating": 85}', (0.85, "")),
        ("Score: 0.6 because it is mostly right", (0.6, "Score: 0.6 because it is mostly right")),
        ("score = 3/5", (0.6, "score = 3/5")),
    ],
)
def test_llm_reply_parsing_is_tolerant(reply: str, expected: tuple[float, str]) -> None:
    parsed = parse_judge_reply(reply)
    assert parsed is not None
    assert parsed[0] == pytest.approx(expected[0]) and parsed[1] == expected[1]


@pytest.mark.parametrize(
    "reply", ["I cannot grade this.", '{"score": "high"}', '{"score": 250}', "", "[1, 2]"]
)
def test_unparsable_llm_replies(reply: str) -> None:
    assert parse_judge_reply(reply) is None


def test_llm_judge_over_loopback_with_retries_and_unparsable() -> None:
    asked: dict[str, int] = {}

    def judge_reply(prompt: str, sample: int, request: dict[str, Any]) -> str:
        answer = prompt.split("ANSWER:\n", 1)[1].split("\n\n", 1)[0]
        asked[answer] = asked.get(answer, 0) + 1
        if answer == "good":
            return json.dumps({"score": 0.9, "reason": "correct"})
        if answer == "flaky":  # unreadable once, then fine
            return "hmm" if asked[answer] == 1 else '{"score": 0.4, "reason": "meh"}'
        return "I refuse to use JSON."

    with FakeTeacher(answers=judge_reply) as judge_server:
        spec = DistillationJobSpec.model_validate(
            {
                "teacher": {"model": "judge-model", "baseURL": judge_server.base_url},
                "student": {"model": "smollm2-135m"},
                "dataset": {"prompts": ["x"]},
                "curation": {"judge": {"llm": {"rubric": "Be exact."}}},
            }
        )
        judge = spec.curation.judge

        async def go() -> list[Any]:
            async with judge_client(spec, judge, environ={}) as client:
                items = [JudgeItem("2+2?", a, reference="4") for a in ("good", "flaky", "garbage")]
                return await score(judge, items, client=client)

        scores = asyncio.run(go())
        first = judge_server.calls[0].messages
    assert [s.value for s in scores] == [0.9, 0.4, None]
    assert scores[2].reason == "unparsable judge reply after 3 attempts"
    assert asked == {"good": 1, "flaky": 2, "garbage": 3}
    assert "RUBRIC:\nBe exact." in first[1]["content"] and "REFERENCE:\n4" in first[1]["content"]
    assert "JSON object" in first[0]["content"]


def test_llm_judge_needs_a_client() -> None:
    with pytest.raises(ValueError, match="needs a client"):
        run({"llm": {}}, [JudgeItem("q", "a")])


def test_curate_shows_the_judge_the_whole_conversation() -> None:
    assert prompt_text({"prompt": "2+2?"}) == "2+2?"
    single = {"messages": [{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"}]}
    assert prompt_text(single) == "hi"
    turns = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert prompt_text({"messages": turns}) == "USER: a\nASSISTANT: b\nUSER: c"
