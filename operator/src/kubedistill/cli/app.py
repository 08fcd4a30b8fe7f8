"""The `kubedistill` typer app; each module of this package adds its commands to it."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="kubedistill",
    help="Distil a team's LLM traffic into a small, cheap model — on Kubernetes or locally.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Distil a team's LLM traffic into a small, cheap model — on Kubernetes or locally."""
