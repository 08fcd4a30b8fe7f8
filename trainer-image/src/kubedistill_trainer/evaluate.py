"""The evaluate stage: the student answers the held-out prompts; the judge scores it beside the teacher.

In:  `<base>/curate/curated/test.jsonl` (held-out prompts; `chosen[0]` is the teacher's best
     candidate, `chosen + rejected` all its candidates), and the student: the q4_k_m GGUF of the
     export stage through llama.cpp when there is one (else another exported quantisation), else the
     merged safetensors, else base + adapter, through transformers.
Out: `<base>/evaluate/eval.jsonl`, one row per prompt: both answers, both scores with the judge's
     reasons, agreement, latency and tokens. A rerun reuses `answers.json` (the student's greedy
     answers) and, for an LLM judge, the `scores/shard-NNNNN.jsonl` written as scores arrive, so it
     never pays the judge twice for the same question and answer. Metrics evalScore and teacherEvalScore (mean judge
     score; an answer the judge could not score counts 0), retention = evalScore / teacherEvalScore.

The judge is `spec.evaluation.judge`, else the curation judge. Answers are greedy (temperature 0)
and get the teacher's token budget (`generation.maxTokens`).

`baseline(inv)` scores the untrained student on the same rows the same way (nothing written): what
local mode shows as "before".
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import re
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from kubedistill import store
from kubedistill.api.models import Artifacts, JudgeSpec, Metrics, Stage
from kubedistill.api.stage import StageInvocation, StageResult
from kubedistill.dataset import row_from_obj
from kubedistill_trainer import models, shards
from kubedistill_trainer.judges import JudgeItem, Score, judge_client, score, token_f1
from kubedistill_trainer.runtime import ProgressReporter, StageFailure
from kubedistill_trainer.speed import EngineTimings, speed_figures

log = logging.getLogger(__name__)

TEST_FILE = "curated/test.jsonl"
ANSWERS_FILE = "answers.json"
SCORE_PREFIX = "scores/shard-"
SCORE_BATCH = 64
GGUF_PREFERENCE = ("q4_k_m", "q5_k_m", "q8_0")
MAX_GGUF_CONTEXT = 8192
# Reasoning students (Qwen3) open with a think block, empty after distillation from plain answers.
_THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)


def visible_answer(text: str) -> str:
    """What the user would read: the answer without a leading think block."""
    return _THINK.sub("", text, count=1).strip()


@dataclass(frozen=True)
class Answer:
    text: str
    completion_tokens: int
    seconds: float
    error: str | None = None
    # llama.cpp's own timings of this call (speed.py); None from transformers, which has none.
    prompt_eval_tokens: int | None = None
    prompt_eval_ms: float | None = None
    decode_tokens: int | None = None
    decode_ms: float | None = None


class Student(Protocol):
    name: str

    def answer(self, messages: list[dict[str, str]], max_tokens: int) -> Answer: ...

    def close(self) -> None: ...


class GgufStudent:
    """A GGUF through llama.cpp, chatting with the template stored in the file (plain prompt if none)."""

    def __init__(self, path: Path, name: str, n_ctx: int) -> None:
        import llama_cpp

        self.name = name
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_threads=os.cpu_count() or 1, verbose=False
        )
        self.chat = bool(self.llm.metadata.get("tokenizer.chat_template"))

    def answer(self, messages: list[dict[str, str]], max_tokens: int) -> Answer:
        import llama_cpp

        # Counters from here on are this call's alone.
        llama_cpp.llama_perf_context_reset(self.llm.ctx)
        start = time.perf_counter()
        try:
            if self.chat:
                chat: Any = messages  # plain role/content dicts are what its TypedDicts describe
                out: Any = self.llm.create_chat_completion(chat, max_tokens=max_tokens, temperature=0.0)
                text = out["choices"][0]["message"]["content"] or ""
            else:
                prompt = "\n\n".join(m["content"] for m in messages) + "\n\n"
                out = self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
                text = out["choices"][0]["text"]
        except ValueError as exc:  # llama-cpp-python's "prompt exceeds context window"
            return Answer("", 0, time.perf_counter() - start, str(exc))
        seconds = time.perf_counter() - start
        perf = llama_cpp.llama_perf_context(self.llm.ctx)
        return Answer(
            visible_answer(text),
            int(out["usage"]["completion_tokens"]),
            seconds,
            prompt_eval_tokens=int(perf.n_p_eval),
            prompt_eval_ms=round(float(perf.t_p_eval_ms), 3),
            decode_tokens=int(perf.n_eval),
            decode_ms=round(float(perf.t_eval_ms), 3),
        )

    def close(self) -> None:
        self.llm.close()


class TransformersStudent:
    """A transformers model (merged, or base with the adapter merged in memory), greedy decoding."""

    def __init__(self, model: Any, tokenizer: Any, name: str) -> None:
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name

    def answer(self, messages: list[dict[str, str]], max_tokens: int) -> Answer:
        import torch

        start = time.perf_counter()
        prompt = models.render_prompt(self.tokenizer, messages)
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = ids.to(self.model.device)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new = out[0, ids.shape[1] :].tolist()
        eos = self.tokenizer.eos_token_id
        if eos in new:
            new = new[: new.index(eos)]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return Answer(visible_answer(text), len(new), time.perf_counter() - start)

    def close(self) -> None:
        pass


def open_trained_student(inv: StageInvocation, workdir: Path) -> Student:
    """The exported GGUF if any, else merged weights, else base + adapter."""
    export_uri = inv.stage_uri(Stage.EXPORT)
    n_ctx = min(inv.spec.training.max_seq_length + inv.spec.generation.max_tokens, MAX_GGUF_CONTEXT)
    for quant in GGUF_PREFERENCE:
        uri = f"{export_uri}/gguf/model-{quant}.gguf"
        if store.exists(uri):
            path = workdir / f"model-{quant}.gguf"
            store.get_file(uri, path)
            return GgufStudent(path, f"llama.cpp {quant}", n_ctx)
    if store.exists(f"{export_uri}/merged/config.json"):
        store.get_tree(f"{export_uri}/merged", workdir / "merged")
        source = models.StudentSource(str(workdir / "merged"))
        return TransformersStudent(
            models.load_causal_lm(source), models.load_tokenizer(source), "transformers merged"
        )
    adapter_uri = f"{inv.stage_uri(Stage.TRAIN)}/adapter"
    if not store.exists(f"{adapter_uri}/adapter_config.json"):
        raise StageFailure(
            "MissingInput", f"no exported model under {export_uri} and no adapter at {adapter_uri}"
        )
    from peft import PeftModel

    store.get_tree(adapter_uri, workdir / "adapter")
    source = models.resolve_student(inv.spec.student.model)
    model = PeftModel.from_pretrained(
        models.load_causal_lm(source), str(workdir / "adapter")
    ).merge_and_unload()
    return TransformersStudent(model, models.load_tokenizer(source), "transformers base+adapter")


def open_base_student(inv: StageInvocation) -> Student:
    source = models.resolve_student(inv.spec.student.model)
    return TransformersStudent(
        models.load_causal_lm(source), models.load_tokenizer(source), "transformers base"
    )


# ------------------------------------------------------------------------------------- scoring


def load_heldout(inv: StageInvocation) -> list[dict[str, Any]]:
    """The held-out rows to score, read as a stream that stops at `evaluation.maxRows`: only the
    rows scored are ever in memory."""
    uri = f"{inv.stage_uri(Stage.CURATE)}/{TEST_FILE}"
    rows = (r for r in store.iter_jsonl(uri) if r.get("chosen"))
    try:
        return list(itertools.islice(rows, inv.spec.evaluation.max_rows))
    except store.NotFound as exc:
        raise StageFailure("MissingInput", f"no held-out rows at {uri}: run curate first") from exc


def judge_of(inv: StageInvocation) -> JudgeSpec:
    return inv.spec.evaluation.judge or inv.spec.curation.judge


def _items(rows: Sequence[dict[str, Any]], answers: Sequence[str]) -> list[JudgeItem]:
    items = []
    for row, answer in zip(rows, answers, strict=True):
        parsed = row_from_obj(row)
        peers = [*row["chosen"], *row.get("rejected", [])]
        items.append(
            JudgeItem(prompt=parsed.prompt_text(), answer=answer, reference=parsed.reference, peers=peers)
        )
    return items


def _score_key(item: JudgeItem) -> str:
    """What an LLM judge sees, hashed: the same question, answer and reference are scored once."""
    return hashlib.sha256(json.dumps([item.prompt, item.answer, item.reference]).encode()).hexdigest()[:32]


async def _score_cached(
    judge: JudgeSpec, client: Any, keyed: Sequence[tuple[str, JudgeItem]], stage_uri: str | None
) -> dict[str, Score]:
    """LLM scores, reusing and extending the score shards of earlier attempts when `stage_uri` is set."""
    cached, next_index = shards.read_shards(stage_uri, SCORE_PREFIX) if stage_uri else ([], 0)
    scores = {r["key"]: Score(r["score"], r.get("reason", "")) for r in cached}
    missing = [(k, item) for k, item in dict(keyed).items() if k not in scores]
    writer = (
        shards.ShardWriter(stage_uri, next_index, prefix=SCORE_PREFIX, rows=SCORE_BATCH)
        if stage_uri
        else None
    )
    for start in range(0, len(missing), SCORE_BATCH):
        batch = missing[start : start + SCORE_BATCH]
        for (key, _), result in zip(
            batch, await score(judge, [i for _, i in batch], client=client), strict=True
        ):
            scores[key] = result
            if writer is not None:
                writer.buffer.append({"key": key, "score": result.value, "reason": result.reason})
        if writer is not None:
            await writer.flush()
    return scores


async def _score_all(
    inv: StageInvocation, groups: dict[str, list[JudgeItem]], stage_uri: str | None
) -> tuple[dict[str, list[Score]], dict[str, Any]]:
    """Scores per group (student, teacher, ...); an LLM judge's are kept in shards so a rerun pays once."""
    judge = judge_of(inv)
    async with judge_client(inv.spec, judge) as client:
        if client is None:
            return {role: await score(judge, items) for role, items in groups.items()}, {}
        keyed = [(_score_key(item), item) for items in groups.values() for item in items]
        scores = await _score_cached(judge, client, keyed, stage_uri)
        usage = {"judgeCalls": client.usage.calls, "judgeCostUSD": round(client.usage.cost_usd, 6)}
    return {role: [scores[_score_key(i)] for i in items] for role, items in groups.items()}, usage


def mean_score(scores: Sequence[Score]) -> float:
    """Mean judge score; an unscorable answer counts 0 (it is not a pass)."""
    return sum(s.value or 0.0 for s in scores) / len(scores) if scores else 0.0


def answer_all(
    student: Student,
    rows: Sequence[dict[str, Any]],
    max_tokens: int,
    progress: ProgressReporter | None = None,
) -> list[Answer]:
    answers = []
    for done, row in enumerate(rows, start=1):
        answers.append(student.answer(row_from_obj(row).student_messages(), max_tokens))
        if progress is not None:
            progress.update(done, len(rows) + 1, detail=f"{done}/{len(rows)} answered by the student")
    return answers


def timing(answers: Sequence[Answer]) -> dict[str, Any]:
    """Latency p50/p95 per answer and llama.cpp's prompt and decode rates (speed.py), answer length."""
    engine = EngineTimings()
    for a in answers:
        if a.prompt_eval_ms is not None and a.decode_ms is not None:
            engine.add(a.prompt_eval_tokens or 0, a.prompt_eval_ms, a.decode_tokens or 0, a.decode_ms)
    tokens = sum(a.completion_tokens for a in answers)
    return {
        **speed_figures("student", [a.seconds for a in answers], engine),
        "studentTokensPerCall": round(tokens / len(answers), 2),
    }


def baseline(inv: StageInvocation) -> dict[str, Any]:
    """Score the untrained student on the held-out rows like `run` does; writes nothing."""
    rows = load_heldout(inv)
    if not rows:
        return {"baselineScore": None, "rows": 0}
    student = open_base_student(inv)
    try:
        answers = answer_all(student, rows, inv.spec.generation.max_tokens)
    finally:
        student.close()
    scored, usage = asyncio.run(_score_all(inv, {"baseline": _items(rows, [a.text for a in answers])}, None))
    baseline_score = round(mean_score(scored["baseline"]), 4)
    return {"baselineScore": baseline_score, "rows": len(rows), **timing(answers), **usage}


def _read_answers(uri: str, rows: Sequence[dict[str, Any]]) -> tuple[list[Answer], str] | None:
    """A previous attempt's answers to exactly these rows: greedy decoding would only repeat them."""
    try:
        saved = store.read_json(uri)
    except store.NotFound:
        return None
    by_id = saved["answers"]
    if set(by_id) != {r["id"] for r in rows}:
        return None
    return [Answer(**by_id[r["id"]]) for r in rows], saved["student"]


def run(inv: StageInvocation) -> StageResult:
    spec = inv.spec.evaluation
    if not spec.enabled:
        return StageResult(
            stage=Stage.EVALUATE, ok=True, message="evaluation disabled", details={"skipped": True}
        )
    rows = load_heldout(inv)
    if not rows:
        return StageResult(
            stage=Stage.EVALUATE,
            ok=True,
            message="no held-out prompt with a teacher answer: nothing to evaluate (dataset.testFraction?)",
            details={"rows": 0},
        )
    stage_uri = inv.stage_uri()
    progress = ProgressReporter(stage_uri, Stage.EVALUATE)
    answers_uri = f"{stage_uri}/{ANSWERS_FILE}"
    cached = _read_answers(answers_uri, rows)
    if cached is not None:
        answers, student_name = cached
    else:
        progress.update(0, len(rows) + 1, detail="loading the student", force=True)
        with tempfile.TemporaryDirectory() as tmp:
            student = open_trained_student(inv, Path(tmp))
            student_name = student.name
            try:
                answers = answer_all(student, rows, inv.spec.generation.max_tokens, progress)
            finally:
                student.close()
        store.write_json(
            answers_uri,
            {
                "student": student_name,
                "answers": {r["id"]: asdict(a) for r, a in zip(rows, answers, strict=True)},
            },
        )
    progress.update(len(rows), len(rows) + 1, detail="judging", force=True)
    teacher_answers = [r["chosen"][0] for r in rows]
    groups = {"student": _items(rows, [a.text for a in answers]), "teacher": _items(rows, teacher_answers)}
    scored, usage = asyncio.run(_score_all(inv, groups, stage_uri))
    student_scores, teacher_scores = scored["student"], scored["teacher"]

    per_row = []
    for row, ans, teacher, s_score, t_score in zip(
        rows, answers, teacher_answers, student_scores, teacher_scores, strict=True
    ):
        per_row.append(
            {
                "id": row["id"],
                "prompt": row_from_obj(row).prompt_text(),
                "studentAnswer": ans.text,
                "teacherAnswer": teacher,
                "studentScore": s_score.value,
                "studentReason": s_score.reason,
                "teacherScore": t_score.value,
                "teacherReason": t_score.reason,
                "agreementF1": round(token_f1(ans.text, teacher), 4),
                "latencySec": round(ans.seconds, 4),
                "completionTokens": ans.completion_tokens,
                **({"error": ans.error} if ans.error else {}),
            }
        )
    eval_uri = f"{inv.stage_uri()}/eval.jsonl"
    store.write_jsonl(eval_uri, per_row)

    eval_score, teacher_score = mean_score(student_scores), mean_score(teacher_scores)
    retention = eval_score / teacher_score if teacher_score > 0 else None
    progress.update(len(rows) + 1, len(rows) + 1, detail="evaluated", force=True)
    details = {
        "rows": len(rows),
        "student": student_name,
        "answersReused": cached is not None,
        "judge": judge_of(inv).kind,
        "agreementF1": round(statistics.fmean(r["agreementF1"] for r in per_row), 4),
        "agreementExact": round(sum(r["agreementF1"] == 1.0 for r in per_row) / len(per_row), 4),
        "unscoredStudent": sum(s.value is None for s in student_scores),
        "unscoredTeacher": sum(s.value is None for s in teacher_scores),
        "answerErrors": sum(1 for a in answers if a.error),
        **timing(answers),
        **usage,
    }
    return StageResult(
        stage=Stage.EVALUATE,
        ok=True,
        message=f"student {eval_score:.3f} vs teacher {teacher_score:.3f} on {len(rows)} held-out prompts",
        metrics=Metrics(
            eval_score=round(eval_score, 4),
            teacher_eval_score=round(teacher_score, 4),
            retention=round(retention, 4) if retention is not None else None,
            student_latency_p50_sec=details["studentLatencyP50Sec"],
            student_latency_p95_sec=details["studentLatencyP95Sec"],
            student_prompt_tokens_per_second=details["studentPromptTokensPerSecond"],
            student_decode_tokens_per_second=details["studentDecodeTokensPerSecond"],
        ),
        artifacts=Artifacts(eval_uri=eval_uri),
        details=details,
    )
