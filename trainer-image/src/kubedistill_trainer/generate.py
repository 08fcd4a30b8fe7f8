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

`generation.shards` > 1 runs the stage as an Indexed Job: pod k (`JOB_COMPLETION_INDEX`) asks only
for the prompts with `shard_of(id) == k`, with 1/shards of the rate limits, of the concurrency and
of the budget (its share minus what its prompts cost before: the shares never add up to more than
the budget, though one pod's unspent share is not lent to another). It writes its candidate shards
below `candidates/part-KKKK/` and its progress.json and result.json below `parts/KKKK/`; the
dataset files are written whole by every pod (the same bytes). The operator sums the parts.

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
from pathlib import Path
from typing import Any

from kubedistill import dataset
from kubedistill.api.models import GenerationSpec
from kubedistill.api.stage import COMPLETION_INDEX_ENV, TEACHER_API_KEY_ENV, StageInvocation, StageResult
from kubedistill.catalog import ResolvedTeacher, load_catalog
from kubedistill.domain import pricing
from kubedistill_trainer.batch import BatchRun
from kubedistill_trainer.batch_api import open_batch_api
from kubedistill_trainer.budget import BudgetGate, worst_case_cost
from kubedistill_trainer.generate_result import Outcome, stage_result
from kubedistill_trainer.prompts import Prepared, prepare_dataset
from kubedistill_trainer.runtime import ProgressReporter, StageFailure, run_async
from kubedistill_trainer.shards import ShardWriter, Work, answered_so_far, candidate_row, part_prefix
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
            stage_uri=inv.report_uri(),
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


def _share(limit: int | None, shards: int) -> int | None:
    return None if limit is None else max(1, limit // shards)


def make_client(inv: StageInvocation, teacher: ResolvedTeacher) -> TeacherClient:
    t, shards = inv.spec.teacher, inv.parts()
    return TeacherClient(
        teacher,
        api_key=os.environ.get(TEACHER_API_KEY_ENV) or None,
        max_concurrency=max(1, t.max_concurrency // shards),
        requests_per_minute=_share(t.requests_per_minute, shards),
        tokens_per_minute=_share(t.tokens_per_minute, shards),
        timeout=t.timeout_seconds,
    )


def shard_index(inv: StageInvocation) -> int | None:
    """This pod's index among the generation pods; None when the stage is not sharded."""
    shards = inv.parts()
    if shards == 1:
        return None
    raw = os.environ.get(COMPLETION_INDEX_ENV, "")
    if not raw.isdigit() or int(raw) >= shards:
        raise StageFailure(
            "InvalidInvocation",
            f"generation.shards is {shards} but {COMPLETION_INDEX_ENV} is {raw!r}: run it as an Indexed Job",
        )
    return int(raw)


def run(inv: StageInvocation) -> StageResult:
    stage_uri = inv.stage_uri()
    spec = inv.spec
    teacher = load_catalog().resolve_teacher(spec.teacher.model, spec.teacher.base_url)
    if not teacher.base_url:
        raise StageFailure(
            "TeacherUnavailable", f"teacher {spec.teacher.model} is not in the catalog: set teacher.baseURL"
        )
    index, shards = shard_index(inv), inv.parts()

    def owns(row_id: str) -> bool:
        return dataset.shard_of(row_id, shards) == index

    mine = None if index is None else owns
    done_ids, previous, next_shard = answered_so_far(stage_uri, part_prefix(index), mine)
    with tempfile.TemporaryDirectory(prefix="generate-") as tmp:
        prepared = prepare_dataset(inv, stage_uri, Path(tmp), done_ids, teacher, mine)
        if prepared.prompts < shards:
            raise StageFailure(
                "TooManyShards",
                f"spec.generation.shards ({shards}) exceeds the {prepared.prompts} prompts of the dataset",
            )
        return _generate(inv, stage_uri, teacher, prepared, previous, next_shard, index)


def _generate(
    inv: StageInvocation,
    stage_uri: str,
    teacher: ResolvedTeacher,
    prepared: Prepared,
    previous: Usage,
    next_shard: int,
    index: int | None,
) -> StageResult:
    spec = inv.spec
    shards = inv.parts()
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

    limit = spec.budget.max_teacher_cost_usd
    gate = BudgetGate(
        None if limit is None else limit / shards,
        previous.cost_usd,
        worst_case_cost(teacher, prepared.longest_request_tokens, spec.generation)
        if prepared.to_ask
        else 0.0,
    )
    writer = ShardWriter(stage_uri, next_shard, prefix=part_prefix(index))
    progress = ProgressReporter(inv.report_uri(), inv.stage)
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
                workers=WORKERS_PER_SLOT * max(1, spec.teacher.max_concurrency // shards),
                on_answer=report,
                stop=stop,
            )

    todo = prepared.to_ask
    # Batch mode sizes each batch to the budget itself (and may have batches to finish first).
    runs = bool(todo) and (mode == "batch" or not gate.exhausted)
    outcome = run_async(go()) if runs else Outcome(budget_stopped=bool(todo))
    report(outcome, force=True)

    return stage_result(inv, teacher, prepared, previous, outcome, mode, index)
