"""The scripted teacher with the faults of a paid provider, for tests, benchmarks and e2e runs.

    with FakeTeacher(answers={"2+2?": "4"}, latency=0.05, fail_rate=0.2) as teacher:
        client = ... teacher.base_url ...          # http://127.0.0.1:PORT/v1
        teacher.calls                              # the call log: one Call per HTTP request

    python -m kubedistill_testing.fake_teacher --port 8099 --latency 0.05 --call-log calls.jsonl

Answers and usage are those of :class:`kubedistill.local.scripted_teacher.ScriptedTeacher`.

Failures: with probability `fail_rate` a request fails with one of `failures` — "429" (at once,
like a rate limiter at the edge, with Retry-After and retry-after-ms headers of `retry_after`
seconds), "500" (after the latency), "timeout" (the server holds
the request `hang_seconds` then answers 504, so the client's timeout fires first) or "disconnect"
(the connection is closed with no answer). Failed requests are logged with their status.
Prompts in `fail_prompts` always get the 429. When `api_key` is set, a request without
`Authorization: Bearer <api_key>` gets 401.

Prompt cache: with `cache_min_tokens` set, a request whose leading messages (all but the last)
repeat those of an earlier request reports the tokens of the longest such run as
`usage.prompt_tokens_details.cached_tokens`, when it is at least `cache_min_tokens` long (as OpenAI
does, without its 128-token steps). `cached_tokens_total` sums them.

Batch APIs: OpenAI's `/v1/files` + `/v1/batches` and Anthropic's `/v1/messages/batches`
(:mod:`kubedistill_testing.fake_batches`, reachable as `teacher.batch_api`), with `completion_delay`,
`batch_failures`, `expire_batches` and `stray_results`. Lines of a batch are answered by the same
handler as synchronous requests, without the random faults above, and logged as calls of kind
"batch".

`report_timings=True` adds to each answer the `timings` object llama.cpp's server sends, with
fixed rates: 1 ms per prompt token (1000 tokens/s) and 10 ms per answer token (100 tokens/s).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import signal
import sys
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from kubedistill.local.scripted_teacher import (
    Answers,
    Call,
    Response,
    ScriptedTeacher,
    count_tokens,
    last_user_message,
    prompt_tokens,
    truncate_tokens,
)
from kubedistill_testing.fake_batches import IN_BATCH, FakeBatchAPI

__all__ = ["Call", "FakeTeacher", "count_tokens", "last_user_message", "prompt_tokens", "truncate_tokens"]


class FakeTeacher(ScriptedTeacher):
    def __init__(
        self,
        answers: Answers | None = None,
        *,
        latency: float = 0.0,
        fail_rate: float = 0.0,
        failures: Sequence[str] = ("429", "500", "timeout"),
        retry_after: float = 0.1,
        hang_seconds: float = 30.0,
        supports_n: bool = True,
        api_key: str | None = None,
        models: Sequence[str] = ("fake-teacher",),
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        call_log: str | None = None,
        fail_prompts: Collection[str] = (),
        report_usage: bool = True,
        cache_min_tokens: int | None = None,
        completion_delay: float = 0.0,
        batch_failures: Mapping[str, int] | None = None,
        expire_batches: int = 0,
        stray_results: int = 0,
        report_timings: bool = False,
    ) -> None:
        super().__init__(
            answers, latency=latency, models=models, host=host, port=port, report_usage=report_usage
        )
        self.fail_rate = fail_rate
        self.failures = tuple(failures)
        self.retry_after = retry_after
        self.hang_seconds = hang_seconds
        self.supports_n = supports_n
        self.api_key = api_key
        self.call_log_path = call_log
        self.fail_prompts = set(fail_prompts)
        self.report_timings = report_timings
        self._random = random.Random(seed)
        self.cache_min_tokens = cache_min_tokens
        self.cached_tokens_total = 0
        self._cached_prefixes: set[str] = set()
        self.batch_api = FakeBatchAPI(
            self._chat,
            completion_delay=completion_delay,
            failures=dict(batch_failures or {}),
            expire_batches=expire_batches,
            stray_results=stray_results,
        )

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        return self.api_key is None or headers.get("authorization") == f"Bearer {self.api_key}"

    async def _route(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Response:
        path = path.split("?", 1)[0].rstrip("/")
        if path.startswith(("/v1/files", "/v1/batches", "/v1/messages/batches")):
            # Anthropic's API takes the key in x-api-key.
            key = headers.get("x-api-key")
            if not self._authorized({"authorization": f"Bearer {key}"} if key else headers):
                return (
                    401,
                    {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}},
                    {},
                )
            routed = await self.batch_api.route(method, path, headers, body)
            if routed is not None:
                return routed
        return await super()._route(method, path, headers, body)

    async def _chat(self, headers: Mapping[str, str], body: bytes) -> Response:
        status, payload, extra = await super()._chat(headers, body)
        if (
            status == 200
            and self.cache_min_tokens is not None
            and isinstance(payload, dict)
            and "usage" in payload
        ):
            cached = self._read_cache(json.loads(body)["messages"], self.cache_min_tokens)
            payload["usage"]["prompt_tokens_details"] = {"cached_tokens": cached}
            self.cached_tokens_total += cached
        if self.report_timings and status == 200 and isinstance(payload, dict):
            call = self.calls[-1]
            payload["timings"] = {
                "prompt_n": call.prompt_tokens,
                "prompt_ms": float(call.prompt_tokens),
                "predicted_n": call.completion_tokens,
                "predicted_ms": 10.0 * call.completion_tokens,
            }
        return status, payload, extra

    def _read_cache(self, messages: Sequence[Mapping[str, Any]], min_tokens: int) -> int:
        """Tokens of the longest run of leading messages (never the last) an earlier request began with;
        every such run of this request is cached for later ones."""
        digest = hashlib.sha256()
        cached = tokens = 0
        for message in messages[:-1]:
            digest.update(json.dumps(message, sort_keys=True).encode())
            key = digest.hexdigest()
            tokens += count_tokens(str(message.get("content", ""))) + 4
            if key in self._cached_prefixes:
                cached = tokens
            self._cached_prefixes.add(key)
        return cached if cached >= min_tokens else 0

    def _record(self, call: Call) -> None:
        if IN_BATCH.get() and call.status == 200:
            call.kind = "batch"
        super()._record(call)
        if self.call_log_path:
            with open(self.call_log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(asdict(call)) + "\n")

    async def _before_answer(
        self, call: Call, headers: Mapping[str, str], request: dict[str, Any]
    ) -> Response | None:
        if not self._authorized(headers):
            sent = headers.get("authorization", "").removeprefix("Bearer ")
            call.status, call.kind = 401, "unauthorized"
            self._record(call)
            # Like real providers: the error echoes a masked form of the key that was sent.
            masked = f"{sent[:3]}****{sent[-4:]}" if len(sent) > 8 else "****"
            return (
                401,
                {"error": {"message": f"Incorrect API key provided: {masked}", "code": "invalid_api_key"}},
                {},
            )
        if call.n > 1 and not self.supports_n:
            call.status, call.kind = 400, "bad_request"
            self._record(call)
            return 400, {"error": {"message": "n > 1 is not supported", "type": "invalid_request_error"}}, {}
        if IN_BATCH.get():
            # Batch lines fail only as FakeBatchAPI scripts it, and take no model time.
            return None
        kind = (
            self._random.choice(self.failures)
            if self.fail_rate and self._random.random() < self.fail_rate
            else ""
        )
        if call.prompt in self.fail_prompts:
            kind = "429"
        if kind == "429":
            # Rate limiters answer at the edge, before any model time.
            call.status, call.kind = 429, "429"
            self._record(call)
            retry = {
                "retry-after": str(max(1, round(self.retry_after))),
                "retry-after-ms": str(int(self.retry_after * 1000)),
            }
            return 429, {"error": {"message": "Rate limit reached", "type": "rate_limit_error"}}, retry
        await super()._before_answer(call, headers, request)
        if kind == "timeout":
            call.status, call.kind = 504, kind
            self._record(call)
            await asyncio.sleep(self.hang_seconds)
            return 504, {"error": {"message": "upstream timeout"}}, {}
        if kind == "disconnect":
            call.status, call.kind = 0, kind
            self._record(call)
            return None, None, {}
        if kind:
            call.status, call.kind = 500, kind
            self._record(call)
            return 500, {"error": {"message": "internal error", "type": "server_error"}}, {}
        return None


def _load_answers(path: str) -> dict[str, str | list[str]]:
    """A .jsonl file of rows {prompt, answer | answers}, or a JSON object prompt -> answer(s)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not path.endswith(".jsonl"):
        doc = json.loads(text)
        if not isinstance(doc, dict):
            raise SystemExit(f"{path}: expected a JSON object prompt -> answer(s)")
        return doc
    answers: dict[str, str | list[str]] = {}
    for line in text.splitlines():
        if line.strip():
            row = json.loads(line)
            answers[row["prompt"]] = row.get("answers") or row["answer"]
    return answers


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Loopback OpenAI-compatible teacher for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--failures", default="429,500,timeout", help="comma-separated failure kinds")
    parser.add_argument("--retry-after", type=float, default=0.1, help="seconds, sent with 429s")
    parser.add_argument("--hang-seconds", type=float, default=30.0)
    parser.add_argument("--no-n", action="store_true", help="reject n > 1 like some providers")
    parser.add_argument(
        "--api-key-env", help="require the key held in this env var (never on the command line)"
    )
    parser.add_argument(
        "--answers", help="JSON {prompt: answer|[answers]}, or .jsonl rows {prompt, answer|answers}"
    )
    parser.add_argument("--model", action="append", help="model ids listed by /v1/models")
    parser.add_argument("--call-log", help="append every call as a JSON line to this file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-min-tokens", type=int, help="report cached tokens for repeated prefixes")
    parser.add_argument("--completion-delay", type=float, default=0.0, help="seconds a batch takes")
    args = parser.parse_args(argv)
    teacher = FakeTeacher(
        _load_answers(args.answers) if args.answers else None,
        latency=args.latency,
        fail_rate=args.fail_rate,
        failures=[f for f in args.failures.split(",") if f],
        retry_after=args.retry_after,
        hang_seconds=args.hang_seconds,
        supports_n=not args.no_n,
        api_key=os.environ[args.api_key_env] if args.api_key_env else None,
        models=args.model or ["fake-teacher"],
        seed=args.seed,
        host=args.host,
        port=args.port,
        call_log=args.call_log,
        cache_min_tokens=args.cache_min_tokens,
        completion_delay=args.completion_delay,
    ).start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(json.dumps({"baseURL": teacher.base_url, "port": teacher.port}), flush=True)
    stop.wait()
    teacher.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
