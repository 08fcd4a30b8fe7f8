"""Dataset rows: parsing with reasons, the train/test split, and the four sources of a job.

A row is one JSON object per line: `{id, prompt | messages, system?, reference?}`. `parse_lines`
keeps the valid rows and returns every invalid one with its line number and a reason; a job fails
only when more than `MAX_INVALID_FRACTION` of its rows are invalid (`check_invalid_share`).

The split is a pure function of the id (`is_test`), so it never changes between attempts, stages
or machines, and adding rows never moves an existing row to the other side.

Sources (`DatasetSpec`): `uri` (read through the store), inline `prompts` (ids derived from the
text), `configMapRef` — the operator mounts the ConfigMap key as a file in the stage pod and passes
its path in env KUBEDISTILL_DATASET_FILE — and `fromTraffic`, a gateway's recorded requests
(`kubedistill.traffic`). `open_source` streams any of them line by line, and
`iter_parsed` parses a stream without holding it: what lets the estimate read a million rows in
bounded memory. Duplicate ids are found with `SeenIds`, 8 bytes a row.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import os
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubedistill import store
from kubedistill.api.models import DatasetSpec

DATASET_FILE_ENV = "KUBEDISTILL_DATASET_FILE"
MAX_INVALID_FRACTION = 0.5
MAX_ID_LENGTH = 256
ROLES = ("system", "user", "assistant")


class DatasetInvalid(Exception):
    reason = "DatasetInvalid"


@dataclass(frozen=True)
class Row:
    id: str
    prompt: str | None = None
    messages: tuple[Mapping[str, str], ...] | None = None
    system: str | None = None
    reference: str | None = None

    def student_messages(self) -> list[dict[str, str]]:
        """What the student sees: the row's own system text and prompt/messages."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        if self.messages is not None:
            return head + [dict(m) for m in self.messages]
        return [*head, {"role": "user", "content": self.prompt or ""}]

    def teacher_messages(
        self, instruction: str | None = None, examples: Sequence[Mapping[str, str]] = ()
    ) -> list[dict[str, str]]:
        """What the teacher sees: the teacher-only instruction ahead of the row's system text, then
        the teacher-only example turns, then the row's own turns."""
        messages = self.student_messages()
        head: list[dict[str, str]] = []
        if messages[0]["role"] == "system":
            head, messages = [messages[0]], messages[1:]
        if instruction:
            text = f"{instruction}\n\n{head[0]['content']}" if head else instruction
            head = [{"role": "system", "content": text}]
        return [*head, *(dict(e) for e in examples), *messages]

    def prompt_text(self) -> str:
        """The last user turn: what a judge is shown as "the question"."""
        if self.messages is None:
            return self.prompt or ""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        if self.messages is not None:
            out["messages"] = [dict(m) for m in self.messages]
        else:
            out["prompt"] = self.prompt
        if self.system is not None:
            out["system"] = self.system
        if self.reference is not None:
            out["reference"] = self.reference
        return out


@dataclass
class Rejected:
    line: int
    reason: str
    raw: str

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "reason": self.reason, "raw": self.raw[:2000]}


@dataclass
class Parsed:
    rows: list[Row] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.rows) + len(self.rejected)


def text_id(text: str) -> str:
    return "p-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _messages(value: Any) -> tuple[Mapping[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be {{role: system|user|assistant, content: string}}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise ValueError("the last message must have role user")
    return tuple(out)


def row_from_obj(obj: Any) -> Row:
    """A validated Row, or ValueError with a reason a user can act on."""
    if not isinstance(obj, dict):
        raise ValueError("row is not a JSON object")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise ValueError("exactly one of prompt or messages must be set")
    prompt = obj.get("prompt")
    if has_prompt and (not isinstance(prompt, str) or not prompt.strip()):
        raise ValueError("prompt must be a non-empty string")
    messages = _messages(obj["messages"]) if has_messages else None
    for key in ("system", "reference"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise ValueError(f"{key} must be a string")
    raw_id = obj.get("id")
    if raw_id is None:
        raw_id = text_id(json.dumps([obj.get("system"), prompt, obj.get("messages")], sort_keys=True))
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int) or not str(raw_id).strip():
        raise ValueError("id must be a non-empty string or an integer")
    if len(str(raw_id)) > MAX_ID_LENGTH:
        raise ValueError(f"id longer than {MAX_ID_LENGTH} characters")
    return Row(
        id=str(raw_id),
        prompt=prompt,
        messages=messages,
        system=obj.get("system"),
        reference=obj.get("reference"),
    )


class SeenIds:
    """The row ids seen so far, as 64-bit hashes: sorted arrays of up to `chunk` hashes, plus a set
    of recent ones merged into them every `batch` ids. A set of the ids themselves takes ~100
    bytes a row (100 MB for a million); this takes 8, and a merge rebuilds one chunk at a time, so
    it never holds two copies. Two different ids share a hash with probability ~n²/2⁶⁵ (3·10⁻⁸
    for a million rows), which would reject one row as a duplicate."""

    def __init__(self, batch: int = 1 << 16, chunk: int = 1 << 16) -> None:
        self.batch = batch
        self.chunk = chunk
        self._chunks: list[array[int]] = []
        self._lasts: list[int] = []  # the largest hash of each chunk, for bisecting to the chunk
        self._recent: set[int] = set()

    @staticmethod
    def _key(row_id: str) -> int:
        return int.from_bytes(hashlib.blake2b(row_id.encode("utf-8"), digest_size=8).digest(), "big")

    def _has(self, key: int) -> bool:
        if key in self._recent:
            return True
        which = bisect_left(self._lasts, key)
        if which == len(self._chunks):
            return False
        chunk = self._chunks[which]
        at = bisect_left(chunk, key)
        return at < len(chunk) and chunk[at] == key

    def _drain(self) -> Iterator[int]:
        """The sorted hashes, releasing each chunk once it has been read."""
        while self._chunks:
            yield from self._chunks.pop(0)

    def _merge(self) -> None:
        merged = heapq.merge(self._drain(), sorted(self._recent))
        chunks: list[array[int]] = []
        while block := array("Q", itertools.islice(merged, self.chunk)):
            chunks.append(block)
        self._chunks, self._lasts, self._recent = chunks, [c[-1] for c in chunks], set()

    def __contains__(self, row_id: object) -> bool:
        return isinstance(row_id, str) and self._has(self._key(row_id))

    def add(self, row_id: str) -> bool:
        """Record `row_id`; False when it was seen before."""
        key = self._key(row_id)
        if self._has(key):
            return False
        self._recent.add(key)
        if len(self._recent) >= self.batch:
            self._merge()
        return True

    def __len__(self) -> int:
        return sum(len(c) for c in self._chunks) + len(self._recent)


def iter_parsed(lines: Iterable[str], seen: SeenIds | None = None) -> Iterator[Row | Rejected]:
    """Each non-blank line as a valid Row or a Rejected one (duplicates of an earlier id included)."""
    seen = SeenIds() if seen is None else seen
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = row_from_obj(json.loads(line))
        except json.JSONDecodeError as exc:
            yield Rejected(number, f"not valid JSON ({exc.msg})", line)
            continue
        except ValueError as exc:
            yield Rejected(number, str(exc), line)
            continue
        if not seen.add(row.id):
            yield Rejected(number, f"duplicate id {row.id!r}", line)
            continue
        yield row


def parse_lines(lines: Iterable[str]) -> Parsed:
    parsed = Parsed()
    for item in iter_parsed(lines):
        if isinstance(item, Row):
            parsed.rows.append(item)
        else:
            parsed.rejected.append(item)
    return parsed


def invalid_share_problem(
    valid: int, rejected: int, first: Rejected | None, max_fraction: float = MAX_INVALID_FRACTION
) -> str | None:
    """Why a dataset with these counts must not run (None when it may): no valid row, or more than
    `max_fraction` of its rows invalid. `first` is the first rejected row, named in the message."""
    hint = f"; first: line {first.line}: {first.reason}" if first is not None else ""
    if not valid:
        return f"the dataset has no valid rows ({rejected} invalid{hint})"
    share = rejected / (valid + rejected)
    if share > max_fraction:
        return (
            f"{rejected} of {valid + rejected} dataset rows are invalid ({share:.0%} > "
            f"{max_fraction:.0%} allowed){hint}"
        )
    return None


def check_invalid_share(parsed: Parsed, max_fraction: float = MAX_INVALID_FRACTION) -> None:
    first = parsed.rejected[0] if parsed.rejected else None
    problem = invalid_share_problem(len(parsed.rows), len(parsed.rejected), first, max_fraction)
    if problem is not None:
        raise DatasetInvalid(problem)


def is_test(row_id: str, test_fraction: float) -> bool:
    digest = hashlib.sha256(row_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def shard_of(row_id: str, shards: int) -> int:
    """Which generation shard asks the teacher for this row: a stable hash of its id, independent of
    `is_test` (other bytes of the digest), so every shard gets its share of both splits."""
    digest = hashlib.sha256(row_id.encode("utf-8")).digest()
    return int.from_bytes(digest[8:16], "big") % shards


def inline_lines(prompts: Iterable[str]) -> list[str]:
    return [json.dumps({"id": text_id(p), "prompt": p}) for p in prompts]


def open_source(spec: DatasetSpec, environ: Mapping[str, str] | None = None) -> tuple[Iterator[bytes], int]:
    """The raw lines of the job's dataset as a stream, and its size in bytes (for a progress bar)."""
    env = os.environ if environ is None else environ
    if spec.from_traffic is not None:
        # Imported here: traffic builds on this module's rows.
        from kubedistill.traffic import TrafficStream

        return TrafficStream(spec.from_traffic, datetime.now(UTC)), 0
    if spec.prompts is not None:
        encoded = [line.encode("utf-8") for line in inline_lines(spec.prompts)]
        return iter(encoded), sum(len(line) + 1 for line in encoded)
    if spec.uri is not None:
        try:
            return store.iter_lines(spec.uri), store.size(spec.uri)
        except store.NotFound:
            raise DatasetInvalid(f"dataset {spec.uri} does not exist") from None
    assert spec.config_map_ref is not None
    ref = spec.config_map_ref
    path = env.get(DATASET_FILE_ENV)
    if not path:
        raise DatasetInvalid(
            f"dataset configMapRef {ref.name}/{ref.key} is not mounted: {DATASET_FILE_ENV} is not set"
        )
    try:
        return store.iter_lines(Path(path).resolve().as_uri()), os.path.getsize(path)
    except OSError as exc:
        raise DatasetInvalid(
            f"cannot read dataset configMapRef {ref.name}/{ref.key}: {exc.strerror}"
        ) from None


def decode_lines(raw: Iterable[bytes], where: str) -> Iterator[str]:
    for number, line in enumerate(raw, start=1):
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError:
            raise DatasetInvalid(f"{where} is not UTF-8 text (line {number})") from None


def describe(spec: DatasetSpec) -> str:
    if spec.from_traffic is not None:
        return f"recorded requests of alias {spec.from_traffic.alias}"
    if spec.uri is not None:
        return f"dataset {spec.uri}"
    if spec.config_map_ref is not None:
        return f"dataset configMapRef {spec.config_map_ref.name}/{spec.config_map_ref.key}"
    return "dataset prompts"


def source_lines(spec: DatasetSpec, environ: Mapping[str, str] | None = None) -> list[str]:
    """The raw JSONL lines of the job's dataset, from whichever source it names."""
    raw, _ = open_source(spec, environ)
    return list(decode_lines(raw, describe(spec)))


def load(spec: DatasetSpec, environ: Mapping[str, str] | None = None) -> Parsed:
    """Parse the job's dataset, fail past the invalid threshold, cap at numPrompts (file order)."""
    parsed = parse_lines(source_lines(spec, environ))
    check_invalid_share(parsed)
    if spec.num_prompts is not None:
        parsed.rows = parsed.rows[: spec.num_prompts]
    return parsed


def rows_from_json(objs: Iterable[Any]) -> list[Row]:
    """Rows read back from a normalised dataset file written by the generate stage."""
    return [row_from_obj(o) for o in objs]
