"""The providers' batch APIs behind one interface, for `kubedistill_trainer.batch`.

    api = open_batch_api(teacher, api_key)           # by the catalog's batchAPI
    file_id = await api.prepare(lines)               # OpenAI: the uploaded JSONL; Anthropic: None
    view = await api.create(file_id, lines)          # a BatchView: id, status, counts
    view = await api.retrieve(view.id)
    got = await api.results(view, submitted_ids)     # a Collected: answers by custom_id, retries...

- `openai` (OpenAI and compatible servers): `/v1/files` (purpose batch) + `/v1/batches` (24h window);
  results in an output and an error file. A batch whose creation was not recorded can be found again
  by its input file (`find`).
- `anthropic`: Message Batches (`/v1/messages/batches`, requests inline, `x-api-key`); results as one
  JSONL of succeeded / errored / expired / canceled lines. Anthropic has no `n` and no seed: one
  request per sample. Its batches cannot be found again by content, so a pod killed between creating
  a batch and recording its id would submit it again on the rerun. No `cache_control` is sent, so
  nothing is written to its prompt cache (reads reported anyway are priced as cached input).

Control calls retry transient errors (429, 5xx, connection errors) with backoff; 401/403 raise
TeacherAuthFailed, other 4xx TeacherRejected. The key is sent only in a header and scrubbed from
error texts.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from kubedistill.api.models import GenerationSpec
from kubedistill.catalog import ResolvedTeacher
from kubedistill_trainer.teacher import (
    Completion,
    MalformedCompletion,
    Messages,
    TeacherAuthFailed,
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
    from kubedistill_trainer.batch import Group

ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"
ANTHROPIC_VERSION = "2023-06-01"
# Per-request HTTP statuses in an error file worth another try (other 4xx are the request's fault).
RETRYABLE_STATUSES = frozenset({408, 409, 429})


@dataclass
class BatchView:
    """A batch as the provider reports it; counts as {total, completed, failed}."""

    id: str
    status: str
    counts: dict[str, int]
    final: bool
    failed_because: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class Collected:
    """A finished batch's results, mapped back to its requests."""

    answers: dict[str, Completion] = field(default_factory=dict)
    retry: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    unknown: int = 0
    usage: Usage = field(default_factory=Usage)
    responses_without_usage: int = 0

    def answered(self, custom_id: str, completion: Completion | None, wanted: set[str]) -> None:
        """One result line: paid for whenever it carries usage, an answer only for a request still wanted
        (a custom_id never submitted, or answered twice, is counted as unknown)."""
        if completion is not None:
            if not completion.usage.calls:
                self.responses_without_usage += 1
                completion.usage.calls = 1
            self.usage.add(completion.usage)
        if custom_id not in wanted:
            self.unknown += 1
            return
        wanted.discard(custom_id)
        if completion is None:
            self.retry.append(custom_id)
        else:
            self.answers[custom_id] = completion


class BatchAPI(Protocol):
    teacher: ResolvedTeacher

    def line(self, group: Group, messages: Messages, gen: GenerationSpec) -> dict[str, Any]: ...

    async def prepare(self, lines: Sequence[Mapping[str, Any]]) -> str | None: ...

    async def create(self, input_file_id: str | None, lines: Sequence[Mapping[str, Any]]) -> BatchView: ...

    async def retrieve(self, batch_id: str) -> BatchView: ...

    async def find(self, input_file_id: str) -> BatchView | None: ...

    async def results(self, view: BatchView, submitted: Sequence[str]) -> Collected: ...

    async def aclose(self) -> None: ...


def open_batch_api(teacher: ResolvedTeacher, api_key: str | None, *, timeout: float = 120.0) -> BatchAPI:
    if teacher.batch_api == "anthropic":
        return AnthropicBatches(teacher, api_key, timeout=timeout)
    return OpenAIBatches(teacher, api_key, timeout=timeout)


class _Http:
    """The control-call transport both providers share."""

    def __init__(
        self,
        teacher: ResolvedTeacher,
        api_key: str | None,
        headers: Mapping[str, str],
        *,
        timeout: float,
        max_retries: int = 8,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
    ) -> None:
        if not teacher.base_url:
            raise TeacherError(f"no base URL for teacher {teacher.id}: set teacher.baseURL")
        self.teacher = teacher
        self._api_key = api_key
        self._http = httpx.AsyncClient(
            base_url=teacher.base_url.rstrip("/") + "/",
            headers=dict(headers),
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

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
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

    async def jsonl(self, path: str) -> list[dict[str, Any]]:
        text = (await self.call("GET", path)).text
        return [json.loads(line) for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ OpenAI


def openai_view(batch: Mapping[str, Any]) -> BatchView:
    counts = {k: int(v) for k, v in (batch.get("request_counts") or {}).items()}
    status = str(batch.get("status", "validating"))
    errors = (batch.get("errors") or {}).get("data") or []
    why = "; ".join(str(e.get("message")) for e in errors[:3]) or "no reason given"
    return BatchView(
        id=str(batch["id"]),
        status=status,
        counts=counts,
        final=status in ("completed", "failed", "expired", "cancelled"),
        failed_because=why if status == "failed" else None,
        raw=dict(batch),
    )


def openai_collect(
    output: Sequence[Mapping[str, Any]],
    errors: Sequence[Mapping[str, Any]],
    submitted: Sequence[str],
    teacher: ResolvedTeacher,
) -> Collected:
    """Output lines answer requests; error lines and requests in neither file (a cancelled or expired
    batch) are retried, except 4xx answers, which are rejections."""
    wanted = set(submitted)
    out = Collected()
    for line in output:
        out.answered(str(line.get("custom_id")), _openai_completion(line, teacher), wanted)
    for line in errors:
        custom_id = str(line.get("custom_id"))
        if custom_id not in wanted:
            continue
        wanted.discard(custom_id)
        response = line.get("response")
        status = int(response.get("status_code") or 0) if isinstance(response, Mapping) else 0
        if isinstance(response, Mapping) and 400 <= status < 500 and status not in RETRYABLE_STATUSES:
            out.rejected[custom_id] = f"HTTP {status}: {_error_message(response.get('body'))}"
        else:
            out.retry.append(custom_id)
    out.retry += [c for c in submitted if c in wanted]
    return out


def _openai_completion(line: Mapping[str, Any], teacher: ResolvedTeacher) -> Completion | None:
    """The chat completion an output line carries, or None (not a 200, malformed)."""
    response = line.get("response")
    if not isinstance(response, Mapping) or response.get("status_code") != 200:
        return None
    try:
        return parse_completion(response.get("body"), teacher, batch=True)
    except MalformedCompletion:
        return None


def _error_message(body: Any) -> str:
    error = body.get("error") if isinstance(body, Mapping) else None
    if isinstance(error, Mapping) and isinstance(error.get("error"), Mapping):
        error = error["error"]  # Anthropic nests {"type": "error", "error": {...}}
    message = error.get("message") if isinstance(error, Mapping) else body
    return str(message)[:200]


def openai_line(
    teacher: ResolvedTeacher, group: Group, messages: Messages, gen: GenerationSpec
) -> dict[str, Any]:
    """One line of the input file: the body sync mode would POST to /chat/completions."""
    body = request_body(teacher, messages, group.n, gen.temperature, gen.max_tokens, group.seed)
    return {"custom_id": group.custom_id, "method": "POST", "url": ENDPOINT, "body": body}


class OpenAIBatches(_Http):
    def __init__(self, teacher: ResolvedTeacher, api_key: str | None, *, timeout: float = 120.0) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        super().__init__(teacher, api_key, headers, timeout=timeout)

    def line(self, group: Group, messages: Messages, gen: GenerationSpec) -> dict[str, Any]:
        return openai_line(self.teacher, group, messages, gen)

    async def prepare(self, lines: Sequence[Mapping[str, Any]]) -> str | None:
        content = "".join(json.dumps(line) + "\n" for line in lines).encode()
        files = {"file": ("requests.jsonl", content, "application/jsonl")}
        response = await self.call("POST", "files", data={"purpose": "batch"}, files=files)
        return str(response.json()["id"])

    async def create(self, input_file_id: str | None, lines: Sequence[Mapping[str, Any]]) -> BatchView:
        body = {"input_file_id": input_file_id, "endpoint": ENDPOINT, "completion_window": COMPLETION_WINDOW}
        return openai_view((await self.call("POST", "batches", json=body)).json())

    async def retrieve(self, batch_id: str) -> BatchView:
        return openai_view((await self.call("GET", f"batches/{batch_id}")).json())

    async def find(self, input_file_id: str) -> BatchView | None:
        """The batch made from `input_file_id`, if one was created (among the 100 newest)."""
        listing = (await self.call("GET", "batches", params={"limit": 100})).json()
        found = next((b for b in listing.get("data", []) if b.get("input_file_id") == input_file_id), None)
        return openai_view(found) if found else None

    async def results(self, view: BatchView, submitted: Sequence[str]) -> Collected:
        output_file, error_file = view.raw.get("output_file_id"), view.raw.get("error_file_id")
        output = await self.jsonl(f"files/{output_file}/content") if output_file else []
        errors = await self.jsonl(f"files/{error_file}/content") if error_file else []
        return openai_collect(output, errors, submitted, self.teacher)


# --------------------------------------------------------------------------------------- Anthropic


def anthropic_params(teacher: ResolvedTeacher, messages: Messages, gen: GenerationSpec) -> dict[str, Any]:
    """A Messages API request: system turns go to `system`; no n, no seed (the API has neither)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    params: dict[str, Any] = {
        "model": teacher.api_model,
        "max_tokens": gen.max_tokens,
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"],
    }
    if system:
        params["system"] = system
    if teacher.supports_temperature:
        params["temperature"] = gen.temperature
    return params


def anthropic_view(batch: Mapping[str, Any]) -> BatchView:
    raw = {k: int(v) for k, v in (batch.get("request_counts") or {}).items()}
    failed = raw.get("errored", 0) + raw.get("expired", 0) + raw.get("canceled", 0)
    status = str(batch.get("processing_status", "in_progress"))
    return BatchView(
        id=str(batch["id"]),
        status=status,
        counts={"total": sum(raw.values()), "completed": raw.get("succeeded", 0), "failed": failed},
        final=status == "ended",
        raw=dict(batch),
    )


def anthropic_completion(message: Any, teacher: ResolvedTeacher) -> Completion:
    """A Message as a one-sample Completion priced from its usage: `input_tokens` excludes the cache
    reads and writes, which Anthropic reports apart."""
    try:
        text = "".join(b.get("text", "") for b in message["content"] if b.get("type") == "text")
        usage = message.get("usage") or {}
        uncached = int(usage.get("input_tokens") or 0) + int(usage.get("cache_creation_input_tokens") or 0)
        cached = int(usage.get("cache_read_input_tokens") or 0)
        output = int(usage.get("output_tokens") or 0)
    except (KeyError, TypeError, AttributeError, ValueError):
        raise MalformedCompletion("malformed message") from None
    return Completion(
        texts=[text],
        finish_reasons=[str(message.get("stop_reason") or "")],
        usage=Usage(
            calls=1 if usage else 0,
            input_tokens=uncached + cached,
            output_tokens=output,
            cost_usd=teacher.cost(uncached + cached, output, cached_tokens=cached, batch=True),
            cached_input_tokens=cached,
        ),
    )


def anthropic_collect(
    lines: Sequence[Mapping[str, Any]], submitted: Sequence[str], teacher: ResolvedTeacher
) -> Collected:
    """Succeeded lines answer requests; expired, canceled and server-side errors are retried; an
    invalid request is a rejection."""
    wanted = set(submitted)
    out = Collected()
    for line in lines:
        custom_id = str(line.get("custom_id"))
        found = line.get("result")
        result: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
        kind = result.get("type")
        if kind == "succeeded":
            try:
                completion: Completion | None = anthropic_completion(result.get("message"), teacher)
            except MalformedCompletion:
                completion = None
            out.answered(custom_id, completion, wanted)
            continue
        if custom_id not in wanted:
            out.unknown += 1
            continue
        wanted.discard(custom_id)
        error = result.get("error") if kind == "errored" else None
        inner = error.get("error") if isinstance(error, Mapping) else None
        if isinstance(inner, Mapping) and inner.get("type") == "invalid_request_error":
            out.rejected[custom_id] = f"{inner.get('type')}: {str(inner.get('message'))[:200]}"
        else:
            out.retry.append(custom_id)
    out.retry += [c for c in submitted if c in wanted]
    return out


class AnthropicBatches(_Http):
    def __init__(self, teacher: ResolvedTeacher, api_key: str | None, *, timeout: float = 120.0) -> None:
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        super().__init__(teacher, api_key, headers, timeout=timeout)

    def line(self, group: Group, messages: Messages, gen: GenerationSpec) -> dict[str, Any]:
        return {"custom_id": group.custom_id, "params": anthropic_params(self.teacher, messages, gen)}

    async def prepare(self, lines: Sequence[Mapping[str, Any]]) -> str | None:
        return None  # requests go inline with the batch

    async def create(self, input_file_id: str | None, lines: Sequence[Mapping[str, Any]]) -> BatchView:
        return anthropic_view(
            (await self.call("POST", "messages/batches", json={"requests": list(lines)})).json()
        )

    async def retrieve(self, batch_id: str) -> BatchView:
        return anthropic_view((await self.call("GET", f"messages/batches/{batch_id}")).json())

    async def find(self, input_file_id: str) -> BatchView | None:
        return None  # never called: Anthropic batches have no input file

    async def results(self, view: BatchView, submitted: Sequence[str]) -> Collected:
        lines = await self.jsonl(f"messages/batches/{view.id}/results")
        return anthropic_collect(lines, submitted, self.teacher)
