"""The `kubedistill` command line.

Local mode (`run --local`), the kubectl-like cluster commands (apply, get/list, describe, wait,
artifacts, logs, suspend/resume, delete), `estimate`, `models`, `alias`, and the admin commands
(`crds`, `operator`, `doctor`), and `dataset from-traffic`. Every cluster command takes `-n/--namespace`, `--kubeconfig` and `--context`
like kubectl, and goes through the `Distiller` SDK.

Exit codes: 0 ok; 1 an error (the server's message is printed) or, for `wait`, a Failed job; 2 a
missing object or a file that is not a valid job; 130 a local run stopped with Ctrl-C.
"""

from __future__ import annotations

# Importing a command module registers its commands on `app`.
from kubedistill.cli import admin, alias, catalog, dataset, doctor, estimate, jobs, local, serve  # noqa: F401
from kubedistill.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    app()
