"""Recorded requests → dataset rows: conversion, dedupe, the window, counts and the clear failures."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kubedistill import dataset, traffic
from kubedistill.api.models import DatasetSpec, FromTrafficSpec
from kubedistill.recorder import Rule, build_record, record_key

NOW = datetime(2026, 12, 3, 15, 0, tzinfo=UTC)


def spec(**kw: Any) -> FromTrafficSpec:
    return FromTrafficSpec.model_validate({"alias": "smart", "since": "7d", **kw})


def record(
    text: str, *, rid: str = "r1", system: str | None = None, response: str = "answer"
) -> dict[str, Any]:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}
    ]
    payload = {
        "id": rid,
        "messages": messages,
        "response": {"choices": [{"message": {"content": response}}]},
        "startTime": NOW.timestamp() - 3600,
    }
    return build_record(payload, Rule(namespace="default", alias="smart", destination="unused"))


def test_a_record_becomes_a_row_with_messages_system_and_reference() -> None:
    row = traffic.record_to_row(record("Hi there", system="Be brief."), spec())
    assert row == {
        "messages": [{"role": "user", "content": "Hi there"}],
        "system": "Be brief.",
        "reference": "answer",
        "id": traffic.prompt_hash("Be brief.", [{"role": "user", "content": "Hi there"}]),
    }
    dropped = traffic.record_to_row(record("Hi there", system="Be brief."), spec(systemPrompt="drop"))
    assert "system" not in dropped and dropped["id"] != row["id"]
    assert traffic.record_to_row(record("Hi", rid="x"), spec(dedupe=False))["id"] == "r-x"


def test_the_dedupe_hash_ignores_spacing_and_case_only() -> None:
    def h(text: str) -> str:
        return traffic.prompt_hash(None, [{"role": "user", "content": text}])

    assert h("What is  2+2?\n") == h("what is 2+2?")
    assert h("what is 2+2?") != h("what is 2+3?")


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ([1, 2], "not a recorded request"),
        ({**record("x"), "kind": "other"}, "not a recorded request"),
        ({**record("x"), "alias": "other"}, "not alias smart"),
        ({**record("x"), "id": ""}, "id is missing"),
        ({**record("x"), "messages": []}, "non-empty list"),
        ({**record("x"), "messages": [{"role": "user", "content": None}]}, r"messages\[0\] must be"),
        ({**record("x"), "messages": [{"role": "tool", "content": "t"}]}, r"messages\[0\] must be"),
        (
            {
                **record("x"),
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            },
            "last message must have role user",
        ),
        ({**record("x"), "messages": [{"role": "system", "content": "s"}]}, "no user message"),
    ],
)
def test_invalid_records_are_refused_with_a_reason(obj: Any, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        traffic.record_to_row(obj, spec())


def test_window_defaults_to_now_and_counts_back() -> None:
    since, until = traffic.window(spec(since="2d"), NOW)
    assert (since, until) == (datetime(2026, 12, 1, 15, tzinfo=UTC), NOW)
    since, until = traffic.window(spec(since="2026-12-03T10:00:00Z", until="2026-12-03T11:30:00+01:00"), NOW)
    assert until == datetime(2026, 12, 3, 10, 30, tzinfo=UTC) and since == datetime(
        2026, 12, 3, 10, tzinfo=UTC
    )
    with pytest.raises(dataset.DatasetInvalid, match="not before"):
        traffic.window(spec(since="2026-12-04T00:00:00Z"), NOW)


def test_with_defaults_fixes_the_prefix_and_the_end_of_the_window() -> None:
    filled = traffic.with_defaults(spec(), "s3://bucket/kd", "team-a", NOW)
    assert filled.uri == "s3://bucket/kd/recordings/team-a/smart"
    # Creation times have whole seconds: a request recorded later in that second is still in the window.
    assert filled.until == "2026-12-03T15:00:01Z"
    explicit = traffic.with_defaults(
        spec(uri="s3://other/p", until="2026-12-01T00:00:00Z"), "s3://b", "ns", NOW
    )
    assert (explicit.uri, explicit.until) == ("s3://other/p", "2026-12-01T00:00:00Z")


def test_dataset_sources_stay_exclusive() -> None:
    DatasetSpec.model_validate({"fromTraffic": {"alias": "smart", "since": "7d"}})
    with pytest.raises(ValidationError, match="exactly one of uri, configMapRef, prompts or fromTraffic"):
        DatasetSpec.model_validate({"prompts": ["a"], "fromTraffic": {"alias": "smart", "since": "7d"}})
    with pytest.raises(ValidationError, match="since"):
        FromTrafficSpec.model_validate({"alias": "smart", "since": "last week"})


def write(prefix: str, obj: Any, when: datetime, rid: str) -> None:
    path = Path(record_key(prefix, when, rid).removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")


def test_a_window_is_read_in_time_order_deduplicated_capped_and_counted(tmp_path: Path) -> None:
    prefix = tmp_path.as_uri() + "/rec"
    hour = datetime(2026, 12, 3, 12, tzinfo=UTC)
    for i, text in enumerate(["b", "a", "B ", "c", "d"]):
        write(prefix, record(text, rid=f"r{i}"), hour.replace(minute=i), f"r{i}")
    write(prefix, "{broken", hour.replace(minute=10), "bad")
    write(prefix, record("too old"), datetime(2026, 11, 20, tzinfo=UTC), "old")
    write(prefix, record("too new"), NOW, "new")  # `until` is exclusive
    stream = traffic.TrafficStream(spec(uri=prefix), NOW)
    rows = [json.loads(line) for line in stream]
    assert [r["messages"][0]["content"] for r in rows] == ["b", "a", "c", "d"]
    assert stream.counts.model_dump(exclude={"since", "until"}) == {
        "found": 6,
        "kept": 4,
        "deduplicated": 1,
        "rejected": 1,
        "over_max_rows": 0,
    }
    assert stream.rejections[0].reason.startswith("not valid JSON")
    capped = traffic.TrafficStream(spec(uri=prefix, maxRows=2), NOW)
    assert len(list(capped)) == 2 and capped.counts.over_max_rows == 4


def test_an_empty_window_and_a_mostly_broken_one_fail_clearly(tmp_path: Path) -> None:
    prefix = tmp_path.as_uri() + "/rec"
    with pytest.raises(traffic.NoTraffic, match="no recorded requests of alias smart from 2026-11-26"):
        list(traffic.TrafficStream(spec(uri=prefix), NOW))
    write(prefix, "{broken", datetime(2026, 12, 3, 12, tzinfo=UTC), "bad")
    with pytest.raises(traffic.NoTraffic, match=r"no valid rows \(1 invalid; first: .*not valid JSON"):
        list(traffic.TrafficStream(spec(uri=prefix), NOW))


def test_the_dataset_reader_streams_traffic_like_a_file(tmp_path: Path) -> None:
    prefix = tmp_path.as_uri() + "/rec"
    write(prefix, record("hello", system="sys"), datetime.now(UTC).replace(microsecond=0), "r1")
    parsed = dataset.load(
        DatasetSpec.model_validate({"fromTraffic": {"alias": "smart", "since": "1h", "uri": prefix}})
    )
    assert [r.student_messages() for r in parsed.rows] == [
        [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"}]
    ]
    assert parsed.rows[0].reference == "answer"
