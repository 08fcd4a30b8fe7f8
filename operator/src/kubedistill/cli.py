"""The `kubedistill` command line: one typer app, one function per command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from kubedistill import cli_cluster, cli_doctor, cli_local
from kubedistill.api import crdgen

app = typer.Typer(
    name="kubedistill",
    help="Distil a team's LLM traffic into a small, cheap model — on Kubernetes or locally.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Distil a team's LLM traffic into a small, cheap model — on Kubernetes or locally."""


@app.command()
def crds(
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Write one <plural>.<group>.yaml per CRD into this directory."),
    ] = None,
) -> None:
    """Print the CustomResourceDefinitions generated from the API models (or write them with --out)."""
    rendered = crdgen.render_all()
    if out is None:
        sys.stdout.write("---\n".join(rendered.values()))
        return
    out.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        (out / name).write_text(text, encoding="utf-8")
        typer.echo(f"wrote {out / name}", err=True)


@app.command(
    "operator",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def operator_command(ctx: typer.Context) -> None:
    """Run the operator (kopf): -n NS (repeatable), -A, --peering NAME, --liveness URL, --metrics-port N."""
    from kubedistill.handlers.main import main as run_operator

    run_operator(list(ctx.args))


# Commands of other modules (local mode, the cluster commands) register themselves on the app.
cli_local.register(app)
cli_cluster.register(app)
cli_doctor.register(app)


def main() -> None:
    app()
