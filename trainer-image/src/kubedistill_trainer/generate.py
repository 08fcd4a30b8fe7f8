"""generate: the teacher answers every dataset prompt `nSamples` times.

Writes below `<artifactBase>/generate/`:
- `dataset/train.jsonl`, `dataset/test.jsonl` — the normalised rows, split by a hash of id;
  `dataset/rejected.jsonl` — invalid rows with their line number and reason.
- `candidates/shard-NNNNN.jsonl` — one row per answered prompt, written in shards as answers arrive:
  `{id, split, prompt|messages, system?, reference?, candidates: [text...], finishReasons, usage:
  {calls, inputTokens, outputTokens, cachedInputTokens}, costUSD, model}`. Held-out (test)
  prompts are answered too: evaluation compares the student with them.

The dataset is streamed, never held: one pass validates it (the estimate's invalid-share rule),
writes the three dataset files and a local work file of the prompts still to ask, which the
teacher calls then read line by line. Memory is the ids seen (8 bytes a prompt, twice: the
dataset's and the answered ones) plus the requests in flight and one shard.

Resumable: a rerun reads the shards, skips every prompt already in them (so it never pays twice
for an answer it kept) and continues the numbering. The budget (`budget.maxTeacherCostUSD`) counts
what earlier attempts spent; a prompt is started only while spent + in flight + its projected cost
stays within it, so the stage stops before overspending, keeps what it has and fails with
BudgetExceeded. A prompt whose retries are exhausted is left for the next attempt; the stage then
fails with TeacherUnavailable and keeps the rest. SIGTERM or SIGINT stops it the same way: the
requests in flight finish and are written, then it fails with Interrupted.

`teacher.mode` batch (or auto, resolved by `kubedistill.domain.pricing`) sends the same requests
through the provider's Batch API instead (`kubedistill_trainer.batch`), into the same shards. The
batch runner keeps the prompts still to ask in memory (a batch file holds them all anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubedistill.api.models import Artifacts, GenerationSpec, Metrics
from kubedistill.api.stage import TEACHER_API_KEY_ENV, StageInvocation, StageResult
from kubedistill.catalog import ResolvedTeacher, load_catalog
from kubedistill.domain import pricing
from kubedistill.traffic import traffic_summary
from kubedistill_trainer.batch import BatchRun
from kubedistill_trainer.batch_api import open_batch_api
from kubedistill_trainer.budget import BudgetGate, worst_case_cost
from kubedistill_trainer.prompts import Prepared, prepare_dataset
from kubedistill_trainer.runtime import ProgressReporter, StageFailure, run_async
from kubedistill_trainer.shards import ShardWriter, Work, answered_so_far, candidate_row
from kubedistill_trainer.speed import speed_figures
from kubedistill_trainer.teacher import (
    Completion,
    TeacherAborted,
    TeacherAuthFailed,
    TeacherClient,
    TeacherError,
    TeacherRejected,
    Usage,
)

log = logging.getLogger(__name__)

# Prompts in progress per concurrency slot: while one waits out a Retry-After, another uses its
# connection (requests in flight stay capped by teacher.maxConcurrency).
WORKERS_PER_SLOT = 2
# Consecutive failed prompts (after their own retries) that mean the teacher is down, not flaky.
MAX_CONSECUTIVE_FAILURES = 16


@dataclass
class Outcome:
    usage: Usage = field(default_factory=Usage)
    answered: int = 0
    failed: list[str] = field(default_factory=list)
    budget_stopped: bool = False
    fatal: TeacherError | None = None
    interrupted: bool = False
    seconds: float = 0.0
    retries: dict[str, int] = field(default_factory=dict)
    responses_without_usage: int = 0
    batch_details: dict[str, Any] = field(default_factory=dict)
    # Latency p50/p95 and llama.cpp's timings of this attempt's requests (speed.speed_figures).
    speed: dict[str, Any] = field(default_factory=dict)


async def generate_candidates(
    todo: Iterable[Work],
    client: TeacherClient,
    gen: GenerationSpec,
    gate: BudgetGate,
    writer: ShardWriter,
    *,
    workers: int,
    on_answer: Callable[[Outcome], None] | None = None,
    stop: asyncio.Event | None = None,
) -> Outcome:
    """Answer `todo` with `workers` prompts in flight; rows go to `writer` as they arrive.

    Setting `stop` (a signal handler does) lets the requests in flight finish — they are paid for —
    and starts no new one.
    """
    outcome = Outcome()
    examples = gen.few_shot_turns()
    queue: Iterator[Work] = iter(todo)
    stop = stop or asyncio.Event()
    consecutive_failures = 0

    def halt() -> None:
        # Synchronously: a prompt waiting for the slot just freed must not be sent.
        stop.set()
        client.abort()

    start = time.perf_counter()

    async def worker() -> None:
        nonlocal consecutive_failures
        for work in queue:
            if stop.is_set():
                return
            projected = gate.admit()
            if projected is None:
                outcome.budget_stopped = True
                halt()
                return
            cost = None
            try:
                completion = await client.complete(
                    work.row.teacher_messages(gen.system_prompt, examples),
                    n=gen.n_samples,
                    temperature=gen.temperature,
                    max_tokens=gen.max_tokens,
                    seed=gen.seed,
                )
                cost = completion.usage.cost_usd
            except TeacherAborted:
                return
            except (TeacherAuthFailed, TeacherRejected) as exc:
                outcome.fatal = exc
                halt()
                return
            except TeacherError as exc:
                log.warning("prompt %s failed: %s", work.row.id, exc)
                outcome.failed.append(work.row.id)
                consecutive_failures += 1
                if consecutive_failures >= MAX_CONSECUTIVE_FAILURES and outcome.fatal is None:
                    outcome.fatal = TeacherError(
                        f"{consecutive_failures} prompts in a row failed; last: {exc}"
                    )
                    halt()
                    return
                continue
            finally:
                gate.settle(projected, cost)
            consecutive_failures = 0
            outcome.usage.add(completion.usage)
            outcome.answered += 1
            writer.buffer.append(
                candidate_row(
                    work,
                    completion.texts,
                    completion.finish_reasons,
                    completion.usage,
                    client.teacher.api_model,
                )
            )
            if writer.due():
                await writer.flush()
            if on_answer is not None:
                on_answer(outcome)

    async def abort_on_stop() -> None:
        # A stop from outside (a signal): prompts waiting for a slot must not be sent either.
        await stop.wait()
        client.abort()

    watcher = asyncio.create_task(abort_on_stop())
    try:
        await asyncio.gather(*(worker() for _ in range(max(1, workers))))
    finally:
        watcher.cancel()
    await writer.flush()
    outcome.interrupted = stop.is_set() and not outcome.budget_stopped and outcome.fatal is None
    outcome.seconds = time.perf_counter() - start
    outcome.retries = dict(client.retries)
    outcome.responses_without_usage = client.responses_without_usage
    outcome.speed = speed_figures("teacher", client.latencies, client.engine)
    return outcome


async def generate_in_batches(
    inv: StageInvocation,
    todo: Sequence[Work],
    client: TeacherClient,
    gate: BudgetGate,
    writer: ShardWriter,
    *,
    on_progress: Callable[[str, float], None],
    stop: asyncio.Event,
) -> Outcome:
    """`todo` answered through the provider's Batch API (`kubedistill_trainer.batch`)."""
    teacher = client.teacher
    outcome = Outcome()

    def make_row(work: Work, completion: Completion) -> dict[str, Any]:
        return candidate_row(
            work, completion.texts, completion.finish_reasons, completion.usage, teacher.api_model
        )

    start = time.perf_counter()
    api = open_batch_api(
        teacher, os.environ.get(TEACHER_API_KEY_ENV) or None, timeout=inv.spec.teacher.timeout_seconds
    )
    try:
        run = BatchRun(
            stage_uri=inv.stage_uri(),
            works=todo,
            gen=inv.spec.generation,
            api=api,
            client=client,
            writer=writer,
            outcome=outcome,
            make_row=make_row,
            budget=gate.limit,
            spent=gate.spent,
            worst_row_cost=gate.worst_case,
            stop=stop,
            on_progress=on_progress,
        )
        outcome.batch_details = (await run.run(todo)).details()
    finally:
        await api.aclose()
    gate.spent = run.spent
    outcome.interrupted = stop.is_set() and not outcome.budget_stopped and outcome.fatal is None
    outcome.seconds = time.perf_counter() - start
    outcome.retries = dict(client.retries)
    outcome.responses_without_usage += client.responses_without_usage
    return outcome


def make_client(inv: StageInvocation, teacher: ResolvedTeacher) -> TeacherClient:
    t = inv.spec.teacher
    return TeacherClient(
        teacher,
        api_key=os.environ.get(TEACHER_API_KEY_ENV) or None,
        max_concurrency=t.max_concurrency,
        requests_per_minute=t.requests_per_minute,
        tokens_per_minute=t.tokens_per_minute,
        timeout=t.timeout_seconds,
    )


def run(inv: StageInvocation) -> StageResult:
    stage_uri = inv.stage_uri()
    spec = inv.spec
    teacher = load_catalog().resolve_teacher(spec.teacher.model, spec.teacher.base_url)
    if not teacher.base_url:
        raise StageFailure(
            "TeacherUnavailable", f"teacher {spec.teacher.model} is not in the catalog: set teacher.baseURL"
        )
    done_ids, previous, next_shard = answered_so_far(stage_uri)
    with tempfile.TemporaryDirectory(prefix="generate-") as tmp:
        prepared = prepare_dataset(inv, stage_uri, Path(tmp), done_ids, teacher)
        return _generate(inv, stage_uri, teacher, prepared, previous, next_shard)


def _generate(
    inv: StageInvocation,
    stage_uri: str,
    teacher: ResolvedTeacher,
    prepared: Prepared,
    previous: Usage,
    next_shard: int,
) -> StageResult:
    spec = inv.spec
    total = prepared.total
    requests_per_prompt = 1 if teacher.supports_n else spec.generation.n_samples
    try:
        mode = pricing.teacher_mode(spec.teacher.mode, teacher, total * requests_per_prompt)
    except pricing.BatchUnsupported as exc:
        raise StageFailure(exc.reason, str(exc)) from None
    log.info(
        "%d prompts, %d already answered, %d to ask %s (%s)",
        total,
        prepared.done,
        prepared.to_ask,
        teacher.id,
        mode,
    )

    gate = BudgetGate(
        spec.budget.max_teacher_cost_usd,
        previous.cost_usd,
        worst_case_cost(teacher, prepared.longest_request_tokens, spec.generation)
        if prepared.to_ask
        else 0.0,
    )
    writer = ShardWriter(stage_uri, next_shard)
    progress = ProgressReporter(stage_uri, inv.stage)
    base_done = prepared.done

    def report(outcome: Outcome, force: bool = False) -> None:
        done = base_done + outcome.answered
        progress.update(
            done, total, detail=f"{done}/{total} prompts answered", cost_usd=gate.spent, force=force
        )

    report(Outcome(), force=True)

    def report_batch(detail: str, spent: float) -> None:
        progress.update(base_done, total, detail=f"Generating — {detail}", cost_usd=spent)

    async def go() -> Outcome:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # SIGTERM (pod deletion, suspend) or Ctrl-C in local mode: keep what is paid for, then stop.
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Only the main thread can take signals; elsewhere the caller owns them.
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        async with make_client(inv, teacher) as client:
            if mode == "batch":
                return await generate_in_batches(
                    inv, list(prepared.works()), client, gate, writer, on_progress=report_batch, stop=stop
                )
            return await generate_candidates(
                prepared.works(),
                client,
                spec.generation,
                gate,
                writer,
                workers=WORKERS_PER_SLOT * spec.teacher.max_concurrency,
                on_answer=report,
                stop=stop,
            )

    todo = prepared.to_ask
    # Batch mode sizes each batch to the budget itself (and may have batches to finish first).
    runs = bool(todo) and (mode == "batch" or not gate.exhausted)
    outcome = run_async(go()) if runs else Outcome(budget_stopped=bool(todo))
    report(outcome, force=True)

    usage = Usage()
    usage.add(previous)
    usage.add(outcome.usage)
    answered = base_done + outcome.answered
    saving = max(0.0, pricing.sync_price(teacher, usage.input_tokens, usage.output_tokens) - usage.cost_usd)
    metrics = Metrics(
        teacher_calls=usage.calls,
        teacher_input_tokens=usage.input_tokens,
        teacher_output_tokens=usage.output_tokens,
        teacher_cost_total=usage.cost_usd,
        # Left out when nothing was cached or saved: most teachers offer neither.
        teacher_cached_input_tokens=usage.cached_input_tokens or None,
        teacher_saving_usd=saving or None,
        candidates=answered * spec.generation.n_samples,
        teacher_latency_p50_sec=outcome.speed.get("teacherLatencyP50Sec"),
        teacher_latency_p95_sec=outcome.speed.get("teacherLatencyP95Sec"),
        teacher_prompt_tokens_per_second=outcome.speed.get("teacherPromptTokensPerSecond"),
        teacher_decode_tokens_per_second=outcome.speed.get("teacherDecodeTokensPerSecond"),
    )
    artifacts = Artifacts(dataset_uri=f"{stage_uri}/dataset/", candidates_uri=f"{stage_uri}/candidates/")
    details = {
        "teacher": teacher.id,
        "teacherMode": mode,
        **outcome.batch_details,
        "priceNote": teacher.note,
        "prompts": total,
        "answered": answered,
        "answeredThisAttempt": outcome.answered,
        "trainRows": prepared.train,
        "testRows": prepared.test,
        "rejectedRows": prepared.rejected,
        **({"traffic": prepared.traffic.to_k8s()} if prepared.traffic is not None else {}),
        "failedPrompts": outcome.failed[:20],
        "retries": outcome.retries,
        "responsesWithoutUsage": outcome.responses_without_usage,
        "generationSeconds": round(outcome.seconds, 3),
        "requestsPerSecond": round(outcome.usage.calls / outcome.seconds, 2) if outcome.seconds else None,
        **outcome.speed,
    }
    rejected_note = f"; {prepared.rejected} invalid dataset rows skipped" if prepared.rejected else ""
    if prepared.traffic is not None:
        rejected_note += "; " + traffic_summary(prepared.traffic)
    result = StageResult(stage=inv.stage, ok=True, metrics=metrics, artifacts=artifacts, details=details)
    if outcome.fatal is not None:
        return result.model_copy(
            update={
                "ok": False,
                "reason": outcome.fatal.reason,
                "message": f"{outcome.fatal}; {answered}/{total} prompts answered and kept",
            }
        )
    if outcome.interrupted:
        return result.model_copy(
            update={
                "ok": False,
                "reason": "Interrupted",
                "message": f"stopped by a signal: {answered}/{total} prompts answered and kept; "
                + (
                    "a rerun polls the batches already submitted"
                    if mode == "batch"
                    else "a rerun asks only the missing ones"
                ),
            }
        )
    if outcome.budget_stopped:
        limit = spec.budget.max_teacher_cost_usd
        return result.model_copy(
            update={
                "ok": False,
                "reason": "BudgetExceeded",
                "message": f"teacher budget ${limit:.4f} reached (${usage.cost_usd:.4f} spent): {answered}/{total} "
                "prompts answered and kept; raise budget.maxTeacherCostUSD and rerun to continue",
            }
        )
    if outcome.failed:
        return result.model_copy(
            update={
                "ok": False,
                "reason": "TeacherUnavailable",
                "message": f"{len(outcome.failed)} prompts failed after retries; {answered}/{total} answered and "
                "kept; a rerun asks only the missing ones",
            }
        )
    if outcome.responses_without_usage:
        rejected_note += (
            f"; {outcome.responses_without_usage} responses had no usage: their cost is not counted"
        )
    if outcome.batch_details.get("unknownResults"):
        rejected_note += (
            f"; {outcome.batch_details['unknownResults']} batch results for unknown requests ignored"
        )
    saved = f", ${saving:.4f} saved against sync prices" if saving > 0 else ""
    message = (
        f"{answered} prompts × {spec.generation.n_samples} samples, ${usage.cost_usd:.4f} "
        f"({mode}{saved}){rejected_note}"
    )
    return result.model_copy(update={"message": message})
