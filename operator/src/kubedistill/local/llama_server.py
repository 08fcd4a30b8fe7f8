"""llama-cpp-python's OpenAI-compatible server, with llama.cpp's own timings in each chat answer.

    python -m kubedistill.local.llama_server --model M.gguf --port 8000 ...   # llama_cpp.server's options

llama.cpp's own server adds a `timings` object to every completion (prompt tokens evaluated and their
milliseconds, tokens decoded and theirs); llama-cpp-python's server does not, so local mode's
teacher would show no prompt-processing or decoding rate. This runs that server unchanged but for
two things: each `create_chat_completion` reads llama.cpp's perf counters around the call, and a
small ASGI middleware adds them, in llama.cpp's field names, to the JSON answer of
`/v1/chat/completions`. The server serialises model calls (one lock), so the counters of a call are
that call's alone. Streamed answers pass through untouched.
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

CHAT_PATH = "/v1/chat/completions"
# Set per request by the middleware; the endpoint's worker thread runs in a copy of the request's
# context, which holds the same dict, so the timings written there reach the middleware.
_TIMINGS: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("timings", default=None)


def perf_timings(perf: Any) -> dict[str, Any]:
    """llama_perf_context_data → the `timings` fields of llama.cpp's server."""
    return {
        "prompt_n": int(perf.n_p_eval),
        "prompt_ms": round(float(perf.t_p_eval_ms), 3),
        "predicted_n": int(perf.n_eval),
        "predicted_ms": round(float(perf.t_eval_ms), 3),
    }


def with_timings(body: bytes, timings: dict[str, Any]) -> bytes:
    """The JSON answer with `timings` added; anything that is not a JSON object is left as it is."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    if not isinstance(payload, dict):
        return body
    return json.dumps({**payload, "timings": timings}).encode()


class TimingsMiddleware:
    """Adds the timings recorded during a chat completion to its (non-streamed, JSON) answer."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != CHAT_PATH:
            await self.app(scope, receive, send)
            return
        holder: dict[str, Any] = {}
        token = _TIMINGS.set(holder)
        start: Message | None = None
        chunks: list[bytes] = []
        passthrough = False

        async def capture(message: Message) -> None:
            nonlocal start, passthrough
            if passthrough:
                await send(message)
            elif message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                if headers.get(b"content-type", b"").startswith(b"application/json"):
                    start = message
                else:
                    passthrough = True
                    await send(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    await self._finish(send, start, b"".join(chunks), holder)
            else:
                await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            _TIMINGS.reset(token)

    @staticmethod
    async def _finish(send: Send, start: Message | None, body: bytes, holder: dict[str, Any]) -> None:
        assert start is not None
        if holder and start.get("status") == 200:
            body = with_timings(body, holder)
        headers = [(k, v) for k, v in start.get("headers") or [] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _record_timings() -> None:
    """Wrap Llama.create_chat_completion: reset llama.cpp's counters before, keep them after."""
    import llama_cpp

    original = llama_cpp.Llama.create_chat_completion

    def create_chat_completion(self: Any, *args: Any, **kwargs: Any) -> Any:
        llama_cpp.llama_perf_context_reset(self.ctx)
        out = original(self, *args, **kwargs)
        holder = _TIMINGS.get()
        if holder is not None:
            holder.update(perf_timings(llama_cpp.llama_perf_context(self.ctx)))
        return out

    llama_cpp.Llama.create_chat_completion = create_chat_completion  # type: ignore[method-assign]


def main() -> None:
    import llama_cpp.server.__main__ as server

    _record_timings()
    create_app = server.create_app

    def timed_app(*args: Any, **kwargs: Any) -> Any:
        app = create_app(*args, **kwargs)
        app.add_middleware(TimingsMiddleware)
        return app

    server.create_app = timed_app
    server.main()


if __name__ == "__main__":
    main()
