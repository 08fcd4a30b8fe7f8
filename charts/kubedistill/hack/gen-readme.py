#!/usr/bin/env python3
"""Write the chart's README.md from README.tmpl.md and the `# --` comments of values.yaml.

A `# -- text` comment (continued by the `#` lines right below it) documents the key that follows;
the table shows that key's dotted path, type and default as values.yaml sets it.

    python charts/kubedistill/hack/gen-readme.py           # rewrite README.md
    python charts/kubedistill/hack/gen-readme.py --check   # exit 1 when README.md is stale
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[1]
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-]+):(?:\s|$)")
PLACEHOLDER = "<!-- VALUES TABLE -->"


def documented_keys(values_text: str) -> list[tuple[str, str]]:
    """(dotted path, description) for every key preceded by a `# --` comment, in file order."""
    out: list[tuple[str, str]] = []
    stack: list[tuple[int, str]] = []
    pending: list[str] | None = None
    for line in values_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = [stripped[4:].strip()]
            continue
        if stripped.startswith("#"):
            if pending is not None:
                pending.append(stripped[1:].strip())
            continue
        match = KEY.match(line)
        if not match:
            continue  # list items and blank lines belong to the key above
        indent = len(match.group("indent"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group("key")))
        if pending is not None:
            out.append((".".join(k for _, k in stack), " ".join(pending)))
            pending = None
    return out


def lookup(values: dict[str, Any], path: str) -> Any:
    node: Any = values
    for part in path.split("."):
        node = node[part]
    return node


def type_name(value: Any) -> str:
    for kind, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "string"), (list, "list")):
        if isinstance(value, kind):
            return name
    return "object"


def escape(cell: str) -> str:
    return cell.replace("|", "\\|")


def table(values_text: str) -> str:
    values = yaml.safe_load(values_text)
    rows = ["| Key | Type | Default | Description |", "|-----|------|---------|-------------|"]
    for path, description in documented_keys(values_text):
        value = lookup(values, path)
        default = escape(json.dumps(value, separators=(",", ":")))
        rows.append(f"| `{path}` | {type_name(value)} | `{default}` | {escape(description)} |")
    return "\n".join(rows)


def render() -> str:
    template = (CHART / "hack" / "README.tmpl.md").read_text()
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    text = template.replace(PLACEHOLDER, table((CHART / "values.yaml").read_text()))
    return text.replace("{{ version }}", str(chart["version"])).replace(
        "{{ appVersion }}", str(chart["appVersion"])
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail when README.md is stale")
    text = render()
    readme = CHART / "README.md"
    if parser.parse_args().check:
        if not readme.is_file() or readme.read_text() != text:
            print(
                "charts/kubedistill/README.md is stale: run python charts/kubedistill/hack/gen-readme.py",
                file=sys.stderr,
            )
            return 1
        return 0
    readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
