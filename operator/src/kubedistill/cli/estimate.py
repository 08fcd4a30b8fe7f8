"""`kubedistill estimate -f JOB.yaml`: teacher cost and GPU minutes of a job file, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kubedistill import sdk
from kubedistill.api.jobfile import JobInvalid, load_job, with_dataset_path
from kubedistill.cli.app import app
from kubedistill.cli.options import EXIT_MISSING, Output, console, dump, print_invalid
from kubedistill.cli.render import estimate_table


def estimate_file(job_file: Path) -> dict[str, Any]:
    """The offline estimate of a job file, counted on its dataset when it can be read from here."""
    from kubedistill import dataset
    from kubedistill.catalog import load_catalog
    from kubedistill.domain.estimate import estimate
    from kubedistill.domain.pricing import BatchUnsupported

    job = load_job(job_file)
    spec = with_dataset_path(job.spec, job_file.parent)
    try:
        rows = dataset.load(spec.dataset).rows
    except Exception as err:  # a dataset in a ConfigMap or an unreachable bucket
        raise JobInvalid([f"spec.dataset: cannot read it from here to count tokens: {err}"]) from None
    catalog = load_catalog()
    try:
        report = estimate(spec, rows, catalog)
    except BatchUnsupported as err:
        raise JobInvalid([f"spec.teacher.mode: {err}"]) from None
    return sdk.estimate_dict(report, catalog, spec.teacher.model)


@app.command("estimate")
def estimate_command(
    filename: Annotated[Path, typer.Option("--filename", "-f", help="DistillationJob YAML.")],
    output: Output = "table",
) -> None:
    """Teacher cost and GPU minutes of a job file, offline, counted on its dataset."""
    try:
        result = estimate_file(filename)
    except JobInvalid as err:
        print_invalid(err.lines)
        raise typer.Exit(EXIT_MISSING) from None
    if not dump(result, output):
        console.print(estimate_table(result))
