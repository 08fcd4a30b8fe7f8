"""curate: judge every teacher candidate, keep the best `topK` per prompt as chosen, the rest as rejected.

Reads the generate stage's candidate shards; writes below `<artifactBase>/curate/`:
- `curated/train.jsonl` — train-split prompts that kept at least one passing candidate:
  `{id, split, prompt|messages, system?, reference?, chosen: [text...], rejected: [text...],
  scores: [score or null per candidate, in candidate order], chosenScores: [...]}`; chosen is best
  first. Train reads it (chosen = y⁺, rejected = y⁻).
- `curated/test.jsonl` — the same for held-out prompts: evaluate takes `chosen[0]` as the teacher's
  best answer.
- `scores/shard-NNNNN.jsonl` (llm judge only) — `{id, index, score, reason}` as they arrive, so a
  rerun does not pay the judge twice; SIGTERM/SIGINT lets the calls in flight finish and be written,
  then fails the stage with Interrupted.

A candidate passes when its score is > 0; a prompt whose candidates all fail (or are unparsable)
is dropped. `details.histogram` counts scores in ten bins over [0, 1] plus `unparsable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from typing import Any

from kubedistill import store
from kubedistill.api.models import Artifacts, JudgeSpec, Metrics, Stage
from kubedistill.api.stage import StageInvocation, StageResult
from kubedistill_trainer import generate
from kubedistill_trainer.judges import JudgeItem, Score, judge_client, score
from kubedistill_trainer.runtime import ProgressReporter, StageFailure, run_async
from kubedistill_trainer.teacher import TeacherAborted, TeacherAuthFailed, TeacherClient, TeacherRejected

log = logging.getLogger(__name__)

SCORE_PREFIX = "scores/shard-"
BINS = 10


def prompt_text(row: dict[str, Any]) -> str:
    """What an LLM judge is shown as the question: the prompt, or the whole conversation so far."""
    if "messages" not in row:
        return str(row.get("prompt", ""))
    turns = [m for m in row["messages"] if m["role"] != "system"]
    if len(turns) == 1:
        return str(turns[0]["content"])
    return "\n".join(f"{m['role'].upper()}: {m['content']}" for m in turns)


def items_of(row: dict[str, Any]) -> list[JudgeItem]:
    candidates = row["candidates"]
    return [
        JudgeItem(prompt=prompt_text(row), answer=c, reference=row.get("reference"), peers=candidates)
        for c in candidates
    ]


def select(scores: Sequence[Score], top_k: int) -> tuple[list[int], list[int]]:
    """Indices of chosen (best first, passing only, at most top_k) and rejected (all the others)."""
    order = sorted(range(len(scores)), key=lambda i: (-(scores[i].value or 0.0), i))
    chosen = [i for i in order if scores[i].passed][:top_k]
    return chosen, [i for i in range(len(scores)) if i not in chosen]


def histogram(scores: Sequence[Score]) -> dict[str, int]:
    bins = {f"{b / BINS:.1f}-{(b + 1) / BINS:.1f}": 0 for b in range(BINS)}
    labels = list(bins)
    unparsable = 0
    for s in scores:
        if s.value is None:
            unparsable += 1
        else:
            bins[labels[min(BINS - 1, int(s.value * BINS))]] += 1
    return {**bins, "unparsable": unparsable}


def curated_row(row: dict[str, Any], scores: Sequence[Score], top_k: int) -> dict[str, Any] | None:
    chosen, rejected = select(scores, top_k)
    if not chosen:
        return None
    keep: dict[str, Any] = {
        k: row[k] for k in ("id", "split", "prompt", "messages", "system", "reference") if k in row
    }
    candidates = row["candidates"]
    chosen_texts = [candidates[i] for i in chosen]
    return {
        **keep,
        "chosen": chosen_texts,
        # A rejected answer identical to a chosen one makes a preference pair with no signal
        # (its log-ratio difference is 0 by construction) that still costs two forward passes.
        "rejected": [candidates[i] for i in rejected if candidates[i] not in chosen_texts],
        "scores": [s.value for s in scores],
        "chosenScores": [scores[i].value for i in chosen],
    }


async def score_llm_resumable(
    judge: JudgeSpec,
    rows: Sequence[dict[str, Any]],
    client: TeacherClient,
    stage_uri: str,
    progress: ProgressReporter,
    stop: asyncio.Event,
) -> dict[tuple[str, int], Score]:
    """LLM scores for every candidate, reusing the score shards of earlier attempts.

    Scores are written in shards as they arrive; once `stop` is set, the calls in flight finish and
    are written, and no new one starts (the result then lacks the unscored candidates).
    """
    cached, next_index = generate.read_shards(stage_uri, SCORE_PREFIX)
    scores = {(r["id"], r["index"]): Score(r["score"], r.get("reason", "")) for r in cached}
    missing = iter(
        [
            (row["id"], i, item)
            for row in rows
            for i, item in enumerate(items_of(row))
            if (row["id"], i) not in scores
        ]
    )
    total = sum(len(r["candidates"]) for r in rows)
    writer = generate.ShardWriter(stage_uri, next_index, prefix=SCORE_PREFIX)

    async def worker() -> None:
        for row_id, index, item in missing:
            if stop.is_set():
                return
            try:
                (result,) = await score(judge, [item], client=client)
            except TeacherAborted:
                return
            except (TeacherAuthFailed, TeacherRejected):
                client.abort()  # the judge refuses every request alike: send no more
                raise
            scores[(row_id, index)] = result
            if not result.final:
                continue  # not cached: the next attempt asks the judge again
            writer.buffer.append(
                {"id": row_id, "index": index, "score": result.value, "reason": result.reason}
            )
            if writer.due():
                await writer.flush()
            progress.update(
                len(scores),
                total,
                detail=f"{len(scores)}/{total} candidates judged",
                cost_usd=client.usage.cost_usd,
            )

    async def abort_on_stop() -> None:
        await stop.wait()
        client.abort()

    watcher = asyncio.create_task(abort_on_stop())
    try:
        await asyncio.gather(*(worker() for _ in range(generate.WORKERS_PER_SLOT * client.max_concurrency)))
    finally:
        watcher.cancel()
        await writer.flush()
    return scores


async def score_all(
    inv: StageInvocation, rows: Sequence[dict[str, Any]], progress: ProgressReporter
) -> tuple[dict[tuple[str, int], Score], dict[str, Any]]:
    judge = inv.spec.curation.judge
    async with judge_client(inv.spec, judge) as client:
        if client is not None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                # As in generate: finish and keep the paid judge calls in flight, then stop.
                with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                    loop.add_signal_handler(sig, stop.set)
            scores = await score_llm_resumable(judge, rows, client, inv.stage_uri(), progress, stop)
            usage = client.usage
            if stop.is_set():
                raise StageFailure(
                    "Interrupted",
                    f"stopped by a signal after {len(scores)} judged candidates (kept); a rerun judges only the rest",
                )
            unjudged = [s for s in scores.values() if not s.final]
            if unjudged:
                raise StageFailure(
                    "TeacherUnavailable",
                    f"{len(unjudged)} of {len(scores)} candidates could not be judged ({unjudged[0].reason}); "
                    "the others are kept and a rerun judges only these",
                )
            return scores, {
                "judgeCalls": usage.calls,
                "judgeInputTokens": usage.input_tokens,
                "judgeOutputTokens": usage.output_tokens,
                "judgeCostUSD": usage.cost_usd,
            }
        scores = {}
        for row in rows:
            for i, s in enumerate(await score(judge, items_of(row))):
                scores[(row["id"], i)] = s
        return scores, {}


def run(inv: StageInvocation) -> StageResult:
    stage_uri = inv.stage_uri()
    rows, _ = generate.read_candidates(inv.stage_uri(Stage.GENERATE))
    if not rows:
        raise StageFailure("NoCandidates", "the generate stage left no candidates to curate")
    progress = ProgressReporter(stage_uri, inv.stage)
    total = sum(len(r["candidates"]) for r in rows)
    progress.update(0, total, detail="judging candidates", force=True)
    scores, judge_usage = run_async(score_all(inv, rows, progress))

    top_k = inv.spec.curation.top_k
    out: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    all_scores: list[Score] = []
    dropped = 0
    for row in rows:
        row_scores = [scores[(row["id"], i)] for i in range(len(row["candidates"]))]
        all_scores += row_scores
        kept = curated_row(row, row_scores, top_k)
        if kept is None:
            dropped += 1
        else:
            out[row.get("split", "train")].append(kept)
    for split, kept_rows in out.items():
        store.write_jsonl(f"{stage_uri}/curated/{split}.jsonl", kept_rows)
    progress.update(total, total, detail="curated", cost_usd=judge_usage.get("judgeCostUSD", 0.0), force=True)

    chosen = sum(len(r["chosen"]) for r in out["train"])
    hist = histogram(all_scores)
    details = {
        "judge": inv.spec.curation.judge.kind,
        "histogram": hist,
        "unparsable": hist["unparsable"],
        "prompts": len(rows),
        "droppedPrompts": dropped,
        "trainPrompts": len(out["train"]),
        "testPrompts": len(out["test"]),
        "meanScore": round(
            sum(s.value for s in all_scores if s.value is not None) / max(1, len(all_scores)), 4
        ),
        **judge_usage,
    }
    result = StageResult(
        stage=inv.stage,
        ok=True,
        message=f"{chosen} chosen candidates for {len(out['train'])} train prompts; {dropped} prompts dropped"
        + (f"; {hist['unparsable']} judge replies unparsable" if hist["unparsable"] else ""),
        metrics=Metrics(curated=chosen),
        artifacts=Artifacts(curated_uri=f"{stage_uri}/curated/"),
        details=details,
    )
    if not out["train"]:
        return result.model_copy(
            update={
                "ok": False,
                "reason": "NothingCurated",
                "message": f"no train prompt kept a passing candidate ({dropped} of {len(rows)} dropped, "
                f"{hist['unparsable']} unparsable judge replies): nothing to train on",
            }
        )
    return result
