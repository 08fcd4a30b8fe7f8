"""Batch mode of generate (`teacher.mode: batch`): the provider's Batch API at its batch price.

For an OpenAI-compatible provider (catalog `batchAPI: openai`):

1. every prompt becomes one request per sample group — one with `n` where the provider supports it,
   else one per sample with `seed + i`, exactly the requests sync mode sends — as a JSONL line
   `{custom_id, method, url, body}`;
2. the file is uploaded (`/v1/files`, purpose `batch`) and a batch created (`/v1/batches`, 24h);
3. the batch is polled with backoff until it ends; the output and error files are downloaded and
   mapped back by `custom_id`; answered prompts go to the same candidate shards as sync mode;
4. requests that failed inside the batch (5xx/429 in the error file, `batch_expired`, never run)
   are retried — in a follow-up batch, or synchronously when few are left — at most
   MAX_ATTEMPTS times; a 4xx is the request's own fault and fails the stage (TeacherRejected).
   An output line whose `custom_id` was never submitted is counted (`unknownResults`) and billed.

Resumable: `<stage>/batch/batch-NNNNN.json` records each batch's requests, input file id and batch
id as soon as each exists, before any polling. A rerun after a crash or a SIGTERM finishes the
batches recorded there — polling them, never submitting them again — before it submits anything
new; a batch whose creation was not recorded is looked up by its input file first.

Budget: a batch is submitted only when its worst case (the longest prompt, `maxTokens` per sample,
at the batch price) fits what the budget has left, so a budget smaller than the whole job splits it
into batches submitted one after another, each sized to what is left after the previous one's
actual cost; when not even one request fits, nothing is submitted and the stage stops with
BudgetExceeded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from kubedistill import store
from kubedistill.api.models import GenerationSpec
from kubedistill.catalog import ResolvedTeacher
from kubedistill_trainer.teacher import (
    Completion,
    MalformedCompletion,
    TeacherAuthFailed,
    TeacherClient,
    TeacherError,
    TeacherRejected,
    Usage,
    backoff_delay,
    env_proxy,
    parse_completion,
    request_body,
    retry_after_seconds,
)

if TYPE_CHECKING:
    # generate runs this module: at run time the names come from it, not the other way round.
    from kubedistill_trainer.generate import Outcome, ShardWriter, Work

log = logging.getLogger(__name__)

STATE_PREFIX = "batch/batch-"
ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"
# OpenAI's limit on requests per batch.
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
# Batch states after which nothing more will be answered.
FINAL_STATES = frozenset({"completed", "failed", "expired", "cancelled"})
# Per-request HTTP statuses in the error file worth another try (the rest are the request's fault).
RETRYABLE_STATUSES = frozenset({408, 409, 429})


# ------------------------------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class Group:
    """One request: `n` samples of one prompt, starting at sample `first`."""

    custom_id: str
    row_id: str
    first: int
    n: int
    seed: int | None


def sample_groups(works: Sequence[Work], gen: GenerationSpec, teacher: ResolvedTeacher) -> list[Group]:
    """The requests sync mode would send for `works`: one with n, or n with seed + i."""
    groups: list[Group] = []
    for k, work in enumerate(works):
        if teacher.supports_n:
            groups.append(Group(f"p{k}-s0", work.row.id, 0, gen.n_samples, gen.seed))
            continue
        for i in range(gen.n_samples):
            seed = None if gen.seed is None else gen.seed + i
            groups.append(Group(f"p{k}-s{i}", work.row.id, i, 1, seed))
    return groups


def batch_line(group: Group, work: Work, gen: GenerationSpec, teacher: ResolvedTeacher) -> dict[str, Any]:
    messages = work.row.teacher_messages(gen.system_prompt, gen.few_shot_turns())
    body = request_body(teacher, messages, group.n, gen.temperature, gen.max_tokens, group.seed)
    return {"custom_id": group.custom_id, "method": "POST", "url": ENDPOINT, "body": body}


def affordable(groups: Sequence[Group], fit: float | None) -> int:
    """How many of `groups` one batch may hold: at most MAX_BATCH_REQUESTS, and at most `fit`
    requests at their worst case (None: no budget)."""
    cap = min(len(groups), MAX_BATCH_REQUESTS)
    return cap if fit is None else max(0, min(cap, math.floor(fit + 1e-9)))


@dataclass
class Collected:
    """A finished batch's results, mapped back to its requests."""

    answers: dict[str, Completion] = field(default_factory=dict)
    retry: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    unknown: int = 0
    usage: Usage = field(default_factory=Usage)
    responses_without_usage: int = 0


def collect(
    output: Sequence[Mapping[str, Any]],
    errors: Sequence[Mapping[str, Any]],
    submitted: Sequence[str],
    teacher: ResolvedTeacher,
) -> Collected:
    """Output lines answer requests; error lines and requests in neither file (a cancelled or expired
    batch) are retried, except 4xx answers, which are rejections. A line for a custom_id that was
    never submitted (or answered twice) is counted and, being paid for, its usage kept."""
    wanted = set(submitted)
    out = Collected()
    for line in output:
        custom_id = str(line.get("custom_id"))
        completion = _completion(line, teacher)
        if completion is not None:
            if not completion.usage.calls:
                out.responses_without_usage += 1
                completion.usage.calls = 1
            out.usage.add(completion.usage)
        if custom_id not in wanted:
            out.unknown += 1
            continue
        wanted.discard(custom_id)
        if completion is None:
            out.retry.append(custom_id)
        else:
            out.answers[custom_id] = completion
    for line in errors:
        custom_id = str(line.get("custom_id"))
        if custom_id not in wanted:
            continue
        wanted.discard(custom_id)
        response = line.get("response") or {}
        status = int(response.get("status_code") or 0) if isinstance(response, Mapping) else 0
        if 400 <= status < 500 and status not in RETRYABLE_STATUSES:
            body = response.get("body") or {}
            error = body.get("error") if isinstance(body, Mapping) else None
            message = error.get("message") if isinstance(error, Mapping) else str(body)
            out.rejected[custom_id] = f"HTTP {status}: {str(message)[:200]}"
        else:
            out.retry.append(custom_id)
    out.retry += [c for c in submitted if c in wanted]
    return out


def _completion(line: Mapping[str, Any], teacher: ResolvedTeacher) -> Completion | None:
    """The chat completion an output line carries, or None when it carries none (not a 200, malformed)."""
    response = line.get("response")
    if not isinstance(response, Mapping) or response.get("status_code") != 200:
        return None
    try:
        return parse_completion(response.get("body"), teacher, batch=True)
    except MalformedCompletion:
        return None


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


# --------------------------------------------------------------------------------------- the API


class BatchAPI:
    """The provider's files and batches endpoints, with the client's retry policy for transient
    errors (429, 5xx, connection errors); the key goes only into the Authorization header."""

    def __init__(
        self,
        teacher: ResolvedTeacher,
        api_key: str | None,
        *,
        timeout: float = 120.0,
        max_retries: int = 8,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
    ) -> None:
        if not teacher.base_url:
            raise TeacherError(f"no base URL for teacher {teacher.id}: set teacher.baseURL")
        self.teacher = teacher
        self._api_key = api_key
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=teacher.base_url.rstrip("/") + "/",
            headers=headers,
            timeout=timeout,
            proxy=env_proxy(teacher.base_url),
            trust_env=False,
        )
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._rng = random.Random()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        last = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                last = f"connection error ({type(exc).__name__})"
            else:
                status = response.status_code
                if status in (401, 403):
                    raise TeacherAuthFailed(
                        f"teacher {self.teacher.id} at {self.teacher.base_url} refused the API key "
                        f"(HTTP {status}); check the Secret named by teacher.apiKeySecretRef"
                    )
                if status < 400:
                    return response
                if status != 429 and status < 500:
                    text = response.text[:300]
                    if self._api_key:
                        text = text.replace(self._api_key, "***")
                    raise TeacherRejected(f"{method} {path} refused: HTTP {status}: {text}")
                last, retry_after = f"HTTP {status}", retry_after_seconds(response.headers)
            if attempt < self.max_retries:
                delay = backoff_delay(attempt, self.backoff_base, self.backoff_cap, self._rng)
                await asyncio.sleep(delay if retry_after is None else retry_after)
        raise TeacherError(f"{method} {path} at {self.teacher.base_url} failed (last: {last})")

    async def upload(self, content: bytes) -> str:
        files = {"file": ("requests.jsonl", content, "application/jsonl")}
        response = await self._call("POST", "files", data={"purpose": "batch"}, files=files)
        return str(response.json()["id"])

    async def create(self, input_file_id: str) -> dict[str, Any]:
        body = {"input_file_id": input_file_id, "endpoint": ENDPOINT, "completion_window": COMPLETION_WINDOW}
        return dict((await self._call("POST", "batches", json=body)).json())

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        return dict((await self._call("GET", f"batches/{batch_id}")).json())

    async def find(self, input_file_id: str) -> dict[str, Any] | None:
        """The batch made from `input_file_id`, if one was created (among the 100 newest)."""
        listing = (await self._call("GET", "batches", params={"limit": 100})).json()
        return next((b for b in listing.get("data", []) if b.get("input_file_id") == input_file_id), None)

    async def lines(self, file_id: str | None) -> list[dict[str, Any]]:
        if not file_id:
            return []
        text = (await self._call("GET", f"files/{file_id}/content")).text
        return [json.loads(line) for line in text.splitlines() if line.strip()]


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
        self.groups_per_row = 1 if self.teacher.supports_n else gen.n_samples
        # At the sync price; a batch request costs batch_price_factor of it.
        self.worst_sync_request = worst_row_cost / self.groups_per_row
        self.stop = stop
        self.on_progress = on_progress
        self.result = BatchOutcome()
        self.answers: dict[str, dict[int, Completion]] = {}
        self.attempts: dict[str, int] = {}
        self.retry: list[Group] = []

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
        recorded = self.recorded()
        self.result.batches = recorded
        next_index = max((s.index for s in recorded), default=-1) + 1
        in_flight: set[str] = set()
        for state in recorded:
            if state.collected:
                continue
            if state.input_file_id is None:
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
            await self.writer.flush()
            queue = self._take_retries() + queue
        await self.writer.flush()
        return self.result

    def _halted(self) -> bool:
        return self.stop.is_set() or self.outcome.fatal is not None

    def _take_retries(self) -> list[Group]:
        retries, self.retry = self.retry, []
        return retries

    async def _submit(self, state: BatchState) -> None:
        content = "".join(
            json.dumps(batch_line(g, self.works[g.row_id], self.gen, self.teacher)) + "\n"
            for g in state.groups
        ).encode()
        try:
            state.input_file_id = await self.api.upload(content)
            state.status = "uploaded"
            self._save(state)
            created = await self.api.create(state.input_file_id)
        except TeacherError as exc:
            self.outcome.fatal = exc
            return
        self._update(state, created)
        log.info("batch %s created: %d requests", state.batch_id, len(state.groups))

    def _update(self, state: BatchState, batch: Mapping[str, Any]) -> None:
        state.batch_id = str(batch["id"])
        state.status = str(batch.get("status", "validating"))
        state.counts = {k: int(v) for k, v in (batch.get("request_counts") or {}).items()}
        self._save(state)

    async def _finish(self, state: BatchState) -> None:
        """Poll `state`'s batch to its end and collect it; returns early on a stop or an error."""
        try:
            if state.batch_id is None:
                assert state.input_file_id is not None
                # Killed between creating the batch and recording it: find it rather than pay twice.
                found = await self.api.find(state.input_file_id)
                self._update(state, found or await self.api.create(state.input_file_id))
            batch = await self._poll(state)
            if batch is None:
                return
            if state.status == "failed":
                errors = (batch.get("errors") or {}).get("data") or []
                why = "; ".join(str(e.get("message")) for e in errors[:3]) or "no reason given"
                self.outcome.fatal = TeacherRejected(f"batch {state.batch_id} failed: {why}")
                return
            output = await self.api.lines(batch.get("output_file_id"))
            error_lines = await self.api.lines(batch.get("error_file_id"))
        except TeacherError as exc:
            self.outcome.fatal = exc
            return
        self._take(state, collect(output, error_lines, [g.custom_id for g in state.groups], self.teacher))
        state.collected = True
        self._save(state)

    async def _poll(self, state: BatchState) -> dict[str, Any] | None:
        """The batch once it is final, or None when a stop came first."""
        assert state.batch_id is not None
        delay = POLL_FIRST_S
        while True:
            batch = await self.api.retrieve(state.batch_id)
            if batch.get("status") != state.status:
                log.info("batch %s: %s", state.batch_id, batch.get("status"))
            self._update(state, batch)
            self.on_progress(progress_detail(state, self.outcome.answered, len(self.works)), self.spent)
            if state.status in FINAL_STATES:
                return batch
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
            work = self.works[group.row_id]
            try:
                completion = await self.client.complete(
                    work.row.teacher_messages(self.gen.system_prompt, self.gen.few_shot_turns()),
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
