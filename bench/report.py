"""One table of every benchmark's ratios, from the JSON line each printed last.

    python bench/report.py OUTPUT_FILE...      # `make bench` passes what each benchmark printed

Ratios, not times: each one divides a figure by a baseline measured in the same run on the same
machine, so it moves far less between machines and loads than the times it comes from. The machine
and its load average (at the start and end of each benchmark) are printed with the table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from _common import meets


def last_json(text: str) -> dict[str, Any] | None:
    """The last line that is a JSON object, or None (a benchmark that crashed printed none)."""
    for line in reversed(text.strip().splitlines()):
        try:
            found = json.loads(line)
        except ValueError:
            continue
        if isinstance(found, dict):
            return found
    return None


def table(reports: list[tuple[str, dict[str, Any] | None]]) -> list[str]:
    rows = [("benchmark", "ratio", "value", "target", "", "load avg start/end")]
    for name, report in reports:
        if report is None:
            rows.append((name, "no result (see its output above)", "", "", "FAILED", ""))
            continue
        m = report.get("machine", {})
        load = f"{m.get('loadAvg1m', '?')}/{m.get('loadAvg1mEnd', '?')}"
        for entry in report["ratios"]:
            verdict = {True: "ok", False: "MISSES", None: "info"}[meets(entry)]
            value = "–" if entry["value"] is None else f"{entry['value']:.3f}"
            rows.append((name, entry["name"], value, entry["target"] or "", verdict, load))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def main(paths: list[str]) -> int:
    reports = [(Path(p).stem, last_json(Path(p).read_text(errors="replace"))) for p in paths]
    machines = {json.dumps({k: v for k, v in (r or {}).get("machine", {}).items() if k in ("cpu", "cores")})
                for _, r in reports if r}  # fmt: skip
    print()
    for machine in sorted(machines):
        found = json.loads(machine)
        print(f"machine: {found.get('cpu')}, {found.get('cores')} cores")
    print("\n".join(table(reports)))
    return 1 if any(r is None for _, r in reports) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
