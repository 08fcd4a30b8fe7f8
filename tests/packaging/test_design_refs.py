"""Every "DESIGN §N" in the repository names a section of docs/design.md."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = re.compile(r"DESIGN §(\d+)")


def sections() -> set[str]:
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    return set(re.findall(r"^## (\d+)\. ", text, re.MULTILINE))


def references() -> list[tuple[str, str]]:
    listed = subprocess.run(
        ["git", "grep", "-n", "DESIGN §"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout
    return [
        (line.split(":", 2)[0] + ":" + line.split(":", 2)[1], n)
        for line in listed.splitlines()
        for n in REFERENCE.findall(line)
    ]


def test_every_design_reference_resolves() -> None:
    found = references()
    assert found, "the code cites the design doc; none found means the search itself broke"
    known = sections()
    assert [(where, n) for where, n in found if n not in known] == []
