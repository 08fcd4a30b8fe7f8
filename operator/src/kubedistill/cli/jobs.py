"""The kubectl-like DistillationJob commands: apply, get/list, describe, wait, artifacts, logs,
suspend/resume, delete."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn

from kubedistill import sdk
from kubedistill.api.models import Stage
from kubedistill.cli.app import app
from kubedistill.cli.options import (
    EXIT_FAILED,
    EXIT_MISSING,
    ClusterOptions,
    Output,
    cluster_command,
    console,
    dump,
    err_console,
    errors,
)
from kubedistill.cli.render import WaitBars, describe_job, job_rows, table

JobName = Annotated[str, typer.Argument(help="DistillationJob name.")]


@cluster_command(app)
def apply(
    opts: ClusterOptions,
    filename: Annotated[
        Path, typer.Option("--filename", "-f", help="YAML with DistillationJobs/ModelAliases.")
    ],
) -> None:
    """Create or update the objects in a file; the API server validates them (same fields as local mode)."""
    try:
        docs = [doc for doc in yaml.safe_load_all(filename.read_text(encoding="utf-8")) if doc]
    except (OSError, yaml.YAMLError) as err:
        err_console.print(f"error: {filename}: {err}", markup=False)
        raise typer.Exit(EXIT_MISSING) from None
    d = opts.client()
    with errors():
        for doc in docs:
            obj, verb = d.apply_object(doc)
            console.print(f"{str(obj['kind']).lower()}.{sdk.GROUP}/{obj['metadata']['name']} {verb}")


def _get(opts: ClusterOptions, name: str | None, output: str) -> None:
    d = opts.client()
    with errors():
        objs = [d.raw(name)] if name else d.raw_list()
    if dump(objs[0] if name else {"items": objs}, output):
        return
    if not objs:
        err_console.print(f"No resources found in {d.namespace} namespace.")
        return
    console.print(table(*job_rows(objs, wide=output == "wide")))


@cluster_command(app)
def get(
    opts: ClusterOptions,
    name: Annotated[str | None, typer.Argument(help="Job name; all jobs when omitted.")] = None,
    output: Output = "table",
) -> None:
    """List DistillationJobs (or one) with the printer columns."""
    _get(opts, name, output)


@cluster_command(app, "list")
def list_(opts: ClusterOptions, output: Output = "table") -> None:
    """List DistillationJobs."""
    _get(opts, None, output)


@cluster_command(app)
def describe(opts: ClusterOptions, name: JobName) -> None:
    """Conditions, stages, estimate, metrics, artifacts and events of a job."""
    with errors():
        describe_job(opts.client(), name)


@cluster_command(app)
def wait(
    opts: ClusterOptions,
    name: JobName,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Seconds; none by default.")] = None,
) -> None:
    """Follow a job until it ends: exit 0 Succeeded, 1 Failed, 2 no such job."""
    d = opts.client()
    final: dict[str, Any] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    with errors():
        d.raw(name)  # a missing job: exit 2 before drawing anything
        progress = Progress(
            TextColumn("[bold]{task.description:<9}"),
            BarColumn(bar_width=30),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("[dim]{task.fields[note]}"),
            console=console,
        )
        with progress:
            bars = WaitBars(progress)
            for obj in d.watch(name, deadline):
                bars.update(obj)
                final = sdk.summary(obj)
                if final["status"] in sdk.TERMINAL:
                    break
    if final.get("status") not in sdk.TERMINAL:
        err_console.print(f"error: distillationjob/{name} did not finish within {timeout} s", markup=False)
        raise typer.Exit(EXIT_FAILED)
    if final["status"] == "succeeded":
        console.print(f"distillationjob/{name} [green]Succeeded[/green]")
        return
    console.print(f"distillationjob/{name} [red]Failed[/red]: {escape(final.get('message') or '')}")
    raise typer.Exit(EXIT_FAILED)


@cluster_command(app)
def artifacts(opts: ClusterOptions, name: JobName, output: Output = "table") -> None:
    """Adapter, GGUF files and metrics of a job (the SDK's artifacts())."""
    with errors():
        arts = opts.client().artifacts(name)
    if dump(arts, output):
        return
    rows = [["adapter", arts["adapter_path"] or ""], ["merged", arts["merged_path"] or ""]]
    rows += [[f"gguf {q}", uri] for q, uri in arts["gguf_paths"].items()]
    rows += [["eval", arts["eval_path"] or ""]]
    rows += [[k, "" if v is None else str(v)] for k, v in arts["metrics"].items()]
    console.print(table(["ARTIFACT", "VALUE"], rows))


@cluster_command(app)
def logs(
    opts: ClusterOptions,
    name: JobName,
    stage: Annotated[
        str, typer.Option("--stage", "-s", help="estimate, generate, curate, train, export or evaluate.")
    ],
    tail: Annotated[int | None, typer.Option("--tail", help="Last lines only.")] = None,
) -> None:
    """Logs of the pod of the stage's latest Job."""
    if stage not in {s.value for s in Stage}:
        err_console.print(f"error: --stage must be one of {', '.join(s.value for s in Stage)}")
        raise typer.Exit(EXIT_MISSING)
    with errors():
        sys.stdout.write(opts.client().logs(name, stage, tail_lines=tail))


@cluster_command(app)
def suspend(opts: ClusterOptions, name: JobName) -> None:
    """Stop the running stage; start nothing new."""
    with errors():
        opts.client().cancel(name)
    console.print(f"distillationjob.{sdk.GROUP}/{name} suspended")


@cluster_command(app)
def resume(opts: ClusterOptions, name: JobName) -> None:
    """Let a suspended job go on."""
    with errors():
        opts.client().resume(name)
    console.print(f"distillationjob.{sdk.GROUP}/{name} resumed")


@cluster_command(app)
def delete(opts: ClusterOptions, name: JobName) -> None:
    """Delete a job (its artifacts stay unless storage says otherwise)."""
    with errors():
        opts.client().delete(name)
    console.print(f"distillationjob.{sdk.GROUP}/{name} deleted")
