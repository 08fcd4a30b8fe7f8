"""Where the repository the harness serves lies. The harness is installed apart from the product, so it
is told: `KUBEDISTILL_REPO_ROOT` (set by tests/conftest.py), else the working directory, which `make`
and the benchmarks run from."""

from __future__ import annotations

import os
from pathlib import Path

ENV = "KUBEDISTILL_REPO_ROOT"


class RepoRootMissing(RuntimeError):
    """Neither the setting nor the working directory is the repository."""


def repo_root() -> Path:
    root = Path(os.environ.get(ENV) or Path.cwd()).resolve()
    if not (root / "pyproject.toml").is_file() or not (root / "charts").is_dir():
        raise RepoRootMissing(f"{root} is not the kubedistill repository; set {ENV} to its root")
    return root
