"""Where the harness keeps what it builds once per machine, and the lock that makes a second builder wait.

Standard library only: scripts/bootstrap.sh runs the llama.cpp build (:mod:`.servers`) before the harness's
own dependencies are installed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("KUBEDISTILL_CACHE") or Path.home() / ".cache" / "kubedistill")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
