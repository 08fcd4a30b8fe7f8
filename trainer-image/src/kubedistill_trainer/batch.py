"""Batch mode of generate (`teacher.mode: batch`): the provider's batch API at its batch price.

1. every prompt becomes one request per sample group — one with `n` where the provider supports it,
   else one per sample with `seed + i`: the requests sync mode sends (Anthropic: one per sample, it
   has neither `n` nor seeds);
2. they are submitted as one batch (`kubedistill_trainer.batch_api`: OpenAI-compatible files +
   batches, or Anthropic Message Batches), polled with backoff until it ends, and its results mapped
   back by `custom_id`; answered prompts go to the same candidate shards as sync mode;
3. requests that failed inside the batch (5xx/429, expired, never run) are retried — in a follow-up
   batch, or synchronously when SYNC_RETRY_MAX or fewer are left — at most MAX_ATTEMPTS times; an
   invalid request (4xx) fails the stage (TeacherRejected). A result whose `custom_id` was never
   submitted is counted (`unknownResults`) and billed.

Resumable: `<stage>/batch/batch-NNNNN.json` records each batch's requests, input file id and batch
id as soon as each exists, before any polling. A rerun after a crash or a SIGTERM finishes the
batches recorded there — polling them, never submitting them again — before it submits anything
new; a batch whose creation was not recorded is looked up by its input file first (OpenAI).

Budget: a batch is submitted only when its worst case (the longest prompt, `maxTokens` per sample,
at the batch price) fits what the budget has left, so a budget smaller than the whole job splits it
into batches submitted one after another, each sized to what is left after the previous one's
actual cost; when not even one request fits, nothing is submitted and the stage stops with
BudgetExceeded. The synchronous retries are held to the budget at the sync price.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from kubedistill import store
from kubedistill.api.models import GenerationSpec
from kubedistill.catalog import ResolvedTeacher
from kubedistill_trainer.batch_api import BatchAPI, BatchView, Collected
from kubedistill_trainer.shards import ShardWriter, Work
from kubedistill_trainer.teacher import (
    Completion,
    TeacherAuthFailed,
    TeacherClient,
    TeacherError,
    TeacherRejected,
)

if TYPE_CHECKING:
    # generate runs this module: at run time the names come from it, not the other way round.
    from kubedistill_trainer.generate import Outcome

log = logging.getLogger(__name__)

STATE_PREFIX = "batch/batch-"
# OpenAI's limit on requests per batch (Anthropic's is 100,000).
MAX_BATCH_REQUESTS = 50_000
# Failed requests are retried synchronously (full price, at once) when no more than this many are
# left: a follow-up batch may take hours to save a few cents.
SYNC_RETRY_MAX = 20
# Tries of one request (batches and the synchronous retry together) before its prompt is left to
# the next attempt of the stage.
MAX_ATTEMPTS = 3
POLL_FIRST_S = 0.5
POLL_FACTOR = 1.5
POLL_MAX_S = 60.0


# ------------------------------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class Group:
    """One request: `n` samples of one prompt, starting at sample `first`."""

    custom_id: str
    row_id: str
    first: int
    n: int
    seed: int | None


def with_n(teacher: ResolvedTeacher) -> bool:
    """Whether one batch request asks for all samples of a prompt (Anthropic's API has no `n`)."""
    return teacher.supports_n and teacher.batch_api != "anthropic"


def sample_groups(works: Sequence[Work], gen: GenerationSpec, teacher: ResolvedTeacher) -> list[Group]:
    """The requests sync mode would send for `works`: one with n, or n with seed + i."""
    groups: list[Group] = []
    for k, work in enumerate(works):
        if with_n(teacher):
            groups.append(Group(f"p{k}-s0", work.row.id, 0, gen.n_samples, gen.seed))
            continue
        for i in range(gen.n_samples):
            seed = None if gen.seed is None else gen.seed + i
            groups.append(Group(f"p{k}-s{i}", work.row.id, i, 1, seed))
    return groups


def affordable(groups: Sequence[Group], fit: float | None) -> int:
    """How many of `groups` one batch may hold: at most MAX_BATCH_REQUESTS, and at most `fit`
    requests at their worst case (None: no budget)."""
    cap = min(len(groups), MAX_BATCH_REQUESTS)
    return cap if fit is None else max(0, min(cap, math.floor(fit + 1e-9)))


@dataclass
class BatchState:
    """What is saved of one batch: enough to find it again and map its results back."""

    index: int
    groups: list[Group]
    input_file_id: str | None = None
    batch_id: str | None = None
    status: str = "uploading"
    counts: dict[str, int] = field(default_factory=dict)
    collected: bool = False

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "groups": [asdict(g) for g in self.groups]}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> BatchState:
        return cls(**{**doc, "groups": [Group(**g) for g in doc["groups"]]})

    def summary(self) -> dict[str, Any]:
        return {"id": self.batch_id, "status": self.status, "requests": len(self.groups), **self.counts}


def progress_detail(state: BatchState, answered: int, total: int) -> str:
    counts = state.counts
    done = counts.get("completed", 0) + counts.get("failed", 0)
    return (
        f"{answered}/{total} prompts answered; batch {state.batch_id} {state.status}: "
        f"{done}/{counts.get('total', len(state.groups))} requests done ({counts.get('failed', 0)} failed)"
    )


# ------------------------------------------------------------------------------------ the runner


@dataclass
class BatchOutcome:
    batches: list[BatchState] = field(default_factory=list)
    unknown_results: int = 0
    retried_sync: int = 0

    def details(self) -> dict[str, Any]:
        return {
            "batches": [b.summary() for b in self.batches[-20:]],
            "unknownResults": self.unknown_results,
            "retriedSync": self.retried_sync,
        }


class BatchRun:
    """One attempt of generate in batch mode: finish the recorded batches, then submit the rest.

    Answered prompts go to `writer` as rows made by `make_row`; tokens, cost, answered, failed and
    the reason to stop are counted in `outcome`, as sync mode counts them."""

    def __init__(
        self,
        *,
        stage_uri: str,
        works: Sequence[Work],
        gen: GenerationSpec,
        api: BatchAPI,
        client: TeacherClient,
        writer: ShardWriter,
        outcome: Outcome,
        make_row: Callable[[Work, Completion], dict[str, Any]],
        budget: float | None,
        spent: float,
        worst_row_cost: float,
        stop: asyncio.Event,
        on_progress: Callable[[str, float], None],
    ) -> None:
        self.stage_uri = stage_uri
        self.works = {w.row.id: w for w in works}
        self.gen = gen
        self.teacher = api.teacher
        self.api = api
        self.client = client
        self.writer = writer
        self.outcome = outcome
        self.make_row = make_row
        self.budget = budget
        self.spent = spent
        self.groups_per_row = 1 if with_n(self.teacher) else gen.n_samples
        # At the sync price; a batch request costs batch_price_factor of it.
        self.worst_sync_request = worst_row_cost / self.groups_per_row
        self.stop = stop
        self.on_progress = on_progress
        self.result = BatchOutcome()
        self.answers: dict[str, dict[int, Completion]] = {}
        self.attempts: dict[str, int] = {}
        self.retry: list[Group] = []
        self.unanswered: set[str] = set()

    # ---- state

    def _state_uri(self, index: int) -> str:
        return f"{self.stage_uri}/{STATE_PREFIX}{index:05d}.json"

    def _save(self, state: BatchState) -> None:
        store.write_json(self._state_uri(state.index), state.to_json())

    def recorded(self) -> list[BatchState]:
        uris = [u for u in store.list_uris(f"{self.stage_uri}/batch/") if u.endswith(".json")]
        return sorted((BatchState.from_json(store.read_json(u)) for u in uris), key=lambda s: s.index)

    def _left(self, factor: float) -> float | None:
        """Requests of worst-case cost that still fit the budget (None: no budget)."""
        if self.budget is None or self.worst_sync_request <= 0:
            return None
        return (self.budget - self.spent) / (self.worst_sync_request * factor)

    # ---- flow

    async def run(self, todo: Sequence[Work]) -> BatchOutcome:
        self.unanswered = {w.row.id for w in todo}
        recorded = self.recorded()
        self.result.batches = recorded
        next_index = max((s.index for s in recorded), default=-1) + 1
        in_flight: set[str] = set()
        for state in recorded:
            if state.collected:
                continue
            if state.input_file_id is None and state.batch_id is None:
                # Killed before its upload was recorded: nothing was submitted, its prompts are asked anew.
                state.collected = True
                self._save(state)
                continue
            in_flight |= {g.row_id for g in state.groups}
            await self._finish(state)
            if self._halted():
                return self.result
        queue = sample_groups([w for w in todo if w.row.id not in in_flight], self.gen, self.teacher)
        queue = self._take_retries() + queue
        while queue and not self._halted():
            if len(queue) <= SYNC_RETRY_MAX and all(self.attempts.get(g.custom_id) for g in queue):
                await self._sync(queue)
                break
            take = affordable(queue, self._left(self.teacher.batch_price_factor))
            if take == 0:
                self.outcome.budget_stopped = True
                break
            state = BatchState(index=next_index, groups=list(queue[:take]))
            next_index += 1
            queue = queue[take:]
            self.result.batches.append(state)
            await self._submit(state)
            if state.batch_id is not None:
                await self._finish(state)
            queue = self._take_retries() + queue
        await self.writer.flush()
        return self.result

    def _halted(self) -> bool:
        return self.stop.is_set() or self.outcome.fatal is not None

    def _take_retries(self) -> list[Group]:
        retries, self.retry = self.retry, []
        return retries

    async def _submit(self, state: BatchState) -> None:
        lines = [self.api.line(g, self._messages(g), self.gen) for g in state.groups]
        try:
            state.input_file_id = await self.api.prepare(lines)
            if state.input_file_id is not None:
                state.status = "uploaded"
                self._save(state)
            created = await self.api.create(state.input_file_id, lines)
        except TeacherError as exc:
            self.outcome.fatal = exc
            return
        self._update(state, created)
        log.info("batch %s created: %d requests", state.batch_id, len(state.groups))

    def _messages(self, group: Group) -> list[dict[str, str]]:
        return self.works[group.row_id].row.teacher_messages(
            self.gen.system_prompt, self.gen.few_shot_turns()
        )

    def _update(self, state: BatchState, view: BatchView) -> None:
        if view.status != state.status:
            log.info("batch %s: %s", view.id, view.status)
        state.batch_id, state.status, state.counts = view.id, view.status, view.counts
        self._save(state)

    async def _finish(self, state: BatchState) -> None:
        """Poll `state`'s batch to its end and collect it; returns early on a stop or an error."""
        try:
            if state.batch_id is None:
                assert state.input_file_id is not None
                # Killed between creating the batch and recording it: find it rather than pay twice.
                found = await self.api.find(state.input_file_id)
                self._update(state, found or await self.api.create(state.input_file_id, []))
            view = await self._poll(state)
            if view is None:
                return
            if view.failed_because is not None:
                self.outcome.fatal = TeacherRejected(f"batch {view.id} failed: {view.failed_because}")
                return
            got = await self.api.results(view, [g.custom_id for g in state.groups])
        except TeacherError as exc:
            self.outcome.fatal = exc
            return
        self._take(state, got)
        # Shards first: a crash before the state says collected only collects the batch again (rows
        # already kept are skipped), never loses what it answered.
        await self.writer.flush()
        state.collected = True
        self._save(state)

    async def _poll(self, state: BatchState) -> BatchView | None:
        """The batch once it is final, or None when a stop came first."""
        assert state.batch_id is not None
        delay = POLL_FIRST_S
        while True:
            view = await self.api.retrieve(state.batch_id)
            self._update(state, view)
            self.on_progress(progress_detail(state, self.outcome.answered, len(self.works)), self.spent)
            if view.final:
                return view
            try:
                await asyncio.wait_for(self.stop.wait(), timeout=delay)
                return None
            except TimeoutError:
                delay = min(POLL_MAX_S, delay * POLL_FACTOR)

    def _take(self, state: BatchState, got: Collected) -> None:
        by_id = {g.custom_id: g for g in state.groups}
        self.spent += got.usage.cost_usd
        self.outcome.usage.add(got.usage)
        self.outcome.responses_without_usage += got.responses_without_usage
        self.result.unknown_results += got.unknown
        if got.unknown:
            log.warning("batch %s: %d results for requests never submitted", state.batch_id, got.unknown)
        for custom_id, completion in got.answers.items():
            self._answer(by_id[custom_id], completion)
        if got.rejected:
            custom_id, why = next(iter(got.rejected.items()))
            self.outcome.fatal = TeacherRejected(
                f"teacher {self.teacher.id} refused {len(got.rejected)} requests of batch {state.batch_id} "
                f"(prompt {by_id[custom_id].row_id}: {why})"
            )
        for custom_id in got.retry:
            self._failed(by_id[custom_id])

    def _failed(self, group: Group) -> None:
        tries = self.attempts[group.custom_id] = self.attempts.get(group.custom_id, 0) + 1
        if tries < MAX_ATTEMPTS:
            self.retry.append(group)
        elif group.row_id not in self.outcome.failed:
            self.outcome.failed.append(group.row_id)

    def _answer(self, group: Group, completion: Completion) -> None:
        parts = self.answers.setdefault(group.row_id, {})
        parts[group.first] = completion
        if len(parts) < self.groups_per_row:
            return
        merged = Completion(texts=[], finish_reasons=[])
        for first in sorted(parts):
            merged.texts += parts[first].texts
            merged.finish_reasons += parts[first].finish_reasons
            merged.usage.add(parts[first].usage)
        del self.answers[group.row_id]
        if group.row_id not in self.unanswered:
            return  # kept by an earlier attempt that collected this batch but died before recording so
        self.unanswered.discard(group.row_id)
        self.writer.buffer.append(self.make_row(self.works[group.row_id], merged))
        self.outcome.answered += 1

    async def _sync(self, groups: Sequence[Group]) -> None:
        """The last few failed requests, at the synchronous price, each within the budget."""
        self.result.retried_sync += len(groups)
        for group in groups:
            if self._halted():
                return
            left = self._left(1.0)
            if left is not None and left < 1:
                self.outcome.budget_stopped = True
                return
            try:
                completion = await self.client.complete(
                    self._messages(group),
                    n=group.n,
                    temperature=self.gen.temperature,
                    max_tokens=self.gen.max_tokens,
                    seed=group.seed,
                )
            except (TeacherAuthFailed, TeacherRejected) as exc:
                self.outcome.fatal = exc
                return
            except TeacherError as exc:
                log.warning("prompt %s failed: %s", group.row_id, exc)
                if group.row_id not in self.outcome.failed:
                    self.outcome.failed.append(group.row_id)
                continue
            self.spent += completion.usage.cost_usd
            self.outcome.usage.add(completion.usage)
            self._answer(group, completion)
