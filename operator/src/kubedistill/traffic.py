"""Recorded requests → dataset rows: the `dataset.fromTraffic` source.

The gateway's recorder (`kubedistill.recorder`) writes one JSON object per request under
`<prefix>/<YYYY-MM-DD>/<HH>/<time>Z-<id>.json`. `TrafficStream` lists the days of a window, reads
the objects in time order and yields each as a dataset row's JSON line, so the stages read a
recorded window exactly as they read a JSONL file (`dataset.open_source`):

- messages stay messages; a leading system message becomes the row's `system` (`systemPrompt:
  keep`) or is removed (`drop`); the teacher's recorded answer becomes the row's `reference`;
- with `dedupe`, the row id is a hash of the normalised prompt (NFKC, case-folded, whitespace
  collapsed), and a repeat of a kept prompt is counted as deduplicated, not kept;
- an object that is not a valid record (bad JSON, another kind, another alias, messages that do
  not end with the user's turn…) is counted as rejected with a reason, never fatal on its own.

When the stream ends, a window with no kept request, or more rejected objects than the dataset
rule allows, raises `NoTraffic`/`DatasetInvalid` with the window and the first reason.

The window ends at `until`, by default the job's creation time, which the operator writes into the
stage's invocation (`with_defaults`): every stage and retry then reads the same requests.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kubedistill import dataset, store
from kubedistill.api.models import FromTrafficSpec, TrafficCounts
from kubedistill.recorder import RECORD_KIND, parse_timestamp

RECORDINGS_DIR = "recordings"
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_KEY_TIME = re.compile(r"/(\d{8}T\d{6}\.\d{6})Z-[^/]*\.json$")


class NoTraffic(dataset.DatasetInvalid):
    reason = "NoTraffic"


def recordings_prefix(root: str, namespace: str, alias: str) -> str:
    """The default destination of an alias's recordings under an artifact root (s3://bucket/prefix)."""
    return f"{root.rstrip('/')}/{RECORDINGS_DIR}/{namespace}/{alias}"


def rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def window(spec: FromTrafficSpec, now: datetime) -> tuple[datetime, datetime]:
    """[since, until): `until` defaults to `now`; a duration `since` counts back from `until`."""
    until = parse_timestamp(spec.until) if spec.until else now.astimezone(UTC)
    unit = spec.since[-1]
    if spec.since[:-1].isdigit() and unit in _UNITS:
        since = until - timedelta(**{_UNITS[unit]: int(spec.since[:-1])})
    else:
        since = parse_timestamp(spec.since)
    if since >= until:
        raise dataset.DatasetInvalid(
            f"dataset.fromTraffic: since ({rfc3339(since)}) is not before until ({rfc3339(until)})"
        )
    return since, until


def with_defaults(spec: FromTrafficSpec, root: str, namespace: str, created: datetime) -> FromTrafficSpec:
    """The spec a stage runs with: the recordings prefix and a fixed end of window filled in.

    The API server gives creation times in whole seconds, while requests are recorded to the
    microsecond: the window ends at the start of the next second, so a request recorded in the second
    the job was created is not lost."""
    end = created.replace(microsecond=0) + timedelta(seconds=1)
    return spec.model_copy(
        update={
            "uri": spec.uri or recordings_prefix(root, namespace, spec.alias),
            "until": spec.until or rfc3339(end),
        }
    )


def _days(since: datetime, until: datetime) -> Iterator[datetime]:
    day = since.replace(hour=0, minute=0, second=0, microsecond=0)
    while day < until:
        yield day
        day += timedelta(days=1)


def key_time(uri: str) -> datetime | None:
    match = _KEY_TIME.search(uri)
    if match is None:
        return None
    return datetime.strptime(match.group(1), "%Y%m%dT%H%M%S.%f").replace(tzinfo=UTC)


def record_uris(prefix: str, since: datetime, until: datetime) -> list[str]:
    """The recorded objects whose key time is in [since, until), oldest first; other files under
    the day folders are returned too (they are rejected as not records, so they get counted)."""
    base = prefix.rstrip("/")
    found: list[tuple[datetime, str]] = []
    for day in _days(since, until):
        for uri in store.list_uris(f"{base}/{day:%Y-%m-%d}/"):
            when = key_time(uri)
            if when is None:
                found.append((day, uri))
            elif since <= when < until:
                found.append((when, uri))
    return [uri for _, uri in sorted(found)]


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def prompt_hash(system: str | None, messages: Sequence[dict[str, str]]) -> str:
    """The row id of a deduplicated prompt: the same conversation up to spacing and case."""
    parts = [normalise(system or "")] + [f"{m['role']}:{normalise(m['content'])}" for m in messages]
    return "t-" + hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:24]


def record_to_row(obj: Any, spec: FromTrafficSpec, namespace: str | None = None) -> dict[str, Any]:
    """A dataset row (JSON) from a recorded object, or ValueError with the reason it is unusable.
    `namespace` None accepts records of any namespace (the prefix already names one)."""
    if not isinstance(obj, dict) or obj.get("kind") != RECORD_KIND:
        raise ValueError(f"not a recorded request (kind is not {RECORD_KIND})")
    if obj.get("alias") != spec.alias or namespace not in (None, obj.get("namespace")):
        raise ValueError(f"recorded for {obj.get('namespace')}/{obj.get('alias')}, not alias {spec.alias}")
    if not isinstance(obj.get("id"), str) or not obj["id"]:
        raise ValueError("id is missing")
    if not isinstance(obj.get("timestamp"), str):
        raise ValueError("timestamp is missing")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    system: str | None = None
    head = messages[0] if isinstance(messages[0], dict) else {}
    if head.get("role") == "system" and isinstance(head.get("content"), str):
        system, messages = head["content"], messages[1:]
    if spec.system_prompt == "drop":
        system = None
        messages = [m for m in messages if not (isinstance(m, dict) and m.get("role") == "system")]
    if not messages:
        raise ValueError("no user message")
    row: dict[str, Any] = {"messages": messages}
    if system:
        row["system"] = system
    if isinstance(obj.get("response"), str) and obj["response"]:
        row["reference"] = obj["response"]
    checked = dataset.row_from_obj(row)  # the dataset's own rules: roles, text content, last turn user
    assert checked.messages is not None
    clean = [dict(m) for m in checked.messages]
    row["messages"] = clean
    row["id"] = prompt_hash(system, clean) if spec.dedupe else f"r-{obj['id']}"
    return row


@dataclass
class Rejection:
    uri: str
    reason: str


class TrafficStream:
    """The window's rows as JSONL lines (bytes), counting as it goes; `counts` is final once the
    stream is exhausted, which is also when an empty or mostly invalid window raises."""

    def __init__(self, spec: FromTrafficSpec, now: datetime, namespace: str | None = None) -> None:
        if spec.uri is None:
            raise dataset.DatasetInvalid(
                "dataset.fromTraffic.uri is not set: the operator fills it in; offline, name the alias's recordings prefix there"
            )
        self.spec = spec
        self.namespace = namespace
        self.since, self.until = window(spec, now)
        self.prefix = spec.uri
        self.uris = record_uris(spec.uri, self.since, self.until)
        self.counts = TrafficCounts(
            found=len(self.uris), since=rfc3339(self.since), until=rfc3339(self.until)
        )
        self.first_rejection: Rejection | None = None
        self.rejections: list[Rejection] = []
        self._lines = self._generate()

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return next(self._lines)

    def describe(self) -> str:
        return (
            f"recorded requests of alias {self.spec.alias} from {self.counts.since} "
            f"to {self.counts.until} under {self.prefix}"
        )

    def _reject(self, uri: str, reason: str) -> None:
        self.counts.rejected += 1
        rejection = Rejection(uri, reason)
        self.first_rejection = self.first_rejection or rejection
        self.rejections.append(rejection)

    def _generate(self) -> Iterator[bytes]:
        seen = dataset.SeenIds()
        for i, uri in enumerate(self.uris):
            if self.spec.max_rows is not None and self.counts.kept >= self.spec.max_rows:
                self.counts.over_max_rows = len(self.uris) - i
                break
            try:
                row = record_to_row(json.loads(store.read_bytes(uri)), self.spec, self.namespace)
            except json.JSONDecodeError as exc:
                self._reject(uri, f"not valid JSON ({exc.msg})")
                continue
            except UnicodeDecodeError:
                self._reject(uri, "not UTF-8 text")
                continue
            except ValueError as exc:
                self._reject(uri, str(exc))
                continue
            if not seen.add(row["id"]):
                self.counts.deduplicated += 1
                continue
            self.counts.kept += 1
            yield json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        self._check()

    def _check(self) -> None:
        if self.counts.found == 0:
            raise NoTraffic(f"no {self.describe()}")
        first = self.first_rejection
        hint = dataset.Rejected(0, f"{first.uri}: {first.reason}", "") if first else None
        usable = self.counts.kept + self.counts.deduplicated
        problem = dataset.invalid_share_problem(usable, self.counts.rejected, hint)
        if problem is not None:
            raise NoTraffic(f"{problem.replace('line 0: ', '')} ({self.describe()})")


def write_rejections(stream: TrafficStream, path: Path) -> None:
    """The refused objects by key and reason only: their text is the users' (redacted) traffic."""
    with path.open("w", encoding="utf-8") as f:
        for r in stream.rejections:
            f.write(json.dumps({"uri": r.uri, "reason": r.reason}, ensure_ascii=False) + "\n")


def traffic_summary(counts: TrafficCounts) -> str:
    capped = f", {counts.over_max_rows} past maxRows" if counts.over_max_rows else ""
    return (
        f"recorded requests: {counts.found} found, {counts.kept} kept, {counts.deduplicated} "
        f"deduplicated, {counts.rejected} rejected{capped}"
    )
