"""Dataset rows: validation reasons, the invalid-share threshold, the hash split, the three sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubedistill import dataset
from kubedistill.api.models import DatasetSpec


def lines(*objs: object) -> list[str]:
    return [o if isinstance(o, str) else json.dumps(o) for o in objs]


def test_valid_rows_are_normalised() -> None:
    parsed = dataset.parse_lines(
        lines(
            {"id": "a", "prompt": "Hi?", "reference": "Hello"},
            {"id": 7, "messages": [{"role": "user", "content": "Q"}], "system": "be brief", "extra": 1},
            "",
        )
    )
    assert parsed.rejected == []
    assert [r.to_json() for r in parsed.rows] == [
        {"id": "a", "prompt": "Hi?", "reference": "Hello"},
        {"id": "7", "messages": [{"role": "user", "content": "Q"}], "system": "be brief"},
    ]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "row is not a JSON object"),
        ({"id": "x"}, "exactly one of prompt or messages"),
        ({"id": "x", "prompt": "a", "messages": []}, "exactly one of prompt or messages"),
        ({"id": "x", "prompt": "   "}, "prompt must be a non-empty string"),
        ({"id": "x", "messages": []}, "messages must be a non-empty list"),
        ({"id": "x", "messages": [{"role": "bot", "content": "a"}]}, "messages[0] must be"),
        (
            {"id": "x", "messages": [{"role": "assistant", "content": "a"}]},
            "last message must have role user",
        ),
        ({"id": "x", "prompt": "a", "reference": 3}, "reference must be a string"),
        ({"id": True, "prompt": "a"}, "id must be a non-empty string"),
        ({"id": "x" * 300, "prompt": "a"}, "id longer than 256"),
    ],
)
def test_invalid_rows_get_a_reason(line: object, reason: str) -> None:
    parsed = dataset.parse_lines(lines({"id": "ok", "prompt": "fine"}, line))
    assert [r.id for r in parsed.rows] == ["ok"]
    assert len(parsed.rejected) == 1
    assert parsed.rejected[0].line == 2
    assert reason in parsed.rejected[0].reason


def test_duplicate_ids_and_missing_ids() -> None:
    parsed = dataset.parse_lines(
        lines({"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}, {"prompt": "z"})
    )
    assert parsed.rejected[0].reason == "duplicate id 'a'"
    assert parsed.rows[1].id.startswith("p-")
    # The derived id is a function of the content: the same row twice is a duplicate.
    again = dataset.parse_lines(lines({"prompt": "z"}, {"prompt": "z"}))
    assert len(again.rows) == 1 and "duplicate id" in again.rejected[0].reason


def test_threshold_fails_only_past_half() -> None:
    half = dataset.parse_lines(lines({"id": "a", "prompt": "x"}, "{bad"))
    dataset.check_invalid_share(half)  # 50% invalid is still allowed
    worse = dataset.parse_lines(lines({"id": "a", "prompt": "x"}, "{bad", "[]"))
    with pytest.raises(
        dataset.DatasetInvalid, match=r"2 of 3 dataset rows are invalid \(67% > 50% allowed\)"
    ):
        dataset.check_invalid_share(worse)
    with pytest.raises(dataset.DatasetInvalid, match="no valid rows"):
        dataset.check_invalid_share(dataset.parse_lines(lines("{bad")))


def test_split_is_deterministic_and_near_the_fraction() -> None:
    ids = [f"row-{i}" for i in range(4000)]
    test = {i for i in ids if dataset.is_test(i, 0.1)}
    assert 320 < len(test) < 480
    assert {i for i in reversed(ids) if dataset.is_test(i, 0.1)} == test
    # A larger fraction only moves rows from train to test, never the other way.
    assert test <= {i for i in ids if dataset.is_test(i, 0.2)}
    assert not any(dataset.is_test(i, 0.0) for i in ids)


def test_messages_for_teacher_and_student() -> None:
    row = dataset.Row(id="a", prompt="Classify: refund please", system="Labels: billing, bug")
    assert row.student_messages() == [
        {"role": "system", "content": "Labels: billing, bug"},
        {"role": "user", "content": "Classify: refund please"},
    ]
    teacher = row.teacher_messages("Think carefully. Examples: ...")
    assert teacher[0] == {
        "role": "system",
        "content": "Think carefully. Examples: ...\n\nLabels: billing, bug",
    }
    plain = dataset.Row(id="b", prompt="hi")
    assert plain.teacher_messages("Rules") == [
        {"role": "system", "content": "Rules"},
        {"role": "user", "content": "hi"},
    ]
    examples = [
        {"role": "user", "content": "My card was charged twice"},
        {"role": "assistant", "content": "billing"},
    ]
    assert row.teacher_messages("Rules", examples) == [
        {"role": "system", "content": "Rules\n\nLabels: billing, bug"},
        *examples,
        {"role": "user", "content": "Classify: refund please"},
    ]
    assert plain.teacher_messages(None, examples) == [*examples, {"role": "user", "content": "hi"}]
    multi = dataset.Row(
        id="c",
        messages=(
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "1"},
            {"role": "user", "content": "two"},
        ),
    )
    assert multi.prompt_text() == "two"


def test_inline_prompts_get_stable_ids_and_caps(tmp_path: Path) -> None:
    spec = DatasetSpec(prompts=["a?", "b?", "c?"], num_prompts=2)
    first = dataset.load(spec, environ={})
    assert [r.prompt for r in first.rows] == ["a?", "b?"]
    assert [r.id for r in first.rows] == [r.id for r in dataset.load(spec, environ={}).rows]
    assert first.rows[0].id == dataset.text_id("a?")


def test_uri_source_through_the_store(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines({"id": "1", "prompt": "x"}, "{broken", {"id": "2", "prompt": "y"})))
    parsed = dataset.load(DatasetSpec(uri=path.as_uri()), environ={})
    assert [r.id for r in parsed.rows] == ["1", "2"]
    assert parsed.rejected[0].to_json()["line"] == 2
    with pytest.raises(dataset.DatasetInvalid, match="does not exist"):
        dataset.load(DatasetSpec(uri=(tmp_path / "missing.jsonl").as_uri()), environ={})


def test_config_map_source_reads_the_mounted_file(tmp_path: Path) -> None:
    spec = DatasetSpec(config_map_ref={"name": "prompts", "key": "rows.jsonl"})
    mounted = tmp_path / "rows.jsonl"
    mounted.write_text(json.dumps({"id": "cm", "prompt": "from a ConfigMap"}) + "\n")
    parsed = dataset.load(spec, environ={dataset.DATASET_FILE_ENV: str(mounted)})
    assert [r.id for r in parsed.rows] == ["cm"]
    with pytest.raises(dataset.DatasetInvalid, match=r"prompts/rows\.jsonl is not mounted"):
        dataset.load(spec, environ={})
    with pytest.raises(dataset.DatasetInvalid, match="cannot read dataset configMapRef"):
        dataset.load(spec, environ={dataset.DATASET_FILE_ENV: str(tmp_path / "nope")})
