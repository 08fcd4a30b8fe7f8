"""`make bench`'s closing table (bench/report.py): each benchmark's last JSON line, its ratios and targets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from _common import meets, ratio
from report import last_json, main, table

REPORT = {
    "bench": "b",
    "ratios": [
        ratio("fast / baseline", 0.95, ">= 0.9"),
        ratio("slow / baseline", 1.61, "<= 1.3"),
        ratio("info", 2.0),
    ],
    "machine": {"cpu": "Test CPU", "cores": 2, "loadAvg1m": 0.3, "loadAvg1mEnd": 0.4},
}


@pytest.mark.parametrize(
    ("entry", "expected"),
    [(ratio("a", 0.95, ">= 0.9"), True), (ratio("a", 1.61, "<= 1.3"), False), (ratio("a", 2.0), None),
     (ratio("a", None, "<= 1"), None)],
)  # fmt: skip
def test_meets(entry: dict[str, object], expected: bool | None) -> None:
    assert meets(entry) is expected


def test_the_last_json_line_counts_and_a_crash_has_none() -> None:
    text = "noise\n" + json.dumps({"bench": "old"}) + "\n" + json.dumps(REPORT) + "\nWarning: at exit\n"
    assert last_json(text) == REPORT
    assert last_json("Traceback (most recent call last):\n  ...\n") is None


def test_one_table_with_verdicts_and_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = table([("b", REPORT), ("crashed", None)])
    assert lines[1].split() == ["b", "fast", "/", "baseline", "0.950", ">=", "0.9", "ok", "0.3/0.4"]
    assert "MISSES" in lines[2] and lines[3].split()[-2] == "info"
    assert "FAILED" in lines[4]
    (tmp_path / "b.out").write_text(json.dumps(REPORT) + "\n")
    (tmp_path / "crashed.out").write_text("Killed\n")
    assert main([str(tmp_path / "b.out"), str(tmp_path / "crashed.out")]) == 1
    assert "machine: Test CPU, 2 cores" in capsys.readouterr().out
    assert main([str(tmp_path / "b.out")]) == 0
