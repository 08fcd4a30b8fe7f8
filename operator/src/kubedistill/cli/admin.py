"""Commands for whoever runs kubedistill: `crds` (the CRDs from the models) and `operator` (run it)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from kubedistill.api import crdgen
from kubedistill.cli.app import app


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
