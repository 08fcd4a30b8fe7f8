"""`kubedistill estimate -f JOB.yaml`: teacher cost and GPU minutes of a job file, offline."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn

from kubedistill import sdk
from kubedistill.api.jobfile import JobInvalid, load_job, with_dataset_path
from kubedistill.cli.app import app
from kubedistill.cli.options import EXIT_MISSING, Output, console, dump, err_console, print_invalid
from kubedistill.cli.render import estimate_table
from kubedistill.estimating import ProgressFn


def estimate_file(job_file: Path, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """The offline estimate of a job file, counted on its dataset when it can be read from here: the
    same streaming code as the estimate stage, `on_progress` called while it reads."""
    from kubedistill.catalog import load_catalog
    from kubedistill.domain.pricing import BatchUnsupported
    from kubedistill.estimating import estimate_dataset

    job = load_job(job_file)
    spec = with_dataset_path(job.spec, job_file.parent)
    catalog = load_catalog()
    try:
        report, _ = estimate_dataset(spec, catalog, on_progress=on_progress)
    except BatchUnsupported as err:
        raise JobInvalid([f"spec.teacher.mode: {err}"]) from None
    except Exception as err:  # a dataset in a ConfigMap or an unreachable bucket
        raise JobInvalid([f"spec.dataset: cannot read it from here to count tokens: {err}"]) from None
    return sdk.estimate_dict(report, catalog, spec.teacher.model)


@contextmanager
def reading_bar() -> Iterator[ProgressFn]:
    """A progress bar on stderr while a dataset is read (MB read of its size, rows so far)."""
    columns = (TextColumn("reading the dataset"), BarColumn(), TextColumn("{task.fields[note]}"))
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("read", total=None, note="")

        def update(read: int, total: int, rows: int) -> None:
            mb = 1024 * 1024
            note = f"{read / mb:,.1f}/{total / mb:,.1f} MB, {rows:,} rows"
            progress.update(task, completed=read, total=total or None, note=note)

        yield update


@app.command("estimate")
def estimate_command(
    filename: Annotated[Path, typer.Option("--filename", "-f", help="DistillationJob YAML.")],
    output: Output = "table",
) -> None:
    """Teacher cost and GPU minutes of a job file, offline, counted on its dataset."""
    try:
        with reading_bar() as on_progress:
            result = estimate_file(filename, on_progress)
    except JobInvalid as err:
        print_invalid(err.lines)
        raise typer.Exit(EXIT_MISSING) from None
    if not dump(result, output):
        console.print(estimate_table(result))
