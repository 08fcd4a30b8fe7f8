"""Start the operator: kopf with our handlers, JSON logs, standalone unless peering is asked for."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Sequence

import kopf

from kubedistill.metrics import start_metrics_server
from kubedistill.settings import PREFIX, from_env


def run(
    namespaces: Sequence[str] = (),
    *,
    all_namespaces: bool = False,
    peering: str | None = None,
    liveness: str | None = None,
    metrics_port: int | None = None,
    verbose: bool = False,
) -> None:
    """Run until SIGTERM/SIGINT. Namespaces default to KUBEDISTILL_NAMESPACES, else all of them."""
    if peering is not None:
        os.environ[f"{PREFIX}PEERING"] = peering
    settings = from_env()
    watched = list(namespaces) or list(settings.namespaces)
    kopf.configure(verbose=verbose, log_format=kopf.LogFormat.JSON)
    if not verbose:
        # kopf logs every handler call of every Job event at INFO; our own transitions are logged by us.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # Registering the handlers is importing them.
    import kubedistill.handlers.registrations  # noqa: F401

    if metrics_port is not None:
        start_metrics_server(metrics_port)
    asyncio.run(
        kopf.operator(
            standalone=settings.peering is None,
            peering_name=settings.peering,
            clusterwide=all_namespaces or not watched,
            namespaces=watched,
            liveness_endpoint=liveness,
        )
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kubedistill operator", description=run.__doc__)
    parser.add_argument(
        "-n", "--namespace", action="append", default=[], help="Namespace to watch (repeatable)."
    )
    parser.add_argument("-A", "--all-namespaces", action="store_true", help="Watch every namespace.")
    parser.add_argument("--peering", help="kopf peering name: coordinate with other operator replicas.")
    parser.add_argument("--liveness", help="Liveness endpoint, e.g. http://0.0.0.0:8080/healthz.")
    parser.add_argument("--metrics-port", type=int, help="Serve Prometheus metrics on this port.")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    run(
        args.namespace,
        all_namespaces=args.all_namespaces,
        peering=args.peering,
        liveness=args.liveness,
        metrics_port=args.metrics_port,
        verbose=args.verbose,
    )
