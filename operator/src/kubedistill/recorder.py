"""The gateway's recorder: a LiteLLM custom callback that stores requests to recording aliases.

The operator ships this file's source into the gateway's ConfigMap beside `config.yaml` and names
it in `litellm_settings.callbacks` (`kubedistill_recorder.proxy_handler_instance`), so LiteLLM's
own logging hook calls it after each successful request: no sidecar, no second hop. Which aliases
record, and how, is `recording.json` in the same directory (`RECORDING_FILE`), rendered by the
operator from `ModelAlias.spec.recording`; a request to any other model is never looked at.

One request → one JSON object (`build_record`): alias, namespace, timestamp, the redacted and
truncated messages, the teacher's answer, the model that answered and the token usage, at
`<destination>/<YYYY-MM-DD>/<HH>/<YYYYmmddTHHMMSS.ffffff>Z-<request id>.json`, so a time window is
read by listing days and the keys sort by time. Sampling is a pure function of the request id
(`sampled`), so a rate's decision can be checked and never changes on a retry.

Only the standard library is imported at module level: the operator and the tests import the pure
parts without LiteLLM; the gateway's image has LiteLLM and boto3, which `proxy_handler_instance`
imports when LiteLLM asks for it. S3 credentials come from the gateway's env (`os.environ/NAME`
references in recording.json, filled from Secrets); a failed write is logged without any request
text and never fails the request.
"""

# No `from __future__ import annotations`: LiteLLM loads this file without registering it in
# sys.modules, and dataclasses then cannot resolve string annotations (they look the module up there).
import asyncio
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("kubedistill.recorder")

RECORD_KIND = "kubedistill.io/recorded-request/v1"
RECORDING_FILE = "recording.json"
RECORDING_FILE_ENV = "KUBEDISTILL_RECORDING_CONFIG"
ENV_REF = "os.environ/"
TRUNCATED_MARK = "…[truncated]"

# ------------------------------------------------------------------------------------ redaction

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# Card candidates: 13-19 digits, optionally grouped by spaces or dashes; kept only when Luhn-valid,
# so an order number or a long sum is left alone.
_CARD = re.compile(r"(?<![\d\w])\d(?:[ -]?\d){12,18}(?![\d\w])")
# Phone candidates: an optional +country code, then digit groups joined by spaces, dots, dashes or
# parentheses; kept only with 9-15 digits and a '+' or a separator, which leaves plain numbers,
# years and ISO dates (8 digits) alone.
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,5}(?:[ .-]\d{2,5}){1,4}(?![\w])"
)
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

BUILTIN_REDACTORS = ("email", "phone", "card")


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum every payment card number passes (and 9 in 10 random numbers fail)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def _card(match: re.Match[str]) -> str | None:
    digits = _digits(match.group(0))
    return "[CARD]" if 13 <= len(digits) <= 19 and luhn_ok(digits) else None


def _phone(match: re.Match[str]) -> str | None:
    text = match.group(0)
    digits = _digits(text)
    if not 9 <= len(digits) <= 15 or _ISO_DATE.match(text):
        return None
    return "[PHONE]" if text.startswith("+") or any(c in text for c in " .-()") else None


@dataclass(frozen=True)
class _Pattern:
    name: str
    regex: re.Pattern[str]
    replace: Callable[[re.Match[str]], str | None]


def _builtin(name: str) -> _Pattern:
    if name == "email":
        return _Pattern(name, _EMAIL, lambda _m: "[EMAIL]")
    if name == "card":
        return _Pattern(name, _CARD, _card)
    return _Pattern(name, _PHONE, _phone)


def compile_redactors(specs: Sequence[str]) -> list[_Pattern]:
    """Built-in names (email, phone, card; cards before phones, so a card is never half a phone)
    and regexes, in that order; `re.error` for a bad regex."""
    builtins = [_builtin(n) for n in ("email", "card", "phone") if n in specs]
    custom = [
        _Pattern(s, re.compile(s), lambda _m: "[REDACTED]") for s in specs if s not in BUILTIN_REDACTORS
    ]
    return builtins + custom


def redact(text: str, patterns: Sequence[_Pattern], counts: dict[str, int] | None = None) -> str:
    """`text` with every match replaced by its placeholder; `counts` gains the number per pattern."""
    for pattern in patterns:

        def sub(match: re.Match[str], pattern: _Pattern = pattern) -> str:
            replacement = pattern.replace(match)
            if replacement is None:
                return match.group(0)
            if counts is not None:
                counts[pattern.name] = counts.get(pattern.name, 0) + 1
            return replacement

        text = pattern.regex.sub(sub, text)
    return text


# ------------------------------------------------------------------------------------- sampling


def sampled(request_id: str, rate: float) -> bool:
    """Whether a request is recorded at `rate`: a hash of its id against the rate, so the same
    request always gets the same answer and about `rate` of all requests are kept."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    digest = hashlib.sha256(request_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


# -------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Rule:
    """How one routed model name is recorded (one entry of recording.json)."""

    namespace: str
    alias: str
    destination: str
    sample_rate: float = 1.0
    redact: tuple[str, ...] = ("email", "phone", "card")
    max_prompt_chars: int = 32768
    endpoint: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    patterns: list[_Pattern] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "patterns", compile_redactors(self.redact))

    @staticmethod
    def from_json(obj: Mapping[str, Any]) -> "Rule":
        redactors = tuple(obj.get("redact", ("email", "phone", "card")))
        return Rule(
            namespace=str(obj["namespace"]),
            alias=str(obj["alias"]),
            destination=str(obj["destination"]).rstrip("/"),
            sample_rate=float(obj.get("sampleRate", 1.0)),
            redact=redactors,
            max_prompt_chars=int(obj.get("maxPromptChars", 32768)),
            endpoint=obj.get("endpoint"),
            access_key=obj.get("accessKeyId"),
            secret_key=obj.get("secretAccessKey"),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "namespace": self.namespace,
            "alias": self.alias,
            "destination": self.destination,
            "sampleRate": self.sample_rate,
            "redact": list(self.redact),
            "maxPromptChars": self.max_prompt_chars,
        }
        for key, value in (
            ("endpoint", self.endpoint),
            ("accessKeyId", self.access_key),
            ("secretAccessKey", self.secret_key),
        ):
            if value is not None:
                out[key] = value
        return out


def load_rules(text: str) -> dict[str, Rule]:
    """recording.json: `{"models": {<routed model name>: <rule>}}`."""
    return {name: Rule.from_json(rule) for name, rule in json.loads(text).get("models", {}).items()}


def resolve_env(value: str | None, environ: Mapping[str, str]) -> str | None:
    """LiteLLM's convention for secrets in config: `os.environ/NAME` is read from the env."""
    if value is not None and value.startswith(ENV_REF):
        return environ.get(value[len(ENV_REF) :])
    return value


def _text(content: Any) -> str | None:
    """A message's content as text: a string, or the text parts of a content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if parts and all(isinstance(p, str) for p in parts):
            return "".join(p for p in parts if isinstance(p, str))
    return None


def _cut(text: str, limit: int) -> tuple[str, bool]:
    return (text, False) if len(text) <= limit else (text[:limit] + TRUNCATED_MARK, True)


def response_text(response: Any) -> str | None:
    """The first choice's answer of an OpenAI-shaped chat response (a dict or a pydantic object)."""
    if hasattr(response, "model_dump"):
        response = response.model_dump()
    if not isinstance(response, dict):
        return None
    choices = response.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return None
    message = choices[0].get("message") or {}
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else None


def build_record(payload: Mapping[str, Any], rule: Rule, now: datetime | None = None) -> dict[str, Any]:
    """The recorded object of one request, from LiteLLM's StandardLoggingPayload: text redacted
    with the rule's patterns, each message and the answer cut at `max_prompt_chars`. Message parts
    that are not text (images, tool calls) are recorded as null content, which conversion rejects."""
    counts: dict[str, int] = {}
    truncated = False
    messages: list[dict[str, Any]] = []
    raw = payload.get("messages")
    if isinstance(raw, str):
        raw = [{"role": "user", "content": raw}]
    for message in raw if isinstance(raw, list) else []:
        if not isinstance(message, dict):
            continue
        text = _text(message.get("content"))
        if text is not None:
            text, cut = _cut(redact(text, rule.patterns, counts), rule.max_prompt_chars)
            truncated = truncated or cut
        messages.append({"role": message.get("role"), "content": text})
    answer = response_text(payload.get("response"))
    if answer is not None:
        answer, cut = _cut(redact(answer, rule.patterns, counts), rule.max_prompt_chars)
        truncated = truncated or cut
    start = payload.get("startTime")
    when = datetime.fromtimestamp(start, UTC) if isinstance(start, int | float) else now or datetime.now(UTC)
    return {
        "kind": RECORD_KIND,
        "id": str(payload.get("id") or ""),
        "alias": rule.alias,
        "namespace": rule.namespace,
        "timestamp": when.isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "model": payload.get("model"),
        "messages": messages,
        "response": answer,
        "usage": {
            "promptTokens": payload.get("prompt_tokens"),
            "completionTokens": payload.get("completion_tokens"),
            "totalTokens": payload.get("total_tokens"),
        },
        "redactions": counts,
        "truncated": truncated,
    }


def record_key(destination: str, when: datetime, request_id: str) -> str:
    """Where a record goes: a folder per day and hour, a name that sorts by time."""
    safe_id = re.sub(r"[^A-Za-z0-9._-]", "_", request_id)[:128] or "request"
    stamp = when.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%f")
    return f"{destination.rstrip('/')}/{when:%Y-%m-%d}/{when:%H}/{stamp}Z-{safe_id}.json"


def parse_timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


# --------------------------------------------------------------------------------------- the hook


def _split_s3(uri: str) -> tuple[str, str]:
    rest = uri.removeprefix("s3://")
    bucket, _, key = rest.partition("/")
    return bucket, key


class _Writer:
    """Puts objects with one boto3 client per (endpoint, key id); boto3 clients are thread-safe."""

    def __init__(self) -> None:
        self._clients: dict[tuple[str | None, str | None], Any] = {}

    def _client(self, rule: Rule) -> Any:
        access = resolve_env(rule.access_key, os.environ)
        key = (rule.endpoint, access)
        if key not in self._clients:
            import boto3

            self._clients[key] = boto3.client(
                "s3",
                endpoint_url=rule.endpoint,
                aws_access_key_id=access,
                aws_secret_access_key=resolve_env(rule.secret_key, os.environ),
                region_name=os.environ.get("AWS_REGION", "us-east-1"),
            )
        return self._clients[key]

    def put(self, rule: Rule, uri: str, body: bytes) -> None:
        if uri.startswith("file://"):
            path = Path(uri.removeprefix("file://"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
            return
        bucket, key = _split_s3(uri)
        self._client(rule).put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json")


def _config_path() -> Path:
    return Path(os.environ.get(RECORDING_FILE_ENV) or Path(__file__).with_name(RECORDING_FILE))


def _make_handler() -> Any:
    from litellm.integrations.custom_logger import CustomLogger

    class Recorder(CustomLogger):
        def __init__(self) -> None:
            super().__init__()
            path = _config_path()
            self.rules = load_rules(path.read_text(encoding="utf-8")) if path.is_file() else {}
            self.writer = _Writer()
            self.written = 0
            self.failed = 0
            log.info("recording %d model name(s): %s", len(self.rules), ", ".join(sorted(self.rules)))

        async def async_log_success_event(
            self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
        ) -> None:
            payload = kwargs.get("standard_logging_object") or {}
            rule = self.rules.get(str(payload.get("model_group") or ""))
            # LiteLLM's call id is unique per request; the payload's id may be the provider's response id.
            request_id = str(kwargs.get("litellm_call_id") or payload.get("id") or "")
            payload = {**payload, "id": request_id}
            if rule is None or not request_id or not sampled(request_id, rule.sample_rate):
                return
            if payload.get("call_type") not in ("completion", "acompletion"):
                return
            record = build_record(payload, rule)
            when = parse_timestamp(record["timestamp"])
            uri = record_key(rule.destination, when, request_id)
            body = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            try:
                await asyncio.to_thread(self.writer.put, rule, uri, body)
                self.written += 1
            except Exception as exc:  # a recording failure must never fail or slow the request
                self.failed += 1
                log.error(
                    "kubedistill recording of %s/%s to %s failed: %s: %s",
                    rule.namespace,
                    rule.alias,
                    rule.destination,
                    type(exc).__name__,
                    exc,
                )

    return Recorder()


_handler: Any = None


def __getattr__(name: str) -> Any:
    # LiteLLM reads `proxy_handler_instance` from this module; building it imports LiteLLM, which
    # only the gateway has, so it is made on first access (PEP 562) rather than at import.
    global _handler
    if name == "proxy_handler_instance":
        if _handler is None:
            _handler = _make_handler()
        return _handler
    raise AttributeError(name)
