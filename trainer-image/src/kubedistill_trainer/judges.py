"""Judges: score answers in [0, 1]. Used by curate (teacher candidates) and evaluate (student answers).

    from kubedistill_trainer.judges import JudgeItem, score, judge_client
    items = [JudgeItem(prompt="2+2?", answer="4", reference="4", peers=["4", "4", "5"])]
    async with judge_client(job_spec, judge_spec) as client:   # None-safe: a no-op for non-LLM judges
        scores = await score(judge_spec, items, client=client)  # list[Score], same order as items

`Score.value` is None when the judge could not score the item (an LLM reply that stayed unparsable
after the retries, a judge request that failed, a reference judge on a row without reference);
`Score.reason` says why. Callers count those separately and treat them as failing. `Score.final` is
False only for a judge request that failed after its retries: asking again later may succeed.

The four judges (`JudgeSpec` has exactly one):
- `llm`: the judge model (through `TeacherClient`, same retries, rate limits and cost accounting)
  gets the question, the answer, the rubric and the reference when present, and must reply with JSON
  `{"score": 0..1, "reason": "..."}`. Parsing is tolerant (code fences, prose around the object,
  0-10 or 0-100 scales, `score: 0.7` without JSON); an unparsable reply is asked again, up to
  `attempts` times in all.
- `jsonSchema`: 1 when the answer (code fences stripped) parses as JSON and validates, else 0.
- `reference`: token F1 between normalised answer and `item.reference` (1.0 on normalised exact match).
- `majority`: token F1 between the answer and the modal normalised answer among `item.peers`. In
  curate the peers are the prompt's N candidates (the answer itself included); at evaluation the
  peers are the teacher's candidates for the prompt, so the student is scored against the
  teacher's modal answer.

Normalisation (SQuAD-style): lower case, punctuation and the articles a/an/the removed, whitespace
collapsed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import jsonschema

from kubedistill.api.models import DistillationJobSpec, JudgeSpec
from kubedistill.api.stage import JUDGE_API_KEY_ENV, TEACHER_API_KEY_ENV
from kubedistill.catalog import Catalog, load_catalog
from kubedistill_trainer.teacher import (
    TeacherAborted,
    TeacherAuthFailed,
    TeacherClient,
    TeacherError,
    TeacherRejected,
)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_FENCE = re.compile(r"^\s*```[\w-]*\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)
_LOOSE_SCORE = re.compile(r"score\W{0,4}(\d+(?:\.\d+)?)\s*(?:/\s*(\d+))?", re.IGNORECASE)


@dataclass(frozen=True)
class JudgeItem:
    prompt: str
    answer: str
    reference: str | None = None
    peers: Sequence[str] = ()


@dataclass(frozen=True)
class Score:
    value: float | None
    reason: str = ""
    # False when the judge could not be asked (retries exhausted): worth asking again later,
    # unlike a reply that stayed unparsable.
    final: bool = True

    @property
    def passed(self) -> bool:
        return self.value is not None and self.value > 0.0


# ------------------------------------------------------------------------------- text helpers


def normalize(text: str) -> str:
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(answer: str, target: str) -> float:
    a, b = normalize(answer).split(), normalize(target).split()
    if not a or not b:
        return float(a == b)
    common = sum((Counter(a) & Counter(b)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def modal_answer(answers: Sequence[str]) -> str | None:
    """The most common normalised answer; ties go to the one seen first."""
    normalised = [normalize(a) for a in answers]
    if not normalised:
        return None
    counts = Counter(normalised)
    return max(normalised, key=lambda a: (counts[a], -normalised.index(a)))


def strip_fences(text: str) -> str:
    match = _FENCE.match(text)
    return match.group(1) if match else text.strip()


def first_json_value(text: str) -> Any:
    """The first JSON object or array in `text` (prose around it ignored); ValueError if none."""
    text = strip_fences(text)
    try:
        return json.loads(text)
    except ValueError:
        pass
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                return decoder.raw_decode(text, i)[0]
            except ValueError:
                continue
    raise ValueError("no JSON value found")


def _unit(value: float, scale: float | None = None) -> float | None:
    if scale:
        value = value / scale
    elif 1.0 < value <= 10.0:
        value = value / 10.0
    elif 10.0 < value <= 100.0:
        value = value / 100.0
    return value if 0.0 <= value <= 1.0 else None


def parse_judge_reply(text: str) -> tuple[float, str] | None:
    """(score in [0, 1], reason) from an LLM judge's reply, or None when it cannot be read."""
    try:
        obj = first_json_value(text)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        raw = next((obj[k] for k in ("score", "Score", "rating", "grade") if k in obj), None)
        try:
            value = _unit(float(raw)) if raw is not None and not isinstance(raw, bool) else None
        except (TypeError, ValueError):
            value = None
        if value is not None:
            return value, str(obj.get("reason", obj.get("explanation", "")))[:500]
    match = _LOOSE_SCORE.search(text)
    if match:
        value = _unit(float(match.group(1)), float(match.group(2)) if match.group(2) else None)
        if value is not None:
            return value, text.strip()[:500]
    return None


# ------------------------------------------------------------------------------------ judges


def score_reference(item: JudgeItem) -> Score:
    if item.reference is None:
        return Score(None, "row has no reference")
    value = token_f1(item.answer, item.reference)
    return Score(value, "exact match" if value == 1.0 else f"token F1 {value:.2f}")


def score_majority(item: JudgeItem) -> Score:
    mode = modal_answer(item.peers)
    if mode is None:
        return Score(None, "no peer answers")
    value = token_f1(item.answer, mode)
    return Score(value, "modal answer" if value == 1.0 else f"token F1 {value:.2f} with the modal answer")


def score_json_schema(item: JudgeItem, schema: dict[str, Any]) -> Score:
    try:
        value = first_json_value(item.answer)
    except ValueError:
        return Score(0.0, "answer is not JSON")
    validator_cls = jsonschema.validators.validator_for(schema)
    error = jsonschema.exceptions.best_match(validator_cls(schema).iter_errors(value))
    if error is not None:
        return Score(0.0, f"schema violation: {error.message[:300]}")
    return Score(1.0, "valid")


JUDGE_SYSTEM = (
    "You are a strict, fair grader. Score how well the ANSWER responds to the QUESTION"
    "{rubric_hint}{reference_hint}. Reply with only a JSON object: "
    '{{"score": <number from 0 to 1>, "reason": "<one short sentence>"}}.'
)


def judge_messages(item: JudgeItem, rubric: str | None) -> list[dict[str, str]]:
    system = JUDGE_SYSTEM.format(
        rubric_hint=", following the RUBRIC" if rubric else "",
        reference_hint=", using the REFERENCE answer as ground truth" if item.reference else "",
    )
    parts = [f"QUESTION:\n{item.prompt}", f"ANSWER:\n{item.answer}"]
    if rubric:
        parts.append(f"RUBRIC:\n{rubric}")
    if item.reference:
        parts.append(f"REFERENCE:\n{item.reference}")
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]


async def score_llm(item: JudgeItem, client: TeacherClient, rubric: str | None, attempts: int = 3) -> Score:
    messages = judge_messages(item, rubric)
    for attempt in range(attempts):
        try:
            completion = await client.complete(
                messages, n=1, temperature=0.0 if attempt == 0 else 0.5, max_tokens=256
            )
        except (TeacherAuthFailed, TeacherRejected, TeacherAborted):
            raise
        except TeacherError as exc:
            return Score(None, f"judge unavailable: {exc}", final=False)
        parsed = parse_judge_reply(completion.texts[0] if completion.texts else "")
        if parsed is not None:
            return Score(*parsed)
    return Score(None, f"unparsable judge reply after {attempts} attempts")


async def score(
    judge: JudgeSpec, items: Sequence[JudgeItem], *, client: TeacherClient | None = None
) -> list[Score]:
    """One Score per item, in order. An `llm` judge needs `client` (see `judge_client`)."""
    kind = judge.kind
    if kind == "reference":
        return [score_reference(i) for i in items]
    if kind == "majority":
        return [score_majority(i) for i in items]
    if kind == "json_schema":
        assert judge.json_schema is not None
        return [score_json_schema(i, judge.json_schema.json_schema) for i in items]
    if client is None:
        raise ValueError("the llm judge needs a client")
    assert judge.llm is not None
    rubric = judge.llm.rubric
    return list(await asyncio.gather(*(score_llm(i, client, rubric) for i in items)))


def judge_client(
    spec: DistillationJobSpec,
    judge: JudgeSpec,
    catalog: Catalog | None = None,
    environ: dict[str, str] | None = None,
) -> AbstractAsyncContextManager[TeacherClient | None]:
    """The client for an `llm` judge (an async context manager), or a no-op one for the others.

    Model, base URL and key default to the teacher's; the key comes from env
    KUBEDISTILL_JUDGE_API_KEY, else KUBEDISTILL_TEACHER_API_KEY.
    """
    if judge.llm is None:
        return nullcontext(None)
    env = os.environ if environ is None else environ
    catalog = catalog or load_catalog()
    llm = judge.llm
    model = llm.model or spec.teacher.model
    resolved = catalog.resolve_teacher(model, llm.base_url)
    if resolved.base_url is None:
        resolved = resolved.model_copy(update={"base_url": spec.teacher.base_url})
    key = env.get(JUDGE_API_KEY_ENV) or env.get(TEACHER_API_KEY_ENV) or None
    return TeacherClient(
        resolved,
        api_key=key,
        max_concurrency=spec.teacher.max_concurrency,
        requests_per_minute=spec.teacher.requests_per_minute,
        tokens_per_minute=spec.teacher.tokens_per_minute,
        timeout=spec.teacher.timeout_seconds,
    )
