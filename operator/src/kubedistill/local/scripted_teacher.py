"""A loopback OpenAI-compatible server with scripted answers: the teacher of `--preset smoke`.

`/v1/chat/completions` (with `n`) and `/v1/models` over a small asyncio HTTP/1.1 server (keep-alive)
in a background thread. It never stands in for a paid provider in a real job: local mode starts it
only for the smoke preset, whose point is to exercise every stage in a couple of minutes without a
model to call. The test harness extends it with failure injection (`kubedistill_testing.fake_teacher`).

    with ScriptedTeacher(answers={"2+2?": "4"}) as teacher:
        teacher.base_url                           # http://127.0.0.1:PORT/v1
        teacher.calls                              # one Call per HTTP request

Answers: a dict prompt -> answer (or a list, cycled by sample number), or a function
`(prompt, sample, request) -> str` where `prompt` is the last user message, `sample` counts the
samples produced for that prompt so far (so n=4 in one request and four n=1 requests give the
same answers) and `request` is the parsed body. Unknown prompts get a default answer.

Usage numbers are exact and reproducible: `count_tokens` splits text into runs of at most four
word characters and single punctuation marks (close to a BPE tokenizer on English, ~4 chars per
token); prompt_tokens = Σ(count_tokens(content) + 4) over messages + 2. `report_usage=False` leaves
the usage block out, as some self-hosted servers do.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

AnswerFn = Callable[[str, int, dict[str, Any]], str]
Answers = Mapping[str, str | Sequence[str]] | AnswerFn
# (status or None to drop the connection, JSON payload, extra headers)
Response = tuple[int | None, Any, dict[str, str]]

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


class ScriptedTeacher:
    def __init__(
        self,
        answers: Answers | None = None,
        *,
        latency: float = 0.0,
        models: Sequence[str] = ("scripted-teacher",),
        host: str = "127.0.0.1",
        port: int = 0,
        report_usage: bool = True,
    ) -> None:
        self.answers = answers
        self.latency = latency
        self.models = tuple(models)
        self.host = host
        self.port = port
        self.report_usage = report_usage
        self.calls: list[Call] = []
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

    def ok_calls(self) -> list[Call]:
        return [c for c in self.calls if c.status == 200]

    def prompts_called(self) -> list[str]:
        return [c.prompt for c in self.calls]

    def usage_totals(self) -> tuple[int, int]:
        ok = self.ok_calls()
        return sum(c.prompt_tokens for c in ok), sum(c.completion_tokens for c in ok)

    def _record(self, call: Call) -> None:
        self.calls.append(call)

    def answer(self, prompt: str, sample: int, request: dict[str, Any]) -> str:
        if callable(self.answers):
            return self.answers(prompt, sample, request)
        if self.answers is not None and prompt in self.answers:
            scripted = self.answers[prompt]
            return scripted if isinstance(scripted, str) else scripted[sample % len(scripted)]
        return f"Answer {sample} to: {prompt[:60]}"

    async def _before_answer(
        self, call: Call, headers: Mapping[str, str], request: dict[str, Any]
    ) -> Response | None:
        """Model time before the answer. A subclass may answer instead (an error): it records the call
        itself, since a hanging answer must be in the log while it hangs, and returns the response."""
        if self.latency:
            await asyncio.sleep(self.latency)
        return None

    async def _chat(self, headers: Mapping[str, str], body: bytes) -> Response:
        try:
            request = json.loads(body)
            messages = request["messages"]
            prompt = last_user_message(messages)
        except (ValueError, KeyError, TypeError, AttributeError):
            return 400, {"error": {"message": "invalid request body", "type": "invalid_request_error"}}, {}
        n = int(request.get("n") or 1)
        model = str(request.get("model", ""))
        call = Call(prompt=prompt, n=n, status=0, model=model, kind="ok", messages=messages, at=time.time())
        refused = await self._before_answer(call, headers, request)
        if refused is not None:
            return refused
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

    async def _route(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Response:
        path = path.split("?", 1)[0].rstrip("/")
        if method == "POST" and path == "/v1/chat/completions":
            return await self._chat(headers, body)
        if method == "GET" and path == "/v1/models":
            data = [{"id": m, "object": "model", "owned_by": "kubedistill-scripted"} for m in self.models]
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

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._run_loop, name="scripted-teacher", daemon=True)
        self._thread.start()
        self._ready.wait(timeout=30)
        if self._start_error is not None:
            raise RuntimeError(f"scripted teacher could not start: {self._start_error}")
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

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
