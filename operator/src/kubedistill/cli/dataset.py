"""`kubedistill dataset from-traffic ALIAS --since 7d -o rows.jsonl`: an alias's recorded requests as
the rows a `fromTraffic` job would train on, offline, for inspection.

It runs the stages' own reader (`kubedistill.traffic.TrafficStream`) with the store credentials of
this shell (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, KUBEDISTILL_S3_ENDPOINT). The recordings
prefix is `--uri`, else the operator's default for the namespace and alias, from
KUBEDISTILL_STORAGE_BUCKET and KUBEDISTILL_STORAGE_PREFIX as the operator reads them.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import typer
from pydantic import ValidationError

from kubedistill import dataset, settings, store
from kubedistill.api.models import FromTrafficSpec
from kubedistill.builders.stage_job import operator_root
from kubedistill.cli.app import app
from kubedistill.cli.options import EXIT_FAILED, EXIT_MISSING, err_console, print_invalid
from kubedistill.traffic import TrafficStream, recordings_prefix, traffic_summary

dataset_app = typer.Typer(help="Datasets: build one from what an alias recorded.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")


def traffic_spec(
    alias: str,
    namespace: str,
    since: str,
    until: str | None,
    max_rows: int | None,
    dedupe: bool,
    system_prompt: str,
    uri: str | None,
) -> FromTrafficSpec:
    """The fromTraffic spec these options mean; ValidationError for a bad value, ValueError when no
    recordings prefix can be named."""
    if uri is None:
        root = operator_root(settings.from_mapping(os.environ))
        if root is None:
            raise ValueError(
                "name the recordings with --uri, or set KUBEDISTILL_STORAGE_BUCKET (and _PREFIX)"
            )
        uri = recordings_prefix(root, namespace, alias)
    return FromTrafficSpec.model_validate(
        {
            "alias": alias,
            "since": since,
            "until": until,
            "maxRows": max_rows,
            "dedupe": dedupe,
            "systemPrompt": system_prompt,
            "uri": uri,
        }
    )


@dataset_app.command("from-traffic")
def from_traffic(
    alias: str,
    since: Annotated[str, typer.Option("--since", help="7d, 12h, 30m, 2w, or an RFC 3339 time.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="JSONL file of dataset rows to write.")],
    until: Annotated[str | None, typer.Option("--until", help="End of the window (RFC 3339); now.")] = None,
    max_rows: Annotated[int | None, typer.Option("--max-rows", help="Stop after this many rows.")] = None,
    dedupe: Annotated[bool, typer.Option("--dedupe/--no-dedupe", help="Drop repeated prompts.")] = True,
    system_prompt: Annotated[
        Literal["keep", "drop"],
        typer.Option("--system-prompt", help="keep or drop recorded system messages."),
    ] = "keep",
    uri: Annotated[str | None, typer.Option("--uri", help="The alias's recordings prefix.")] = None,
    namespace: Annotated[str, typer.Option("--namespace", "-n", help="The alias's namespace.")] = "default",
) -> None:
    """Write the rows a fromTraffic job would read, and say how many were kept, deduplicated, rejected."""
    try:
        spec = traffic_spec(alias, namespace, since, until, max_rows, dedupe, system_prompt, uri)
    except ValidationError as err:
        print_invalid([f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()])
        raise typer.Exit(EXIT_MISSING) from None
    except ValueError as err:
        print_invalid([str(err)])
        raise typer.Exit(EXIT_MISSING) from None
    tmp = output.with_name(f".{output.name}.partial")
    try:
        stream = TrafficStream(spec, datetime.now(UTC), namespace)
        with tmp.open("wb") as f:
            for line in stream:
                f.write(line + b"\n")
    except (dataset.DatasetInvalid, store.StoreError) as err:
        tmp.unlink(missing_ok=True)
        print_invalid([str(err)])
        raise typer.Exit(EXIT_FAILED) from None
    tmp.replace(output)
    for rejection in stream.rejections[:10]:
        err_console.print(f"rejected {rejection.uri}: {rejection.reason}", markup=False, highlight=False)
    err_console.print(f"{traffic_summary(stream.counts)} → {output}", markup=False, highlight=False)
