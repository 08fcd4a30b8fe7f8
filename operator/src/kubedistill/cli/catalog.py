"""`kubedistill models teachers|students`: the catalogs, offline."""

from __future__ import annotations

import typer

from kubedistill import sdk
from kubedistill.cli.app import app
from kubedistill.cli.options import Output, console, dump
from kubedistill.cli.render import table

models_app = typer.Typer(help="The teacher and student catalogs.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("teachers")
def teachers(output: Output = "table") -> None:
    """Teachers with their OpenAI-compatible base URLs and prices per million tokens."""
    found = sdk.Distiller().teacher_models()
    if not dump(found, output):
        rows = [
            [
                t["id"],
                t["provider"] or "",
                f"{t['input_per_m_tok']:g}",
                f"{t['output_per_m_tok']:g}",
                t["price_date"],
                t["base_url"] or "",
            ]
            for t in found
        ]
        console.print(table(["ID", "PROVIDER", "IN $/M", "OUT $/M", "PRICED", "BASE URL"], rows))


@models_app.command("students")
def students(output: Output = "table") -> None:
    """Students with their Hugging Face ids, size, minimum VRAM and typical training time."""
    found = sdk.Distiller().student_models()
    if not dump(found, output):
        rows = [
            [
                s["id"],
                s["hf_id"],
                s["params"],
                f"{s['min_vram_gb']:g} GB",
                f"{s['typical_training_minutes']:g} min",
            ]
            for s in found
        ]
        console.print(table(["ID", "HUGGING FACE", "PARAMS", "MIN VRAM", "TRAINING"], rows))
