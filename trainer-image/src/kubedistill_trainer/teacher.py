"""Async client for any OpenAI-compatible `/chat/completions` endpoint: teachers and LLM judges.

    async with TeacherClient(resolved, api_key=key, max_concurrency=64) as client:
        completion = await client.complete(messages, n=4, temperature=0.8, max_tokens=512)
        completion.texts, completion.usage.cost_usd, client.usage

- `n` samples in one request when the catalog says the provider supports it (the prompt is billed
  once); otherwise n requests, with `seed + i` so seeded samples still differ. A provider that
  returns fewer choices than asked is asked again for the rest.
- At most `max_concurrency` requests in flight; optional requests-per-minute and tokens-per-minute
  token buckets (tokens reserved from an estimate before a request, corrected by the real usage).
- Retries with exponential backoff and full jitter on 429, 5xx, connection errors and timeouts,
  honouring `retry-after-ms` / `Retry-After`; a concurrency slot is not held while waiting. 401/403 and other
  4xx fail at once (`TeacherAuthFailed`, `TeacherRejected`); after a 401/403 nothing more is sent.
- `abort()` stops new sends (waiting requests raise `TeacherAborted`); requests already sent finish.
- Usage is taken from each successful response; cost = uncached input × input price + cached input
  (`prompt_tokens_details.cached_tokens`) × cached price + output × output price. Failed calls
  cost nothing and are not counted. `client.usage` holds the totals.
- Each successful request's latency (sent → answer read, queueing in the server included) is kept in
  `client.latencies`; a llama.cpp server's own per-response `timings` are summed in `client.engine`.

The API key is sent only in the Authorization header; error messages never contain it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlparse

import httpx

from kubedistill.catalog import ResolvedTeacher
from kubedistill_trainer.speed import EngineTimings

log = logging.getLogger(__name__)

Messages = Sequence[dict[str, str]]


class TeacherError(Exception):
    reason = "TeacherUnavailable"


class TeacherAuthFailed(TeacherError):
    reason = "TeacherAuthFailed"


class TeacherRejected(TeacherError):
    reason = "TeacherRejected"


class TeacherAborted(TeacherError):
    """The client was aborted before this request was sent: nothing was asked, nothing is owed."""

    reason = "Interrupted"


@dataclass
class Usage:
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    # Part of input_tokens that the provider read from its prompt cache (billed at the cached price).
    cached_input_tokens: int = 0

    def add(self, other: Usage) -> None:
        self.calls += other.calls
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cost_usd += other.cost_usd
        self.cached_input_tokens += other.cached_input_tokens


@dataclass
class Completion:
    texts: list[str]
    finish_reasons: list[str]
    usage: Usage = field(default_factory=Usage)


class TokenBucket:
    """`rate_per_minute` units per minute, bursting up to one minute's worth; debt allowed."""

    def __init__(self, rate_per_minute: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(rate_per_minute)
        self.rate = rate_per_minute / 60.0
        self.level = self.capacity
        self.clock = clock
        self.updated = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    async def acquire(self, amount: float) -> None:
        amount = min(amount, self.capacity)
        async with self._lock:
            while True:
                self._refill()
                if self.level >= amount:
                    self.level -= amount
                    return
                await asyncio.sleep((amount - self.level) / self.rate)

    def adjust(self, delta: float) -> None:
        """Give back (negative delta) or take more (positive) once the real amount is known."""
        self._refill()
        self.level = min(self.capacity, self.level - delta)


def retry_after_seconds(headers: httpx.Headers) -> float | None:
    """retry-after-ms (OpenAI, Azure) or Retry-After as seconds or an HTTP date."""
    if ms := headers.get("retry-after-ms"):
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def env_proxy(url: str) -> str | None:
    """The proxy that HTTPS_PROXY / HTTP_PROXY / ALL_PROXY name for `url`, unless NO_PROXY exempts its
    host — what httpx.AsyncClient(trust_env=True) would use; the bare transports need it spelt out."""
    parsed = urlparse(url)
    if parsed.hostname and urllib.request.proxy_bypass(parsed.hostname):
        return None
    proxies = urllib.request.getproxies()
    return proxies.get(parsed.scheme) or proxies.get("all")


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(cap, base·2^attempt)]."""
    return rng.uniform(0.0, min(cap, base * 2**attempt))


def estimate_tokens(messages: Messages, chars_per_token: float) -> int:
    return int(sum(len(m.get("content", "")) for m in messages) / chars_per_token) + 4 * len(messages)


def request_body(
    teacher: ResolvedTeacher,
    messages: Messages,
    n: int,
    temperature: float,
    max_tokens: int,
    seed: int | None,
) -> dict[str, Any]:
    """The `/chat/completions` body for n samples of one prompt: sent as is, or as one batch line."""
    body: dict[str, Any] = {
        "model": teacher.api_model,
        "messages": list(messages),
        teacher.max_tokens_param: max_tokens,
    }
    if teacher.supports_temperature:
        body["temperature"] = temperature
    if n > 1:
        body["n"] = n
    if seed is not None:
        body["seed"] = seed
    return body


class _Retryable(Exception):
    def __init__(self, kind: str, retry_after: float | None = None) -> None:
        super().__init__(kind)
        self.kind = kind
        self.retry_after = retry_after


class TeacherClient:
    def __init__(
        self,
        teacher: ResolvedTeacher,
        *,
        api_key: str | None = None,
        max_concurrency: int = 16,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        timeout: float = 120.0,
        max_retries: int = 8,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        seed: int | None = None,
    ) -> None:
        if not teacher.base_url:
            raise TeacherError(f"no base URL for teacher {teacher.id}: set teacher.baseURL")
        self.teacher = teacher
        self.url = httpx.URL(teacher.base_url.rstrip("/") + "/chat/completions")
        self._api_key = api_key
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.timeout = timeout
        self.usage = Usage()
        self.retries: Counter[str] = Counter()
        # Responses without a usage block (some self-hosted servers): their cost is unknown, not 0.
        self.responses_without_usage = 0
        self.latencies: list[float] = []
        self.engine = EngineTimings()
        self._aborted = False
        self._rpm = TokenBucket(requests_per_minute) if requests_per_minute else None
        self._tpm = TokenBucket(tokens_per_minute) if tokens_per_minute else None
        self._rng = random.Random(seed)
        self._headers = {"content-type": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._timeouts = {"connect": min(timeout, 10.0), "read": timeout, "write": timeout, "pool": timeout}
        # One single-connection transport per concurrency slot, used without httpx.AsyncClient: a
        # shared httpcore pool scans every connection under one lock per request (~5x the CPU at 64
        # connections), and the client layer (auth, redirects, cookies, hooks) is unused here.
        tls = httpx.create_ssl_context()  # certifi, or SSL_CERT_FILE / SSL_CERT_DIR: as httpx.AsyncClient
        proxy = env_proxy(teacher.base_url)
        self._transports = [
            httpx.AsyncHTTPTransport(
                verify=tls, proxy=proxy, limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)
            )
            for _ in range(max_concurrency)
        ]
        self._slots: asyncio.Queue[httpx.AsyncHTTPTransport] = asyncio.Queue()
        for transport in self._transports:
            self._slots.put_nowait(transport)

    async def __aenter__(self) -> TeacherClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for transport in self._transports:
            await transport.aclose()

    def abort(self) -> None:
        """Send nothing new: requests waiting for a slot or a retry raise TeacherAborted; those
        already sent finish normally (they are paid for)."""
        self._aborted = True

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    async def complete(
        self,
        messages: Messages,
        *,
        n: int = 1,
        temperature: float = 1.0,
        max_tokens: int = 512,
        seed: int | None = None,
    ) -> Completion:
        """n samples for one prompt; raises TeacherError when the retries are exhausted."""
        result = Completion(texts=[], finish_reasons=[])
        if self.teacher.supports_n:
            # Guard against a provider that keeps returning fewer choices than asked.
            for _ in range(n):
                missing = n - len(result.texts)
                if missing <= 0:
                    break
                self._merge(result, await self._request(messages, missing, temperature, max_tokens, seed))
            if len(result.texts) < n:
                raise TeacherError(f"teacher returned {len(result.texts)} of {n} samples")
            return result
        parts = await asyncio.gather(
            *(
                self._request(messages, 1, temperature, max_tokens, None if seed is None else seed + i)
                for i in range(n)
            )
        )
        for part in parts:
            self._merge(result, part)
        return result

    @staticmethod
    def _merge(into: Completion, part: Completion) -> None:
        into.texts += part.texts
        into.finish_reasons += part.finish_reasons
        into.usage.add(part.usage)

    async def _request(
        self, messages: Messages, n: int, temperature: float, max_tokens: int, seed: int | None
    ) -> Completion:
        content = json.dumps(request_body(self.teacher, messages, n, temperature, max_tokens, seed)).encode()
        reserved = (
            estimate_tokens(messages, self.teacher.chars_per_token) + max_tokens * n if self._tpm else 0
        )
        last = ""
        for attempt in range(self.max_retries + 1):
            if self._rpm:
                await self._rpm.acquire(1)
            if self._tpm:
                await self._tpm.acquire(reserved)
            try:
                transport = await self._slots.get()
                if self._aborted:
                    self._slots.put_nowait(transport)
                    raise TeacherAborted("aborted before sending")
                try:
                    completion = await self._send(transport, content)
                finally:
                    self._slots.put_nowait(transport)
            except _Retryable as exc:
                if self._tpm:
                    self._tpm.adjust(-reserved)
                self.retries[exc.kind] += 1
                last = exc.kind
                if attempt == self.max_retries:
                    break
                delay = backoff_delay(attempt, self.backoff_base, self.backoff_cap, self._rng)
                if exc.retry_after is not None:
                    delay = exc.retry_after + self._rng.uniform(0, 0.1 * exc.retry_after + 0.01)
                log.debug("teacher %s, retry %d in %.2fs", exc.kind, attempt + 1, delay)
                await asyncio.sleep(delay)
                continue
            used = completion.usage.input_tokens + completion.usage.output_tokens
            if self._tpm:
                self._tpm.adjust(used - reserved)
            self.usage.add(completion.usage)
            return completion
        raise TeacherError(
            f"teacher {self.teacher.id} at {self.teacher.base_url} failed after {self.max_retries + 1} attempts "
            f"(last: {last})"
        )

    async def _post(self, transport: httpx.AsyncHTTPTransport, content: bytes) -> httpx.Response:
        request = httpx.Request(
            "POST", self.url, headers=self._headers, content=content, extensions={"timeout": self._timeouts}
        )
        response = await transport.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    async def _send(self, transport: httpx.AsyncHTTPTransport, content: bytes) -> Completion:
        sent = time.perf_counter()
        try:
            response = await self._post(transport, content)
        except httpx.TimeoutException:
            raise _Retryable("timeout") from None
        except httpx.TransportError as exc:
            raise _Retryable(f"connection error ({type(exc).__name__})") from None
        status = response.status_code
        if status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status}", retry_after_seconds(response.headers))
        if status in (401, 403):
            # Every later request would be refused alike: stop sending before another slot frees.
            self._aborted = True
            raise TeacherAuthFailed(
                f"teacher {self.teacher.id} at {self.teacher.base_url} refused the API key (HTTP {status}); "
                "check the Secret named by teacher.apiKeySecretRef"
            )
        if status != 200:
            raise TeacherRejected(
                self._scrub(
                    f"teacher {self.teacher.id} refused the request: HTTP {status}: {_error_text(response)}"
                )
            )
        try:
            payload = response.json()
            completion = parse_completion(payload, self.teacher)
        except ValueError:  # not JSON, or not a chat completion
            raise _Retryable("malformed response") from None
        self.latencies.append(time.perf_counter() - sent)
        self.engine.add_server_timings(payload.get("timings"))
        if not completion.usage.calls:
            self.responses_without_usage += 1
            completion.usage.calls = 1
        return completion


class MalformedCompletion(ValueError):
    pass


def parse_completion(payload: Any, teacher: ResolvedTeacher, *, batch: bool = False) -> Completion:
    """A `/chat/completions` response body as a Completion priced from its usage block (at the batch
    price when it came through the batch API). A body without usage gets `usage.calls == 0`, so the
    caller can count it: its cost is unknown, not 0."""
    try:
        choices = sorted(payload["choices"], key=lambda c: c.get("index", 0))
        texts = [c["message"].get("content") or "" for c in choices]
        usage = payload.get("usage") or {}
        input_tokens = int(usage.get("prompt_tokens") or 0)
        output_tokens = int(usage.get("completion_tokens") or 0)
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    except (KeyError, TypeError, AttributeError, ValueError):
        raise MalformedCompletion("malformed chat completion") from None
    return Completion(
        texts=texts,
        finish_reasons=[str(c.get("finish_reason") or "") for c in choices],
        usage=Usage(
            calls=1 if usage else 0,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=teacher.cost(input_tokens, output_tokens, cached_tokens=cached, batch=batch),
            cached_input_tokens=cached,
        ),
    )


def _error_text(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        text = error.get("message") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        text = response.text
    return str(text)[:300]
