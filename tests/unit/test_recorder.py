"""The gateway recorder's pure parts: redaction, sampling, the recorded object and its key."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kubedistill import recorder
from kubedistill.recorder import Rule, build_record, compile_redactors, luhn_ok, record_key, redact, sampled

ALL = compile_redactors(["email", "phone", "card"])


def rule(**kw: object) -> Rule:
    base: dict[str, object] = {
        "namespace": "default",
        "alias": "smart",
        "destination": "s3://b/rec/default/smart",
    }
    return Rule(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [
        "write to jane.doe+work@example.co.uk today",
        "ops@mail-1.example.org",
    ],
)
def test_emails_are_redacted(text: str) -> None:
    out = redact(text, ALL)
    assert "@" not in out and "[EMAIL]" in out


def test_card_numbers_need_a_valid_luhn_checksum() -> None:
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112")
    counts: dict[str, int] = {}
    out = redact("card 4111 1111 1111 1111, order 4111111111111112", ALL, counts)
    assert out == "card [CARD], order 4111111111111112"
    assert counts == {"card": 1}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("call +44 20 7946 0958 now", "call [PHONE] now"),
        ("call (555) 123-4567", "call [PHONE]"),
        ("call 555-123-4567.", "call [PHONE]."),
        # Ordinary numbers, years, dates and sums stay.
        ("in 2024 we sold 123456789 units", "in 2024 we sold 123456789 units"),
        ("on 2026-12-03 at 14:30", "on 2026-12-03 at 14:30"),
        ("version 1.2.3 costs 12.50", "version 1.2.3 costs 12.50"),
    ],
)
def test_phone_numbers(text: str, expected: str) -> None:
    assert redact(text, ALL) == expected


def test_custom_regexes_and_only_the_named_builtins() -> None:
    patterns = compile_redactors(["email", r"ACME-\d{6}"])
    assert redact("ACME-123456 by a@b.io, +44 20 7946 0958", patterns) == (
        "[REDACTED] by [EMAIL], +44 20 7946 0958"
    )
    with pytest.raises(re.error):
        compile_redactors(["(unclosed"])


def test_sampling_is_a_pure_function_of_the_request_id() -> None:
    ids = [f"req-{i}" for i in range(4000)]
    kept = [i for i in ids if sampled(i, 0.25)]
    assert kept == [i for i in ids if sampled(i, 0.25)]
    assert 850 < len(kept) < 1150
    assert all(sampled(i, 1.0) for i in ids[:50]) and not any(sampled(i, 0.0) for i in ids[:50])
    # A request kept at a low rate is kept at every higher one.
    assert set(i for i in ids if sampled(i, 0.1)) <= set(kept)


def payload(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": "chatcmpl-1",
        "model_group": "smart",
        "model": "teacher-model",
        "call_type": "acompletion",
        "startTime": datetime(2026, 12, 3, 14, 0, 5, 250000, tzinfo=UTC).timestamp(),
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "mail me at a@b.io"}]},
        ],
        "response": {"choices": [{"message": {"role": "assistant", "content": "ok, a@b.io noted"}}]},
        "prompt_tokens": 12,
        "completion_tokens": 4,
        "total_tokens": 16,
    }
    return {**base, **kw}


def test_the_recorded_object_is_redacted_and_complete() -> None:
    record = build_record(payload(), rule())
    assert record == {
        "kind": recorder.RECORD_KIND,
        "id": "chatcmpl-1",
        "alias": "smart",
        "namespace": "default",
        "timestamp": "2026-12-03T14:00:05.250000Z",
        "model": "teacher-model",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "mail me at [EMAIL]"},
        ],
        "response": "ok, [EMAIL] noted",
        "usage": {"promptTokens": 12, "completionTokens": 4, "totalTokens": 16},
        "redactions": {"email": 2},
        "truncated": False,
    }
    assert "a@b.io" not in json.dumps(record)


def test_long_prompts_are_cut_at_max_prompt_chars() -> None:
    record = build_record(payload(messages="x" * 100), rule(max_prompt_chars=10))
    assert record["messages"] == [{"role": "user", "content": "x" * 10 + recorder.TRUNCATED_MARK}]
    assert record["truncated"] is True


def test_non_text_content_is_kept_as_null_for_conversion_to_reject() -> None:
    image = [{"type": "image_url", "image_url": {"url": "data:..."}}]
    record = build_record(payload(messages=[{"role": "user", "content": image}]), rule())
    assert record["messages"] == [{"role": "user", "content": None}]


def test_keys_sort_by_time_in_day_and_hour_folders() -> None:
    when = datetime(2026, 12, 3, 9, 5, 1, 7, tzinfo=UTC)
    key = record_key("s3://b/rec/default/smart/", when, "chatcmpl/../x")
    assert key == "s3://b/rec/default/smart/2026-12-03/09/20261203T090501.000007Z-chatcmpl_.._x.json"
    later = record_key("s3://b/p", datetime(2026, 12, 3, 9, 5, 1, 8, tzinfo=UTC), "a")
    assert key.rsplit("/", 1)[1] < later.rsplit("/", 1)[1]


def test_rules_round_trip_and_env_references_resolve() -> None:
    r = rule(sample_rate=0.5, redact=("email",), endpoint="http://s3", access_key="os.environ/K")
    loaded = recorder.load_rules(json.dumps({"models": {"smart": r.to_json()}}))["smart"]
    assert loaded == r and [p.name for p in loaded.patterns] == ["email"]
    assert recorder.resolve_env("os.environ/K", {"K": "v"}) == "v"
    assert recorder.resolve_env("plain", {}) == "plain"


def test_the_module_loads_the_way_litellm_loads_a_callback_file(tmp_path: Path) -> None:
    # LiteLLM's get_instance_fn: spec_from_file_location + exec_module, never put in sys.modules.
    source = tmp_path / "kubedistill_recorder.py"
    source.write_text(Path(recorder.__file__).read_text())
    spec = importlib.util.spec_from_file_location("kubedistill_recorder", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "kubedistill_recorder" not in sys.modules
    assert module.load_rules(json.dumps({"models": {"smart": rule().to_json()}}))["smart"].alias == "smart"
    with pytest.raises(ModuleNotFoundError, match="litellm"):
        module.proxy_handler_instance  # noqa: B018 — the handler needs LiteLLM, which only the gateway has
