"""`python -m kubedistill_trainer fetch --uri URI --out PATH`: copy one artifact (s3:// or file://) to a path.

The model server's init container: it reads with the storage env of the stage that wrote the file
(KUBEDISTILL_S3_ENDPOINT, AWS_* from a Secret), so a GGUF that is missing, or credentials that cannot
read it, fail here with one line in the termination log, which the operator shows on the alias.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from kubedistill import store
from kubedistill.api.stage import DEFAULT_TERMINATION_LOG, TERMINATION_LOG_ENV


class FetchError(RuntimeError):
    pass


def fetch(uri: str, out: Path) -> int:
    """Copy `uri` to `out` (through a temporary name: a half-written model is never loaded); its size."""
    try:
        if not store.exists(uri):
            raise FetchError(f"{uri} does not exist")
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        store.get_file(uri, partial)
        partial.replace(out)
    except FetchError:
        raise
    except Exception as exc:  # any store error (credentials, endpoint, bucket) is the one line we report
        raise FetchError(f"cannot read {uri}: {type(exc).__name__}: {exc}") from exc
    return out.stat().st_size


def _report(message: str) -> None:
    path = os.environ.get(TERMINATION_LOG_ENV, DEFAULT_TERMINATION_LOG)
    with contextlib.suppress(OSError):  # outside Kubernetes: stderr is the record
        Path(path).write_text(message[:4000], encoding="utf-8")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m kubedistill_trainer fetch")
    parser.add_argument("--uri", required=True, help="s3:// or file:// URI of the artifact")
    parser.add_argument("--out", required=True, type=Path, help="where to write it")
    args = parser.parse_args(argv)
    try:
        size = fetch(args.uri, args.out)
    except FetchError as err:
        _report(str(err))
        print(f"fetch failed: {err}", file=sys.stderr)
        sys.exit(1)
    print(f"fetched {args.uri} to {args.out} ({size} bytes)")
