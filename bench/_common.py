"""What every benchmark prints: the machine it ran on, its figures beside their baselines, and one JSON
line last (`bench/report.py` gathers those lines into one table).

A ratio is `{"name", "value", "target"}`; the target is a comparison such as "<= 1.3" or None (shown
for information). Raw times move with the machine and its load; ratios against a baseline measured
in the same run, on the same machine, move far less — the README's figures say both.
"""

from __future__ import annotations

import json
import operator
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# This checkout's code, also for the processes a benchmark starts (child_pythonpath).
SOURCES = [
    str(REPO / "operator" / "src"),
    str(REPO / "trainer-image" / "src"),
    str(REPO / "tests" / "harness"),
]
sys.path[:0] = [s for s in SOURCES if s not in sys.path]

from kubedistill.machine import describe, line  # noqa: E402

_OPS = {"<=": operator.le, ">=": operator.ge}


def child_pythonpath() -> str:
    return os.pathsep.join([*SOURCES, *filter(None, [os.environ.get("PYTHONPATH")])])


def ratio(name: str, value: float | None, target: str | None = None) -> dict[str, Any]:
    return {"name": name, "value": None if value is None else round(value, 3), "target": target}


def meets(entry: dict[str, Any]) -> bool | None:
    """Whether a ratio meets its target; None when it has none (or no value)."""
    target, value = entry.get("target"), entry.get("value")
    if not target or value is None:
        return None
    op, _, bound = target.partition(" ")
    return bool(_OPS[op](value, float(bound)))


def machine_banner() -> dict[str, Any]:
    """The machine now; printed at the start (stderr) so a reader sees what the figures come from."""
    found = describe()
    print(f"machine: {line(found)}", file=sys.stderr)
    return found


def finish(bench: str, ratios: list[dict[str, Any]], machine: dict[str, Any], **figures: Any) -> None:
    """Print the ratios readably, then the JSON line: bench, ratios, machine (start and end load), figures."""
    end = describe()
    for entry in ratios:
        verdict = {True: "meets", False: "MISSES", None: "(information)"}[meets(entry)]
        print(f"{bench}: {entry['name']} = {entry['value']} target {entry['target'] or '-'} {verdict}")
    machine = {**machine, "loadAvg1mEnd": end["loadAvg1m"]}
    print(json.dumps({"bench": bench, "ratios": ratios, "machine": machine, **figures}))
