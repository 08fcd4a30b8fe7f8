"""Local mode's own child processes: `baseline INV OUT` and `convert GGUF DEST`."""

from __future__ import annotations

import sys
from pathlib import Path

from kubedistill.local.models import convert_gguf_to_hf
from kubedistill.local.processes import baseline_main


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 3 and args[0] == "baseline":
        return baseline_main(args[1], args[2])
    if len(args) == 3 and args[0] == "convert":
        convert_gguf_to_hf(Path(args[1]), Path(args[2]))
        return 0
    print("usage: python -m kubedistill.local {baseline INV OUT | convert GGUF DEST}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
