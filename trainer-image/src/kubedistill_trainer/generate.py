"""generate: the teacher answers every dataset prompt `nSamples` times.

Writes below `<artifactBase>/generate/`:
- `dataset/train.jsonl`, `dataset/test.jsonl` — the normalised rows, split by a hash of id;
  `dataset/rejected.jsonl` — invalid rows with their line number and reason.
- `candidates/shard-NNNNN.jsonl` — one row per answered prompt, written in shards as answers arrive:
  `{id, split, prompt|messages, system?, reference?, candidates: [text...], finishReasons, usage:
  {calls, inputTokens, outputTokens}, costUSD, model}`. Held-out (test) prompts are answered too:
  evaluation compares the student with them.

Resumable: a rerun reads the shards, skips every prompt already in them (so it never pays twice
for an answer it kept) and continues the numbering. The budget (`budget.maxTeacherCostUSD`) counts
what earlier attempts spent; a prompt is started only while spent + in flight + its projected cost
stays within it, so the stage stops before overspending, keeps what it has and fails with
BudgetExceeded. A prompt whose retries are exhausted is left for the next attempt; the stage then
fails with TeacherUnavailable and keeps the rest. SIGTERM or SIGINT stops it the same way: the
requests in flight finish and are written, then it fails with Interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubedistill import dataset, store
from kubedistill.api.models import Artifacts, GenerationSpec, Metrics
from kubedistill.api.stage import TEACHER_API_KEY_ENV, StageInvocation, StageResult
from kubedistill.catalog import ResolvedTeacher, load_catalog
from kubedistill_trainer.runtime import ProgressReporter, StageFailure, run_async
from kubedistill_trainer.speed import speed_figures
from kubedistill_trainer.teacher import (
    TeacherAborted,
    TeacherAuthFailed,
    TeacherClient,
    TeacherError,
    TeacherRejected,
    Usage,
    estimate_tokens,
)

log = logging.getLogger(__name__)

SHARD_ROWS = 100
# A SIGKILL loses at most this much of answered-but-unwritten work (SIGTERM loses none).
SHARD_SECONDS = 1.0
SHARD_PREFIX = "candidates/shard-"
# Prompts in progress per concurrency slot: while one waits out a Retry-After, another uses its
# connection (requests in flight stay capped by teacher.maxConcurrency).
WORKERS_PER_SLOT = 2
# Consecutive failed prompts (after their own retries) that mean the teacher is down, not flaky.
MAX_CONSECUTIVE_FAILURES = 16


@dataclass
class Work:
    row: dataset.Row
    split: str


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
    # Latency p50/p95 and llama.cpp's timings of this attempt's requests (speed.speed_figures).
    speed: dict[str, Any] = field(default_factory=dict)


def candidate_row(
    work: Work, texts: list[str], finish: list[str], usage: Usage, model: str
) -> dict[str, Any]:
    return {
        **work.row.to_json(),
        "split": work.split,
        "candidates": texts,
        "finishReasons": finish,
        "usage": {
            "calls": usage.calls,
            "inputTokens": usage.input_tokens,
            "outputTokens": usage.output_tokens,
        },
        "costUSD": usage.cost_usd,
        "model": model,
    }


def usage_of(row: dict[str, Any]) -> Usage:
    u = row.get("usage", {})
    return Usage(
        u.get("calls", 0), u.get("inputTokens", 0), u.get("outputTokens", 0), row.get("costUSD", 0.0)
    )


def shard_index(uri: str, prefix: str = SHARD_PREFIX) -> int:
    return int(uri.rsplit(prefix, 1)[1].split(".", 1)[0])


def shard_uris(stage_uri: str, prefix: str) -> list[str]:
    directory = prefix.rsplit("/", 1)[0]
    return [u for u in store.list_uris(f"{stage_uri}/{directory}/") if prefix in u and u.endswith(".jsonl")]


def next_shard_index(uris: Sequence[str], prefix: str) -> int:
    return max((shard_index(u, prefix) for u in uris), default=-1) + 1


def read_shards(stage_uri: str, prefix: str) -> tuple[list[dict[str, Any]], int]:
    """Every row of `<stage_uri>/<prefix>NNNNN.jsonl` in shard order, and the next shard index."""
    uris = shard_uris(stage_uri, prefix)
    return [row for uri in uris for row in store.read_jsonl(uri)], next_shard_index(uris, prefix)


def read_candidates(stage_uri: str) -> tuple[list[dict[str, Any]], int]:
    """All candidate rows kept so far (first occurrence of an id wins) and the next shard index."""
    rows, next_index = read_shards(stage_uri, SHARD_PREFIX)
    unique: dict[str, dict[str, Any]] = {}
    for row in rows:
        unique.setdefault(row["id"], row)
    return list(unique.values()), next_index


def answered_so_far(stage_uri: str) -> tuple[set[str], Usage, int]:
    """Ids already answered, what they cost and the next shard index — one shard in memory at a
    time and no answer texts kept, so resuming a large job stays small."""
    uris = shard_uris(stage_uri, SHARD_PREFIX)
    ids: set[str] = set()
    usage = Usage()
    for uri in uris:
        for row in store.read_jsonl(uri):
            if row["id"] not in ids:
                ids.add(row["id"])
                usage.add(usage_of(row))
    return ids, usage, next_shard_index(uris, SHARD_PREFIX)


class ShardWriter:
    """Buffers answered rows and writes them as a new shard every `rows` rows or `seconds` seconds."""

    def __init__(
        self,
        stage_uri: str,
        next_index: int,
        *,
        prefix: str = SHARD_PREFIX,
        rows: int = SHARD_ROWS,
        seconds: float = SHARD_SECONDS,
    ) -> None:
        self.stage_uri = stage_uri
        self.prefix = prefix
        self.index = next_index
        self.max_rows = rows
        self.max_seconds = seconds
        self.buffer: list[dict[str, Any]] = []
        self.last_flush = time.monotonic()
        self.written = 0

    def due(self) -> bool:
        return len(self.buffer) >= self.max_rows or (
            bool(self.buffer) and time.monotonic() - self.last_flush >= self.max_seconds
        )

    async def flush(self) -> None:
        if not self.buffer:
            return
        rows, self.buffer = self.buffer, []
        uri = f"{self.stage_uri}/{self.prefix}{self.index:05d}.jsonl"
        self.index += 1
        self.last_flush = time.monotonic()
        await asyncio.to_thread(store.write_jsonl, uri, rows)
        self.written += len(rows)


class BudgetGate:
    """Admits a prompt only while spent + in-flight projections + its projection fit the budget."""

    def __init__(self, limit: float | None, spent: float, worst_case: float) -> None:
        self.limit = limit
        self.spent = spent
        self.in_flight = 0.0
        self.worst_case = worst_case
        self._answered = 0
        self._answered_cost = 0.0

    def projection(self) -> float:
        # Before any answer the worst case (maxTokens); then twice the mean seen so far.
        if not self._answered:
            return self.worst_case
        return min(self.worst_case, 2 * self._answered_cost / self._answered)

    def admit(self) -> float | None:
        projected = self.projection()
        if self.limit is not None and self.spent + self.in_flight + projected > self.limit:
            return None
        self.in_flight += projected
        return projected

    def settle(self, projected: float, cost: float | None) -> None:
        self.in_flight -= projected
        if cost is not None:
            self.spent += cost
            self._answered += 1
            self._answered_cost += cost

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.spent + self.projection() > self.limit


async def generate_candidates(
    todo: Sequence[Work],
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


def prepare_dataset(inv: StageInvocation, stage_uri: str) -> tuple[list[Work], dataset.Parsed]:
    parsed = dataset.load(inv.spec.dataset)
    train, test = dataset.split(parsed.rows, inv.spec.dataset.test_fraction)
    store.write_jsonl(f"{stage_uri}/dataset/train.jsonl", [r.to_json() for r in train])
    store.write_jsonl(f"{stage_uri}/dataset/test.jsonl", [r.to_json() for r in test])
    store.write_jsonl(f"{stage_uri}/dataset/rejected.jsonl", [r.to_json() for r in parsed.rejected])
    test_ids = {r.id for r in test}
    return [Work(r, "test" if r.id in test_ids else "train") for r in parsed.rows], parsed


def worst_case_cost(teacher: ResolvedTeacher, works: Sequence[Work], gen: GenerationSpec) -> float:
    """The most one prompt can cost: the longest prompt, billed per request, and maxTokens per sample."""
    if not works:
        return 0.0
    examples = gen.few_shot_turns()
    longest = max(
        estimate_tokens(w.row.teacher_messages(gen.system_prompt, examples), teacher.chars_per_token)
        for w in works
    )
    requests = 1 if teacher.supports_n else gen.n_samples
    return teacher.cost(longest * requests, gen.max_tokens * gen.n_samples)


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
    works, parsed = prepare_dataset(inv, stage_uri)
    done_ids, previous, next_shard = answered_so_far(stage_uri)
    todo = [w for w in works if w.row.id not in done_ids]
    total = len(works)
    log.info("%d prompts, %d already answered, %d to ask %s", total, total - len(todo), len(todo), teacher.id)

    gate = BudgetGate(
        spec.budget.max_teacher_cost_usd, previous.cost_usd, worst_case_cost(teacher, todo, spec.generation)
    )
    writer = ShardWriter(stage_uri, next_shard)
    progress = ProgressReporter(stage_uri, inv.stage)
    base_done = total - len(todo)

    def report(outcome: Outcome, force: bool = False) -> None:
        done = base_done + outcome.answered
        progress.update(
            done, total, detail=f"{done}/{total} prompts answered", cost_usd=gate.spent, force=force
        )

    report(Outcome(), force=True)

    async def go() -> Outcome:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # SIGTERM (pod deletion, suspend) or Ctrl-C in local mode: keep what is paid for, then stop.
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Only the main thread can take signals; elsewhere the caller owns them.
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        async with make_client(inv, teacher) as client:
            return await generate_candidates(
                todo,
                client,
                spec.generation,
                gate,
                writer,
                workers=WORKERS_PER_SLOT * spec.teacher.max_concurrency,
                on_answer=report,
                stop=stop,
            )

    outcome = run_async(go()) if todo and not gate.exhausted else Outcome(budget_stopped=bool(todo))
    report(outcome, force=True)

    usage = Usage()
    usage.add(previous)
    usage.add(outcome.usage)
    answered = base_done + outcome.answered
    metrics = Metrics(
        teacher_calls=usage.calls,
        teacher_input_tokens=usage.input_tokens,
        teacher_output_tokens=usage.output_tokens,
        teacher_cost_total=usage.cost_usd,
        candidates=answered * spec.generation.n_samples,
        teacher_latency_p50_sec=outcome.speed.get("teacherLatencyP50Sec"),
        teacher_latency_p95_sec=outcome.speed.get("teacherLatencyP95Sec"),
        teacher_prompt_tokens_per_second=outcome.speed.get("teacherPromptTokensPerSecond"),
        teacher_decode_tokens_per_second=outcome.speed.get("teacherDecodeTokensPerSecond"),
    )
    artifacts = Artifacts(dataset_uri=f"{stage_uri}/dataset/", candidates_uri=f"{stage_uri}/candidates/")
    details = {
        "teacher": teacher.id,
        "priceNote": teacher.note,
        "prompts": total,
        "answered": answered,
        "answeredThisAttempt": outcome.answered,
        "trainRows": sum(w.split == "train" for w in works),
        "testRows": sum(w.split == "test" for w in works),
        "rejectedRows": len(parsed.rejected),
        "failedPrompts": outcome.failed[:20],
        "retries": outcome.retries,
        "responsesWithoutUsage": outcome.responses_without_usage,
        "generationSeconds": round(outcome.seconds, 3),
        "requestsPerSecond": round(outcome.usage.calls / outcome.seconds, 2) if outcome.seconds else None,
        **outcome.speed,
    }
    rejected_note = f"; {len(parsed.rejected)} invalid dataset rows skipped" if parsed.rejected else ""
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
                "a rerun asks only the missing ones",
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
    message = (
        f"{answered} prompts × {spec.generation.n_samples} samples, ${usage.cost_usd:.4f}{rejected_note}"
    )
    return result.model_copy(update={"message": message})
