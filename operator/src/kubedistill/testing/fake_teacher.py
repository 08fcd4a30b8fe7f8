"""A loopback OpenAI-compatible teacher/judge server for tests, benchmarks and the operator's e2e runs.

It stands in for a paid provider only in tests: `/v1/chat/completions` (with `n`) and `/v1/models`
over a small asyncio HTTP/1.1 server (keep-alive) in a background thread.

    with FakeTeacher(answers={"2+2?": "4"}, latency=0.05, fail_rate=0.2) as teacher:
        client = ... teacher.base_url ...          # http://127.0.0.1:PORT/v1
        teacher.calls                              # the call log: one Call per HTTP request

    python -m kubedistill.testing.fake_teacher --port 8099 --latency 0.05 --call-log calls.jsonl

Answers: a dict prompt -> answer (or a list, cycled by sample number), or a function
`(prompt, sample, request) -> str` where `prompt` is the last user message, `sample` counts the
samples produced for that prompt so far (so n=4 in one request and four n=1 requests give the
same answers) and `request` is the parsed body. Unknown prompts get a default answer.

Usage numbers are exact and reproducible: `count_tokens` splits text into runs of at most four
word characters and single punctuation marks (close to a BPE tokenizer on English, ~4 chars per
token); prompt_tokens = Σ(count_tokens(content) + 4) over messages + 2. `report_usage=False` leaves
the usage block out, as some self-hosted servers do.

Failures: with probability `fail_rate` a request fails with one of `failures` — "429" (at once,
like a rate limiter at the edge, with Retry-After and retry-after-ms headers of `retry_after`
seconds), "500" (after the latency), "timeout" (the server holds
the request `hang_seconds` then answers 504, so the client's timeout fires first) or "disconnect"
(the connection is closed with no answer). Failed requests are logged with their status.
Prompts in `fail_prompts` always get the 429. When `api_key` is set, a request without
`Authorization: Bearer <api_key>` gets 401.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any

AnswerFn = Callable[[str, int, dict[str, Any]], str]
Answers = Mapping[str, str | Sequence[str]] | AnswerFn

_TOKEN = re.compile(r"\w{1,4}|[^\w\s]")
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests"}
_REASONS |= {500: "Internal Server Error", 504: "Gateway Timeout"}


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    return sum(count_tokens(str(m.get("content", ""))) + 4 for m in messages) + 2


def truncate_tokens(text: str, max_tokens: int) -> tuple[str, bool]:
    """The text cut after `max_tokens` tokens, and whether it was cut."""
    matches = list(_TOKEN.finditer(text))
    if len(matches) <= max_tokens:
        return text, False
    return text[: matches[max_tokens - 1].end()], True


def last_user_message(messages: Sequence[Mapping[str, Any]]) -> str:
    return next((str(m.get("content", "")) for m in reversed(messages) if m.get("role") == "user"), "")


@dataclass
class Call:
    """One HTTP request to /chat/completions, as the server saw it."""

    prompt: str
    n: int
    status: int
    model: str
    kind: str  # "ok", "429", "500", "timeout", "disconnect", "unauthorized", "bad_request"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    messages: list[dict[str, Any]] = field(default_factory=list)
    at: float = 0.0


class FakeTeacher:
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
    ) -> None:
        self.answers = answers
        self.latency = latency
        self.fail_rate = fail_rate
        self.failures = tuple(failures)
        self.retry_after = retry_after
        self.hang_seconds = hang_seconds
        self.supports_n = supports_n
        self.api_key = api_key
        self.models = tuple(models)
        self.host = host
        self.port = port
        self.call_log_path = call_log
        self.fail_prompts = set(fail_prompts)
        self.report_usage = report_usage
        self.calls: list[Call] = []
        self._random = random.Random(seed)
        self._samples: defaultdict[str, int] = defaultdict(int)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    # ------------------------------------------------------------------------------- call log

    def ok_calls(self) -> list[Call]:
        return [c for c in self.calls if c.status == 200]

    def prompts_called(self) -> list[str]:
        return [c.prompt for c in self.calls]

    def usage_totals(self) -> tuple[int, int]:
        ok = self.ok_calls()
        return sum(c.prompt_tokens for c in ok), sum(c.completion_tokens for c in ok)

    def _record(self, call: Call) -> None:
        self.calls.append(call)
        if self.call_log_path:
            with open(self.call_log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(asdict(call)) + "\n")

    # -------------------------------------------------------------------------------- answers

    def answer(self, prompt: str, sample: int, request: dict[str, Any]) -> str:
        if callable(self.answers):
            return self.answers(prompt, sample, request)
        if self.answers is not None and prompt in self.answers:
            scripted = self.answers[prompt]
            return scripted if isinstance(scripted, str) else scripted[sample % len(scripted)]
        return f"Answer {sample} to: {prompt[:60]}"

    # ------------------------------------------------------------------------------- handlers

    async def _chat(self, headers: Mapping[str, str], body: bytes) -> tuple[int | None, Any, dict[str, str]]:
        try:
            request = json.loads(body)
            messages = request["messages"]
            prompt = last_user_message(messages)
        except (ValueError, KeyError, TypeError, AttributeError):
            return 400, {"error": {"message": "invalid request body", "type": "invalid_request_error"}}, {}
        n = int(request.get("n") or 1)
        model = str(request.get("model", ""))
        call = Call(prompt=prompt, n=n, status=0, model=model, kind="ok", messages=messages, at=time.time())
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
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
        if n > 1 and not self.supports_n:
            call.status, call.kind = 400, "bad_request"
            self._record(call)
            return 400, {"error": {"message": "n > 1 is not supported", "type": "invalid_request_error"}}, {}
        kind = (
            self._random.choice(self.failures)
            if self.fail_rate and self._random.random() < self.fail_rate
            else ""
        )
        if prompt in self.fail_prompts:
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
        if self.latency:
            await asyncio.sleep(self.latency)
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
        max_tokens = int(request.get("max_tokens") or request.get("max_completion_tokens") or 1 << 30)
        choices = []
        for i in range(n):
            sample = self._samples[prompt]
            self._samples[prompt] += 1
            text, cut = truncate_tokens(self.answer(prompt, sample, request), max_tokens)
            call.completion_tokens += count_tokens(text)
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "length" if cut else "stop",
                }
            )
        call.prompt_tokens = prompt_tokens(messages)
        call.status = 200
        self._record(call)
        usage = {
            "prompt_tokens": call.prompt_tokens,
            "completion_tokens": call.completion_tokens,
            "total_tokens": call.prompt_tokens + call.completion_tokens,
        }
        payload = {
            "id": f"chatcmpl-{len(self.calls)}",
            "object": "chat.completion",
            "created": int(call.at),
            "model": model,
            "choices": choices,
        }
        if self.report_usage:
            payload["usage"] = usage
        return 200, payload, {}

    async def _route(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int | None, Any, dict[str, str]]:
        path = path.split("?", 1)[0].rstrip("/")
        if method == "POST" and path == "/v1/chat/completions":
            return await self._chat(headers, body)
        if method == "GET" and path == "/v1/models":
            data = [{"id": m, "object": "model", "owned_by": "kubedistill-fake"} for m in self.models]
            return 200, {"object": "list", "data": data}, {}
        return 404, {"error": {"message": f"no route {method} {path}"}}, {}

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers = {}
                for line in header_lines:
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                body = await reader.readexactly(length) if length else b""
                status, payload, extra = await self._route(method, path, headers, body)
                if status is None:
                    break
                data = json.dumps(payload).encode()
                lines = [
                    f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
                    "content-type: application/json",
                ]
                lines += [f"content-length: {len(data)}", *(f"{k}: {v}" for k, v in extra.items())]
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        except asyncio.CancelledError:
            # Shutdown: end quietly instead of as a cancelled task that asyncio would log.
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    # ------------------------------------------------------------------------------- lifecycle

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    def _run_loop(self) -> None:
        loop: asyncio.AbstractEventLoop
        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:
            loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._start_error = exc
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        for task in list(self._connections):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()

    def start(self) -> FakeTeacher:
        self._thread = threading.Thread(target=self._run_loop, name="fake-teacher", daemon=True)
        self._thread.start()
        self._ready.wait(timeout=30)
        if self._start_error is not None:
            raise RuntimeError(f"fake teacher could not start: {self._start_error}")
        return self

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None or self._thread is None:
            return

        def shutdown() -> None:
            server.close()
            loop.stop()

        loop.call_soon_threadsafe(shutdown)
        self._thread.join(timeout=10)
        self._loop = self._server = self._thread = None

    def __enter__(self) -> FakeTeacher:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


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
