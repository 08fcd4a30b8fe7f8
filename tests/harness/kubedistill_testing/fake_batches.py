"""Providers' batch APIs on the fake teacher, answered by its chat handler.

OpenAI (`Authorization: Bearer`):

    POST /v1/files                 multipart (purpose=batch, file=JSONL of {custom_id, method, url, body})
    GET  /v1/files/{id}/content    the file's bytes (input, output or error file)
    POST /v1/batches               {input_file_id, endpoint: /v1/chat/completions, completion_window: 24h}
    GET  /v1/batches/{id}          the batch object: status, request_counts, output_file_id, error_file_id
    GET  /v1/batches               newest first (a client that lost a batch id finds it by input file)

Anthropic Message Batches (`x-api-key`):

    POST /v1/messages/batches               {requests: [{custom_id, params: {model, max_tokens, messages, system?}}]}
    GET  /v1/messages/batches/{id}          processing_status in_progress | ended, request_counts
    GET  /v1/messages/batches/{id}/results  JSONL of {custom_id, result: {type: succeeded | errored | expired}}

A batch is `in_progress` for `completion_delay` seconds after it is created (its completed count
grows with the time elapsed, as a provider's does), then the first retrieve runs every line through
the chat handler — same answers, usage and cached tokens as synchronous requests, logged as calls
of kind "batch" — and the batch is `completed` (Anthropic: `ended`). Faults, all deterministic:

- `failures[prompt] = k`: the first k batch requests for that prompt fail (HTTP 500 in the error
  file; Anthropic: an errored result of type api_error);
- `expire_batches = k`: the first k batches expire with only the first half of their lines done; the
  rest are in the error file with code `batch_expired` (Anthropic: expired results);
- `stray_results = k`: each output gets k extra answers whose custom_id was never submitted.

`log` records every upload and batch creation, so a test can prove a batch was not submitted twice.
"""

from __future__ import annotations

import contextvars
import email.parser
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubedistill.local.scripted_teacher import Response, last_user_message

ChatHandler = Callable[[Mapping[str, str], bytes], Awaitable[Response]]

# Set while a batch's lines are answered: fault injection meant for synchronous calls stays off.
IN_BATCH: contextvars.ContextVar[bool] = contextvars.ContextVar("in_batch", default=False)


@dataclass
class Batch:
    id: str
    input_file_id: str | None
    created_at: float
    headers: dict[str, str]
    lines: list[dict[str, Any]]
    metadata: dict[str, str] | None
    expires: bool
    status: str = "in_progress"
    output_file_id: str | None = None
    error_file_id: str | None = None
    completed: int = 0
    failed: int = 0
    expired: int = 0
    anthropic: bool = False

    def to_json(self, delay: float) -> dict[str, Any]:
        completed = self.completed
        if self.status in ("in_progress", "finalizing") and delay > 0:
            share = min(1.0, (time.time() - self.created_at) / delay)
            completed = int(len(self.lines) * share)
        if self.anthropic:
            ended = self.status not in ("in_progress", "finalizing")
            return {
                "id": self.id,
                "type": "message_batch",
                "processing_status": "ended" if ended else "in_progress",
                "request_counts": {
                    "processing": 0 if ended else len(self.lines) - completed,
                    "succeeded": completed,
                    "errored": self.failed - self.expired,
                    "canceled": 0,
                    "expired": self.expired,
                },
                "created_at": int(self.created_at),
                "results_url": f"/v1/messages/batches/{self.id}/results" if ended else None,
            }
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "errors": None,
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": int(self.created_at),
            "request_counts": {"total": len(self.lines), "completed": completed, "failed": self.failed},
            "metadata": self.metadata,
        }


@dataclass
class FakeBatchAPI:
    chat: ChatHandler
    completion_delay: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)
    expire_batches: int = 0
    stray_results: int = 0
    files: dict[str, bytes] = field(default_factory=dict)
    batches: dict[str, Batch] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)
    _failed_so_far: Counter[str] = field(default_factory=Counter)

    def created(self) -> list[str]:
        """Ids of the batches created, in order."""
        return [e["id"] for e in self.log if e["op"] == "create_batch"]

    async def route(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Response | None:
        """The response for a batch endpoint, or None when `path` is not one."""
        parts = path.split("/")[2:]  # /v1/<parts>
        if parts[:2] == ["messages", "batches"]:
            return await self._anthropic(method, parts[2:], headers, body)
        if parts == ["files"] and method == "POST":
            return self._upload(headers, body)
        if len(parts) == 3 and parts[0] == "files" and parts[2] == "content" and method == "GET":
            content = self.files.get(parts[1])
            return (200, content, {}) if content is not None else _not_found(f"file {parts[1]}")
        if parts == ["batches"] and method == "POST":
            return self._create(headers, body)
        if parts == ["batches"] and method == "GET":
            newest = sorted(self.batches.values(), key=lambda b: b.created_at, reverse=True)
            return 200, {"object": "list", "data": [b.to_json(self.completion_delay) for b in newest]}, {}
        if len(parts) == 2 and parts[0] == "batches" and method == "GET":
            batch = self.batches.get(parts[1])
            if batch is None:
                return _not_found(f"batch {parts[1]}")
            await self._maybe_finish(batch)
            return 200, batch.to_json(self.completion_delay), {}
        return None

    async def _anthropic(
        self, method: str, parts: list[str], headers: Mapping[str, str], body: bytes
    ) -> Response | None:
        if not parts and method == "POST":
            try:
                requests = json.loads(body)["requests"]
                lines = [{"custom_id": r["custom_id"], "body": _chat_body(r["params"])} for r in requests]
            except (ValueError, KeyError, TypeError):
                return _invalid("requests must be a list of {custom_id, params}")
            # The chat handler checks the key as a bearer token.
            auth = {"authorization": f"Bearer {headers.get('x-api-key', '')}"}
            return self._register(lines, None, auth, None, anthropic=True)
        batch = self.batches.get(parts[0]) if parts else None
        if batch is None or not batch.anthropic:
            return _not_found(f"message batch {parts[0] if parts else ''}")
        if parts[1:] == [] and method == "GET":
            await self._maybe_finish(batch)
            return 200, batch.to_json(self.completion_delay), {}
        if parts[1:] == ["results"] and method == "GET" and batch.output_file_id:
            return 200, self.files[batch.output_file_id], {}
        return None

    def _upload(self, headers: Mapping[str, str], body: bytes) -> Response:
        message = email.parser.BytesParser().parsebytes(
            f"content-type: {headers.get('content-type', '')}\r\n\r\n".encode() + body
        )
        fields: dict[str, bytes] = {}
        for part in message.walk():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if isinstance(name, str) and isinstance(payload, bytes):
                fields[name] = payload
        content = fields.get("file")
        if fields.get("purpose") != b"batch" or content is None:
            return _invalid("expected multipart fields purpose=batch and file")
        file_id = f"file-{len(self.files) + 1:06d}"
        self.files[file_id] = content
        self.log.append({"op": "upload", "id": file_id, "bytes": len(content), "at": time.time()})
        return 200, {"id": file_id, "object": "file", "bytes": len(content), "purpose": "batch"}, {}

    def _create(self, headers: Mapping[str, str], body: bytes) -> Response:
        try:
            request = json.loads(body)
            content = self.files[request["input_file_id"]]
            lines = [json.loads(line) for line in content.decode().splitlines() if line.strip()]
        except (ValueError, KeyError, TypeError):
            return _invalid("input_file_id must name an uploaded JSONL file")
        if request.get("endpoint") != "/v1/chat/completions" or request.get("completion_window") != "24h":
            return _invalid("endpoint must be /v1/chat/completions and completion_window 24h")
        return self._register(
            lines, request["input_file_id"], headers, request.get("metadata"), anthropic=False
        )

    def _register(
        self,
        lines: list[dict[str, Any]],
        input_file_id: str | None,
        headers: Mapping[str, str],
        metadata: dict[str, str] | None,
        *,
        anthropic: bool,
    ) -> Response:
        ids = [line.get("custom_id") for line in lines]
        if len(set(ids)) != len(ids) or not all(isinstance(i, str) for i in ids):
            return _invalid("every request needs a unique custom_id")
        prefix = "msgbatch" if anthropic else "batch"
        batch = Batch(
            id=f"{prefix}_{len(self.batches) + 1:06d}",
            input_file_id=input_file_id,
            created_at=time.time(),
            headers={k: v for k, v in headers.items() if k == "authorization"},
            lines=lines,
            metadata=metadata,
            expires=len(self.batches) < self.expire_batches,
            anthropic=anthropic,
        )
        self.batches[batch.id] = batch
        self.log.append(
            {"op": "create_batch", "id": batch.id, "requests": len(lines), "at": batch.created_at}
        )
        return 200, batch.to_json(self.completion_delay), {}

    async def _maybe_finish(self, batch: Batch) -> None:
        if batch.status != "in_progress" or time.time() - batch.created_at < self.completion_delay:
            return
        # Answering takes awaits: a retrieve meanwhile must not answer the lines a second time.
        batch.status = "finalizing"
        done = batch.lines[: len(batch.lines) // 2] if batch.expires else batch.lines
        answered: list[tuple[str, int, Any]] = []  # (custom_id, HTTP status, chat payload)
        token = IN_BATCH.set(True)
        try:
            for line in done:
                prompt = last_user_message(line.get("body", {}).get("messages", []))
                if self._failed_so_far[prompt] < self.failures.get(prompt, 0):
                    self._failed_so_far[prompt] += 1
                    failure = {"error": {"message": "internal error", "type": "server_error"}}
                    answered.append((line["custom_id"], 500, failure))
                    continue
                status, payload, _ = await self.chat(batch.headers, json.dumps(line["body"]).encode())
                answered.append((line["custom_id"], status or 500, payload))
        finally:
            IN_BATCH.reset(token)
        expired = [line["custom_id"] for line in batch.lines[len(done) :]]
        ok = [a for a in answered if a[1] == 200]
        strays = [(f"never-submitted-{k}", *ok[0][1:]) for k in range(self.stray_results if ok else 0)]
        batch.completed, batch.failed, batch.expired = (
            len(ok) + len(strays),
            len(done) - len(ok) + len(expired),
            len(expired),
        )
        if batch.anthropic:
            results = [_anthropic_result(*a) for a in [*answered, *strays]]
            results += [{"custom_id": c, "result": {"type": "expired"}} for c in expired]
            batch.output_file_id = self._store(results)
        else:
            batch.output_file_id = self._store([_result(*a) for a in [*ok, *strays]])
            errors = [_result(*a) for a in answered if a[1] != 200]
            expiry = {"code": "batch_expired", "message": "not executed before the completion window expired"}
            errors += [{"id": f"req_{c}", "custom_id": c, "response": None, "error": expiry} for c in expired]
            batch.error_file_id = self._store(errors)
        batch.status = "expired" if batch.expires else "completed"

    def _store(self, rows: list[dict[str, Any]]) -> str | None:
        if not rows:
            return None
        file_id = f"file-{len(self.files) + 1:06d}"
        self.files[file_id] = "".join(json.dumps(r) + "\n" for r in rows).encode()
        return file_id


def _result(custom_id: str, status: int, body: Any) -> dict[str, Any]:
    return {
        "id": f"req_{custom_id}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": f"r-{custom_id}", "body": body},
        "error": None,
    }


def _chat_body(params: Mapping[str, Any]) -> dict[str, Any]:
    """An Anthropic request's params as the chat body the handler answers."""
    system = [{"role": "system", "content": params["system"]}] if params.get("system") else []
    body = {
        "model": params["model"],
        "messages": system + list(params["messages"]),
        "max_tokens": params["max_tokens"],
    }
    if "temperature" in params:
        body["temperature"] = params["temperature"]
    return body


def _anthropic_result(custom_id: str, status: int, payload: Any) -> dict[str, Any]:
    if status != 200:
        error = {"type": "error", "error": {"type": "api_error", "message": "internal error"}}
        if status == 400:
            error["error"] = {"type": "invalid_request_error", "message": str(payload)}
        return {"custom_id": custom_id, "result": {"type": "errored", "error": error}}
    choice = payload["choices"][0]
    usage = payload.get("usage") or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    message = {
        "id": f"msg_{custom_id}",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": choice["message"]["content"]}],
        "stop_reason": "max_tokens" if choice["finish_reason"] == "length" else "end_turn",
        "usage": {
            "input_tokens": usage.get("prompt_tokens", 0) - cached,
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0,
            "output_tokens": usage.get("completion_tokens", 0),
        },
    }
    return {"custom_id": custom_id, "result": {"type": "succeeded", "message": message}}


def _invalid(message: str) -> Response:
    return 400, {"error": {"message": message, "type": "invalid_request_error"}}, {}


def _not_found(what: str) -> Response:
    return 404, {"error": {"message": f"no such {what}", "type": "invalid_request_error"}}, {}
