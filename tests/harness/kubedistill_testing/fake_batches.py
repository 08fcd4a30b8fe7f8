"""OpenAI's Batch API on the fake teacher: `/v1/files` and `/v1/batches`, answered by the chat handler.

    POST /v1/files                 multipart (purpose=batch, file=JSONL of {custom_id, method, url, body})
    GET  /v1/files/{id}/content    the file's bytes (input, output or error file)
    POST /v1/batches               {input_file_id, endpoint: /v1/chat/completions, completion_window: 24h}
    GET  /v1/batches/{id}          the batch object: status, request_counts, output_file_id, error_file_id
    GET  /v1/batches               newest first (a client that lost a batch id finds it by input file)

A batch is `in_progress` for `completion_delay` seconds after it is created (its completed count
grows with the time elapsed, as a provider's does), then the first retrieve runs every line through
the chat handler — same answers, usage and cached tokens as synchronous requests, logged as calls
of kind "batch" — and the batch is `completed`. Faults, all deterministic:

- `failures[prompt] = k`: the first k batch requests for that prompt fail (HTTP 500 in the error
  file);
- `expire_batches = k`: the first k batches expire with only the first half of their lines done; the
  rest are in the error file with code `batch_expired`;
- `stray_results = k`: each output file gets k extra lines whose custom_id was never submitted.

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
    input_file_id: str
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

    def to_json(self, delay: float) -> dict[str, Any]:
        completed = self.completed
        if self.status in ("in_progress", "finalizing") and delay > 0:
            share = min(1.0, (time.time() - self.created_at) / delay)
            completed = int(len(self.lines) * share)
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
        ids = [line.get("custom_id") for line in lines]
        if len(set(ids)) != len(ids) or not all(isinstance(i, str) for i in ids):
            return _invalid("every line needs a unique custom_id")
        batch = Batch(
            id=f"batch_{len(self.batches) + 1:06d}",
            input_file_id=request["input_file_id"],
            created_at=time.time(),
            headers={k: v for k, v in headers.items() if k == "authorization"},
            lines=lines,
            metadata=request.get("metadata"),
            expires=len(self.batches) < self.expire_batches,
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
        outputs: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        token = IN_BATCH.set(True)
        try:
            for line in done:
                prompt = last_user_message(line.get("body", {}).get("messages", []))
                if self._failed_so_far[prompt] < self.failures.get(prompt, 0):
                    self._failed_so_far[prompt] += 1
                    failure = {"error": {"message": "internal error", "type": "server_error"}}
                    errors.append(_result(line["custom_id"], 500, failure))
                    continue
                status, payload, _ = await self.chat(batch.headers, json.dumps(line["body"]).encode())
                (outputs if status == 200 else errors).append(
                    _result(line["custom_id"], status or 500, payload)
                )
        finally:
            IN_BATCH.reset(token)
        for line in batch.lines[len(done) :]:
            expired = {
                "code": "batch_expired",
                "message": "not executed before the completion window expired",
            }
            errors.append(
                {
                    "id": f"req_{line['custom_id']}",
                    "custom_id": line["custom_id"],
                    "response": None,
                    "error": expired,
                }
            )
        for k in range(self.stray_results if outputs else 0):
            outputs.append({**outputs[0], "custom_id": f"never-submitted-{k}"})
        batch.completed, batch.failed = len(outputs), len(errors)
        batch.output_file_id = self._store(outputs)
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


def _invalid(message: str) -> Response:
    return 400, {"error": {"message": message, "type": "invalid_request_error"}}, {}


def _not_found(what: str) -> Response:
    return 404, {"error": {"message": f"no such {what}", "type": "invalid_request_error"}}, {}
