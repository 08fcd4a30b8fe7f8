"""`kubedistill alias set|get|rollback`: what `model=<alias>` resolves to."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any

import typer
from rich.table import Table

from kubedistill.cli.app import app
from kubedistill.cli.options import ClusterOptions, Output, cluster_command, console, dump, errors
from kubedistill.cli.render import table

alias_app = typer.Typer(help="ModelAliases: what model=<alias> resolves to.", no_args_is_help=True)
app.add_typer(alias_app, name="alias")


def alias_table(view: Mapping[str, Any]) -> Table:
    rows = [
        ["alias", view["id"]],
        ["target", json.dumps(view["target"])],
        ["gguf", view["gguf_path"] or ""],
        ["adapter", view["adapter_path"] or ""],
        ["model", view["model"] or ""],
        ["ready", f"{view['ready']} {view['message'] or ''}".strip()],
        ["history", "; ".join(json.dumps(h) for h in view["history"])],
    ]
    return table(["", ""], rows)


@cluster_command(alias_app, "set")
def alias_set(
    opts: ClusterOptions,
    name: str,
    job: Annotated[str | None, typer.Option("--job", help="Serve this DistillationJob's student.")] = None,
    gguf: Annotated[str | None, typer.Option("--gguf", help="Explicit GGUF URI.")] = None,
    adapter: Annotated[str | None, typer.Option("--adapter", help="Explicit LoRA adapter URI.")] = None,
    base_model: Annotated[str | None, typer.Option("--base-model", help="Base model of the adapter.")] = None,
    output: Output = "table",
) -> None:
    """Create the alias or re-point it."""
    with errors():
        view = opts.client().register_model(
            name, adapter_path=adapter, gguf_path=gguf, base_model=base_model, distillation_job=job
        )
    if not dump(view, output):
        console.print(alias_table(view))


@cluster_command(alias_app, "get")
def alias_get(opts: ClusterOptions, name: str, output: Output = "table") -> None:
    """Where the alias points now, and its history."""
    with errors():
        view = opts.client().alias(name)
    if not dump(view, output):
        console.print(alias_table(view))


@cluster_command(alias_app, "rollback")
def alias_rollback(opts: ClusterOptions, name: str) -> None:
    """Point the alias back at its previous target."""
    with errors():
        view = opts.client().rollback_alias(name)
    console.print(f"modelalias/{name} rolled back to {json.dumps(view['target'])}")
